"""Headless Slicer harness: a real MRML scene from the ``slicer-core`` wheel, wired the way
Slicer's application wires it, so ``slicer.util``'s volume and segment helpers and the module
Logic run exactly as inside Slicer (see shared SLICER-CORE.md for why each step is needed).
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

SKIP_REASON = None
try:
    import slicer
    import slicer.util  # noqa: F401  (the segment and volume helpers under test)
except ImportError as error:
    SKIP_REASON = (f"slicer-core is not installed ({error}); pip install slicer-core to run the headless "
                   "Slicer tests, which need its MRML scene and module logics")
else:
    if not hasattr(slicer, "vtkMRMLScene"):
        SKIP_REASON = ("the installed 'slicer' package is not slicer-core (the unrelated PyPI 'slicer' "
                       "0.0.8 has no MRML); install slicer-core")

if SKIP_REASON:
    # A module-level pytest.importorskip here would abort the whole run when this folder is
    # named on the command line (pytest loads it as an initial conftest); instead every test
    # file of this folder is collected as one skipped item that carries the reason.
    class _SkippedTestFile(pytest.File):
        def collect(self):
            pytest.skip(SKIP_REASON)

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedTestFile.from_parent(parent, path=module_path)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing" / "support"))
from cmakelists import module_folders  # noqa: E402
if not SKIP_REASON:
    from headless import HeadlessSlicer  # noqa: E402  (shared with the Slicer-like subprocess tests)


# Slicer puts every scripted-module folder on sys.path; do the same so `import <Name>Lib` works.
for _folder in module_folders():
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture
def headless_slicer():
    """A fresh wired scene per test; ``slicer.mrmlScene`` and ``slicer.modules`` point at it."""
    previous = (getattr(slicer, "mrmlScene", None), getattr(slicer, "modules", None))
    harness = HeadlessSlicer()
    harness.install()
    try:
        yield harness
    finally:
        harness.close()
        slicer.mrmlScene, slicer.modules = previous


def oblique_direction(degrees=25.0):
    """An LPS direction matrix rotated about z and tilted about x (not axis-aligned)."""
    a, b = np.deg2rad(degrees), np.deg2rad(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    return rz @ rx


class SyntheticCase:
    """Noisy bright ball (the truth) on an oblique, anisotropic grid and a rough box inside it."""

    def __init__(self, shape=(20, 36, 36), spacing=(0.9, 0.9, 1.8), seed=0):
        from deepimaging.core.image import Image

        rng = np.random.default_rng(seed)
        z, y, x = np.indices(shape)
        centre = (np.array(shape) - 1) / 2.0
        sx, sy, sz = spacing
        distance = np.sqrt(((x - centre[2]) * sx) ** 2 + ((y - centre[1]) * sy) ** 2 + ((z - centre[0]) * sz) ** 2)
        self.truth = distance < 11.0
        array = np.where(self.truth, 100.0, 20.0) + rng.normal(0.0, 18.0, shape)
        self.image = Image(array.astype(np.float32), spacing, (-12.0, 30.0, 7.5), oblique_direction())
        self.rough = np.zeros(shape, bool)
        self.rough[7:13, 12:22, 10:20] = True  # off-centre box well inside the ball


@pytest.fixture
def oblique():
    """A non-axis-aligned LPS direction matrix."""
    return oblique_direction()


@pytest.fixture
def synthetic_case():
    return SyntheticCase()


@pytest.fixture
def case_nodes(headless_slicer, synthetic_case):
    """The synthetic case as a volume node and a segmentation node with segment "Ball"."""
    from DeepImagingCommonLib import nodes

    volume = nodes.volumeNodeFromImage(synthetic_case.image, "Ball volume")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Ball segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segment_id = nodes.writeMaskToSegment(synthetic_case.rough, segmentation, volume, name="Ball",
                                          color=(0.9, 0.3, 0.2))
    return types.SimpleNamespace(volume=volume, segmentation=segmentation, segment_id=segment_id,
                                 truth=synthetic_case.truth, rough=synthetic_case.rough,
                                 image=synthetic_case.image)


def _oriented_image(array, ijk_to_ras, extent_start=(0, 0, 0)):
    """A vtkOrientedImageData holding ``array`` (z, y, x) whose extent starts at ``extent_start``."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    i0, j0, k0 = (int(v) for v in extent_start)
    nz, ny, nx = array.shape
    image.SetExtent(i0, i0 + nx - 1, j0, j0 + ny - 1, k0, k0 + nz - 1)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    image.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(array).ravel()
    return image


@pytest.fixture
def make_oriented():
    """Factory ``(array, ijk_to_ras, extent_start=(0, 0, 0)) -> vtkOrientedImageData``, as the editor holds images."""
    return _oriented_image


_BLOCK_TORCH = ("import sys\n"
                "class Block:\n"
                "    def find_spec(self, name, path=None, target=None):\n"
                "        if name == 'torch' or name.startswith('torch.'):\n"
                "            raise ModuleNotFoundError(\"No module named 'torch'\")\n"
                "sys.meta_path.insert(0, Block())\n")


@pytest.fixture
def run_without_torch():
    """Run ``code`` in a fresh Python with ``module``'s folder on the path, where importing torch
    fails unless ``block_torch=False``.

    Modules must load in Slicer before torch is installed (torch comes on first Apply).
    """
    def run(module: str, code: str, block_torch: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), str(REPO / "DeepImagingCommon"), str(REPO / module)] + sys.path))
        prelude = _BLOCK_TORCH if block_torch else ""
        return subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True,
                              timeout=120)

    return run
