"""Phantom generator, simulated datasets, shards and dataset files."""

import numpy as np
import pytest

from deepimaging.core.progress import CancelToken, Cancelled
from deepimaging.nirst import (
    disk_mask,
    load_dataset,
    make_phantom,
    pixel_centres,
    save_dataset,
    shard_range,
    simulate_phantoms,
)
from deepimaging.nirst.phantoms import BACKGROUND_LEVELS, CHROMOPHORES, INCLUSION_CONTRASTS

RADIUS = 41.0
COARSE = 3.0  # mm elements: keeps dataset tests fast; the physics is validated elsewhere


@pytest.fixture(scope="module")
def phantoms():
    return [make_phantom(i, seed=11) for i in range(120)]


def test_inclusion_geometry(phantoms):
    counts = {1: 0, 2: 0}
    for phantom in phantoms:
        k = len(phantom.diameters_mm)
        counts[k] += 1
        # Fully inside the disk.
        assert np.all(np.hypot(*phantom.centres_mm.T) + 0.5 * phantom.diameters_mm <= RADIUS + 1e-9)
        if k == 1:
            assert phantom.diameters_mm[0] in (12.0, 16.0, 20.0)
        else:
            assert np.all(phantom.diameters_mm == 16.0)
            assert 4.0 <= phantom.edge_distance_mm <= 42.0
    assert counts[1] > 50 and counts[2] > 10
    gaps = [p.edge_distance_mm for p in phantoms if len(p.diameters_mm) == 2]
    assert max(gaps) - min(gaps) > 15.0  # the whole 4-42 mm range is used


def test_maps_and_mri_levels(phantoms):
    x, y = pixel_centres(RADIUS)
    inside = disk_mask(RADIUS)
    for phantom in phantoms[:20]:
        assert phantom.maps.shape == (3, 100, 100) and phantom.mri.shape == (100, 100)
        assert phantom.maps.dtype == np.float32 and phantom.mri.dtype == np.float32
        assert np.all(phantom.maps[:, ~inside] == 0) and np.all(phantom.mri[~inside] == 0)
        lesion = np.zeros_like(inside)
        for centre, diameter in zip(phantom.centres_mm, phantom.diameters_mm):
            lesion |= np.hypot(x - centre[0], y - centre[1]) < 0.5 * diameter
        background = inside & ~lesion
        for channel, name in enumerate(CHROMOPHORES):
            assert phantom.background[channel] in BACKGROUND_LEVELS[name]
            assert np.allclose(phantom.maps[channel][background], phantom.background[channel])
            ratios = phantom.inclusion_values[:, channel] / phantom.background[channel]
            assert all(np.isclose(r, INCLUSION_CONTRASTS[name]).any() for r in ratios)
        assert np.median(phantom.mri[lesion]) == pytest.approx(80.0, rel=0.02)
        assert np.median(phantom.mri[background]) == pytest.approx(50.0, rel=0.01)
        assert np.std(phantom.mri[background]) / 50.0 == pytest.approx(0.04, rel=0.15)


def test_phantoms_reproducible_by_seed_and_index():
    a, b = make_phantom(7, seed=3), make_phantom(7, seed=3)
    assert np.array_equal(a.maps, b.maps) and np.array_equal(a.mri, b.mri)
    assert not np.array_equal(make_phantom(7, seed=4).mri, a.mri)
    assert not np.array_equal(make_phantom(8, seed=3).mri, a.mri)


def test_shard_range_partitions():
    for n, shards in ((10, 3), (20000, 7), (2, 4)):
        ranges = [shard_range(n, k, shards) for k in range(shards)]
        assert ranges[0][0] == 0 and sum(c for _, c in ranges) == n
        assert all(s1 + c1 == s2 for (s1, c1), (s2, _) in zip(ranges, ranges[1:]))
        assert max(c for _, c in ranges) - min(c for _, c in ranges) <= 1
    with pytest.raises(ValueError):
        shard_range(10, 3, 3)


@pytest.fixture(scope="module")
def whole():
    return simulate_phantoms(4, seed=5, workers=1, element_size_mm=COARSE)


def test_simulation_outputs(whole):
    assert whole["measurements"].shape == (4, 2160) and whole["measurements"].dtype == np.float32
    assert whole["mri"].shape == (4, 100, 100) and whole["maps"].shape == (4, 3, 100, 100)
    assert np.all(whole["measurements"] > 0)
    assert list(whole["indices"]) == [0, 1, 2, 3]
    meta = whole["meta"]
    assert meta["wavelengths_nm"][0] == 661 and meta["n_optodes"] == 16 and meta["noise"] == 0.02
    assert (meta["seed"], meta["start"], meta["stop"]) == (5, 0, 4)
    assert np.array_equal(whole["maps"][2], make_phantom(2, seed=5).maps)


def test_shards_reproduce_the_whole_run(whole):
    first = simulate_phantoms(2, seed=5, start=0, workers=1, element_size_mm=COARSE)
    second = simulate_phantoms(2, seed=5, start=2, workers=2, element_size_mm=COARSE, chunk_size=1)  # pool
    for key in ("measurements", "mri", "maps", "indices", "inclusion_values"):
        joined = np.concatenate([first[key], second[key]])
        assert np.array_equal(joined, whole[key], equal_nan=joined.dtype.kind == "f"), key


def test_noise_is_two_percent_multiplicative(whole):
    clean = simulate_phantoms(4, seed=5, noise=0.0, workers=1, element_size_mm=COARSE)
    assert np.array_equal(clean["maps"], whole["maps"])
    relative = whole["measurements"].astype(float) / clean["measurements"] - 1.0
    assert abs(relative.mean()) < 0.002 and relative.std() == pytest.approx(0.02, rel=0.05)


def test_dataset_round_trip_and_folder_of_shards(tmp_path, whole):
    path = save_dataset(tmp_path / "single.npz", whole)
    loaded = load_dataset(path)
    assert np.array_equal(loaded["measurements"], whole["measurements"])
    assert np.array_equal(loaded["maps"], whole["maps"])
    assert np.allclose(loaded["mri"], whole["mri"], rtol=1e-3, atol=0.05)  # float16 storage
    assert loaded["meta"] == whole["meta"]

    folder = tmp_path / "shards"
    for k in (1, 0):
        start, count = shard_range(4, k, 2)
        part = {key: value[start:start + count] for key, value in whole.items() if key != "meta"}
        meta = dict(whole["meta"], start=start, stop=start + count, count=count, shards=[[start, start + count]])
        save_dataset(folder / f"shard_{k}_of_2.npz", part, meta)
    merged = load_dataset(folder)
    assert np.array_equal(merged["indices"], whole["indices"])
    assert np.array_equal(merged["measurements"], whole["measurements"])
    assert (merged["meta"]["start"], merged["meta"]["stop"], merged["meta"]["count"]) == (0, 4, 4)
    assert merged["meta"]["shards"] == [[0, 2], [2, 4]]

    save_dataset(folder / "duplicate.npz", {k: v[:1] for k, v in whole.items() if k != "meta"}, whole["meta"])
    with pytest.raises(ValueError):
        load_dataset(folder)


def test_progress_and_cancel():
    fractions = []
    simulate_phantoms(1, workers=1, element_size_mm=COARSE, progress=lambda f, m: fractions.append(f))
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        simulate_phantoms(2, workers=1, element_size_mm=COARSE, cancel=token)
