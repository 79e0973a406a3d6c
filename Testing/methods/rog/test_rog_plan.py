"""ROG planner on tiny synthetic NIfTI datasets: spacing, strides, patch, intensities, labels, errors."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from deepimaging.core.errors import GeometryMismatchError, InputError
from deepimaging.rog.model import total_stride
from deepimaging.rog.plan import (DEFAULT_MEMORY_BUDGET, Plan, estimate_memory_bytes, plan_architecture,
                                  plan_dataset, read_msd_dataset)


def write(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    """Write a (z, y, x) array with spacing/origin in (x, y, z) order, like SimpleITK."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def make_case(folder, name, shape=(12, 24, 24), spacing=(1.0, 1.0, 1.0), seed=0, lesions=()):
    """Image: background ~N(0, 1), a box "organ" (label 1) with values uniform in [100, 200];
    ``lesions``: (z, y, x, radius) cubes of label 2 inside the organ."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 1, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    z, y, x = (s // 4 for s in shape)
    label[z:-z, y:-y, x:-x] = 1
    for cz, cy, cx, r in lesions:
        label[cz - r:cz + r + 1, cy - r:cy + r + 1, cx - r:cx + r + 1] = 2
    image[label > 0] = rng.uniform(100, 200, int((label > 0).sum()))
    return (write(folder / f"{name}_img.nii", image, spacing), write(folder / f"{name}_lab.nii", label, spacing))


def make_msd(root, cases=3, labels=None, modality=None):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(cases):
        lesions = [(6, 10, 10, 1), (6, 14, 14, 0)] if i == 0 else [(6, 12, 12, 1)]
        img, lab = make_case(root, f"case{i}", seed=i, lesions=lesions)
        img.rename(root / "imagesTr" / f"case{i}.nii")
        lab.rename(root / "labelsTr" / f"case{i}.nii")
        training.append({"image": f"./imagesTr/case{i}.nii", "label": f"./labelsTr/case{i}.nii"})
    meta = {"name": "Synthetic", "labels": labels or {"0": "background", "1": "liver", "2": "liver tumour"},
            "modality": modality or {"0": "CT"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_layout_gives_spacing_intensities_and_label_kinds(tmp_path):
    plan = plan_dataset(make_msd(tmp_path / "Task99"))
    assert plan.name == "Synthetic" and plan.num_cases == 3
    assert plan.target_spacing_zyx == (1.0, 1.0, 1.0) and plan.anisotropic_axis is None
    assert plan.median_shape == (12, 24, 24)
    ch = plan.channels[0]
    assert ch.normalization == "clip_zscore"  # CT: raw values
    assert 100 <= ch.percentile_00_5 < 101.5 and 198.5 < ch.percentile_99_5 <= 200
    assert ch.mean == pytest.approx(150, abs=3) and ch.std == pytest.approx(100 / 12 ** 0.5, rel=0.05)
    kinds = {lb.name: lb.kind for lb in plan.labels}
    assert kinds == {"background": "background", "liver": "organ", "liver tumour": "lesion"}
    tumour = plan.labels[2]
    assert tumour.components == 4 and tumour.smallest_component_mm3 == 1.0
    assert tumour.min_size_mm3 == 1.0 and tumour.mean_component_mm3 == pytest.approx((27 * 3 + 1) / 4)
    assert plan.labels[1].min_size_mm3 == 0.0


def test_plan_round_trips_through_json_and_builds_the_model(tmp_path):
    plan = plan_dataset(make_msd(tmp_path / "Task99"))
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["derived"]["total_stride"] == list(plan.total_stride)
    again = Plan.from_dict(data)
    assert again == plan
    model = again.build_model()
    assert model.config() == plan.network_config() and model.num_classes == 3
    with pytest.raises(ValueError, match="unknown plan key"):
        Plan.from_dict({**data, "extra": 1})


def test_nnunet_v2_layout_with_two_mri_channels(tmp_path):
    root = tmp_path / "Dataset001"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(2):
        img, lab = make_case(tmp_path, f"c{i}", seed=i)
        img2 = write(tmp_path / f"c{i}_b.nii", sitk.GetArrayFromImage(sitk.ReadImage(str(img))) * 2 + 5)
        img.rename(root / "imagesTr" / f"c{i}_0000.nii")
        img2.rename(root / "imagesTr" / f"c{i}_0001.nii")
        lab.rename(root / "labelsTr" / f"c{i}.nii")
    meta = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "prostate": 1, "lesion": 2},
            "file_ending": ".nii"}
    (root / "dataset.json").write_text(json.dumps(meta))
    spec = read_msd_dataset(root)
    assert spec.label_names == {0: "background", 1: "prostate", 2: "lesion"} and len(spec.cases) == 2
    plan = plan_dataset(spec)
    assert [c.name for c in plan.channels] == ["T2", "ADC"]
    assert all(c.normalization == "minmax_clip_zscore" for c in plan.channels)
    assert all(0.0 <= c.percentile_00_5 < c.percentile_99_5 <= 1.0 for c in plan.channels)  # min-max scaled
    assert plan.labels[2].kind == "lesion" and plan.labels[2].components == 0


def test_four_d_msd_image_holds_the_modalities(tmp_path):
    root = make_msd(tmp_path / "Task98", cases=2, modality={"0": "FLAIR", "1": "T1w"})
    for i in range(2):
        path = root / "imagesTr" / f"case{i}.nii"
        vol = sitk.ReadImage(str(path))
        sitk.WriteImage(sitk.JoinSeries([vol, vol * 3]), str(path))
    plan = plan_dataset(root)
    assert len(plan.channels) == 2 and plan.build_model().in_channels == 2


def test_anisotropic_spacing_downsamples_the_coarse_axis_less(tmp_path):
    pairs = [make_case(tmp_path, f"a{i}", shape=(16, 64, 64), spacing=(0.8, 0.8, 4.0), seed=i) for i in range(2)]
    plan = plan_dataset(pairs, modalities=["CT"], label_names={1: "spleen"})
    assert [(lb.value, lb.kind) for lb in plan.labels] == [(0, "background"), (1, "organ")]
    assert plan.target_spacing_zyx == pytest.approx((4.0, 0.8, 0.8))
    stride = plan.total_stride
    assert stride[0] < stride[1] == stride[2]
    assert plan.stem_strides[0][0] == 1  # the stem keeps the coarse z axis
    assert plan.head_upsampling == (plan.stem_strides[1], plan.stem_strides[0])
    assert all(p % t == 0 for p, t in zip(plan.patch_size, stride))
    # pure planning for a big anisotropic CT: z gets one stride-2 step of three, y/x all three
    stem, lattice, patch, _ = plan_architecture((5.0, 0.8, 0.8), (60, 512, 512))
    assert stem == ((1, 2, 2), (1, 2, 2)) and lattice == (2, 2, 2)
    assert total_stride(stem, lattice) == (8, 32, 32)


def test_tenth_percentile_spacing_on_a_strongly_anisotropic_axis(tmp_path):
    pairs = [make_case(tmp_path, f"t{i}", shape=(8, 48, 48), spacing=(0.7, 0.7, s), seed=i)
             for i, s in enumerate([2.0, 3.0, 4.0, 5.0, 6.0])]
    plan = plan_dataset(pairs)
    assert plan.anisotropic_axis == 0
    assert plan.median_spacing_zyx[0] == pytest.approx(4.0)
    assert plan.target_spacing_zyx == pytest.approx((2.4, 0.7, 0.7))  # np.percentile([2..6], 10)


@pytest.mark.parametrize("spacing, shape", [
    ((1.0, 1.0, 1.0), (300, 400, 400)), ((2.5, 0.8, 0.8), (120, 512, 512)),
    ((1.0, 1.0, 1.0), (36, 50, 35)), ((3.6, 0.6, 0.6), (20, 320, 320)),
])
def test_patch_is_a_multiple_of_the_stride_and_fits_the_budget(spacing, shape):
    stem, lattice, patch, memory = plan_architecture(spacing, shape)
    stride = total_stride(stem, lattice)
    assert all(p % t == 0 and p >= t for p, t in zip(patch, stride))
    assert memory == estimate_memory_bytes(patch, stem, lattice) <= DEFAULT_MEMORY_BUDGET
    assert all(p <= -(-s // t) * t for p, s, t in zip(patch, shape, stride))  # never beyond the image
    if spacing == (1.0, 1.0, 1.0) and shape[0] == 300:
        assert patch == (96, 96, 96) and stride == (32, 32, 32)  # typical isotropic CT
    small = plan_architecture(spacing, shape, memory_budget_bytes=DEFAULT_MEMORY_BUDGET // 4)
    assert np.prod(small[2]) <= np.prod(patch) and small[3] <= DEFAULT_MEMORY_BUDGET // 4
    with pytest.raises(InputError, match="too small"):
        plan_architecture(spacing, shape, memory_budget_bytes=10 ** 6)


def test_empty_dataset_is_rejected(tmp_path):
    with pytest.raises(InputError, match="empty"):
        plan_dataset([])
    root = make_msd(tmp_path / "Task97", cases=1)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "training": []}))
    with pytest.raises(InputError, match="empty"):
        plan_dataset(root)
    with pytest.raises(InputError, match="dataset.json"):
        plan_dataset(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"shape": (12, 24, 20)}, "size"),
    ({"spacing": (1.0, 1.0, 1.5)}, "spacing"),
    ({"origin": (0.0, 0.0, 2.0)}, "origin"),
    ({"direction": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)}, "direction"),
])
def test_image_label_geometry_mismatch_is_rejected(tmp_path, change, message):
    img, _ = make_case(tmp_path, "g")
    label = np.zeros(change.get("shape", (12, 24, 24)), np.uint8)
    label[4:8, 8:16, 8:16] = 1
    lab = write(tmp_path / "g_bad.nii", label, change.get("spacing", (1.0, 1.0, 1.0)),
                change.get("origin", (0.0, 0.0, 0.0)), change.get("direction"))
    with pytest.raises(GeometryMismatchError, match=message):
        plan_dataset([(img, lab)])


def test_two_d_and_four_d_volumes_are_rejected(tmp_path):
    img, lab = make_case(tmp_path, "d")
    flat = write(tmp_path / "flat.nii", np.zeros((24, 24), np.float32))
    with pytest.raises(InputError, match="2-D"):
        plan_dataset([(flat, lab)])
    vol = sitk.ReadImage(str(img))
    four = tmp_path / "four.nii"
    sitk.WriteImage(sitk.JoinSeries([vol, vol, vol]), str(four))
    with pytest.raises(InputError, match="4-D"):
        plan_dataset([(four, lab)])


@pytest.mark.parametrize("values, message", [
    (np.float32(0.5), "non-integer"), (np.int16(-1), "negative"), (np.uint8(7), "not declared"),
])
def test_bad_label_values_are_rejected(tmp_path, values, message):
    img, lab = make_case(tmp_path, "v")
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(lab))).astype(values.dtype)
    label[0, 0, 0] = values
    bad = write(tmp_path / "v_bad.nii", label)
    with pytest.raises(InputError, match=message):
        plan_dataset([(img, bad)], label_names={0: "background", 1: "organ"})


def test_label_maps_without_foreground_are_rejected(tmp_path):
    img, _ = make_case(tmp_path, "e")
    empty = write(tmp_path / "e_empty.nii", np.zeros((12, 24, 24), np.uint8))
    with pytest.raises(InputError, match="foreground"):
        plan_dataset([(img, empty)])
