"""Each module's paths, run as in Slicer: installed files, Slicer's packages + torch + the
module's on-demand list, nothing else (see conftest.py and Testing/support/slicerlike.py).

A path that imports a package nobody installs in Slicer (tqdm, scikit-image, psutil, ...)
fails here; so does a data file the CMake lists do not install (e.g. the shipped Z-Net).
"""

import textwrap

import pytest

LEVELSET_REFINE = """
import numpy as np
import slicer
from DeepImagingCommonLib import nodes
from deepimaging.core.image import Image
from LevelSetRefineLib import LevelSetRefineLogic

rng = np.random.default_rng(0)
z, y, x = np.indices((16, 32, 32))
truth = (x - 15.5) ** 2 + (y - 15.5) ** 2 + ((z - 7.5) * 2) ** 2 < 100
array = np.where(truth, 100.0, 20.0) + rng.normal(0.0, 15.0, truth.shape)
volume = nodes.volumeNodeFromImage(Image(array.astype(np.float32), (1.0, 1.0, 2.0)), "Ball")
segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
segmentation.CreateDefaultDisplayNodes()
rough = np.zeros(truth.shape, bool)
rough[5:10, 10:20, 12:22] = True
segmentId = nodes.writeMaskToSegment(rough, segmentation, volume, name="Ball")
outputId = LevelSetRefineLogic().refine(volume, segmentation, segmentId)
refined = nodes.segmentMask(segmentation, outputId, volume)
dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())
print("DICE", round(dice(rough, truth), 3), round(dice(refined, truth), 3))
"""

LEVELSET_REFINE_LEARNED = """
from pathlib import Path
import numpy as np
import slicer
from DeepImagingCommonLib import nodes, process
from deepimaging.core.image import Image
from LevelSetRefineLib import LevelSetRefineLogic

folder = Path({folder!r})
rng = np.random.default_rng(0)
logic = LevelSetRefineLogic()
pairs = []
for index in range(3):
    y, x = np.indices((48, 48))
    truth = ((x - 24 - 3 * index) ** 2 + (y - 22) ** 2 < 100 + 30 * index)[np.newaxis]
    array = np.where(truth, 100.0, 20.0) + rng.normal(0.0, 15.0, truth.shape)
    volume = nodes.volumeNodeFromImage(Image(array.astype(np.float32), (0.5, 0.5, 1.0)), f"Slice {{index}}")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    truthId = nodes.writeMaskToSegment(truth, segmentation, volume, name="object")
    rough = np.zeros_like(truth)
    rough[0, 16:28, 18:30] = True
    roughId = nodes.writeMaskToSegment(rough, segmentation, volume, name="rough")
    pairs.append((volume, segmentation, truthId, roughId))
job = logic.startTraining(folder / "run", pairs=pairs, dim=2, epochs=1, device="cpu",
                          extraArguments=["--grid", "32", "--widths", "8", "16", "--features", "8",
                                          "--steps-per-epoch", "2", "--batch-size", "2"])
log = job.wait(timeout=300)
assert job.state == process.ProcessState.SUCCEEDED, job.errorMessage() + "\\n".join(log)
volume, segmentation, truthId, roughId = pairs[0]
refinedId = logic.refine(volume, segmentation, roughId, method="learned", checkpoint=job.bestCheckpoint, device="cpu")
roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
roi.SetCenter(-12.0, -11.0, 0.0)
roi.SetSize(12.0, 12.0, 1.0)
try:
    boxId = logic.segmentInBox(volume, roi, job.bestCheckpoint, device="cpu")
    box = "found" if nodes.segmentMask(logic.lastSegmentationNode, boxId, volume).any() else "empty"
except Exception as error:  # an untrained 1-epoch model may find nothing: that is its message, not a crash
    box = type(error).__name__
print("LEARNED", nodes.segmentMask(segmentation, refinedId, volume).shape, "BOX", box)
"""

ROG_SEGMENT = """
import numpy as np
from DeepImagingCommonLib import nodes
from deepimaging.core.image import Image
from ROGSegmentLib import ROGSegmentLogic
from rogcases import save_rog, tiny_plan

checkpoint = save_rog({checkpoint!r}, tiny_plan())
array = np.random.default_rng(0).normal(100.0, 30.0, (20, 36, 36)).astype(np.float32)
volume = nodes.volumeNodeFromImage(Image(array, (0.9, 0.9, 1.8)), "CT")
node = ROGSegmentLogic().segment(volume, checkpoint, device="cpu")
segmentation = node.GetSegmentation()
print("SEGMENTS", "|".join(segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()))
"""

ROG_ROBUSTNESS = """
import numpy as np
import slicer
from DeepImagingCommonLib import nodes
from deepimaging.core.image import Image
from ROGSegmentLib import ROGRobustnessLogic
from rogcases import save_rog, tiny_plan

checkpoint = save_rog({checkpoint!r}, tiny_plan())
z, y, x = np.indices((20, 36, 36))
liver = (x - 18) ** 2 + (y - 18) ** 2 + ((z - 10) * 2) ** 2 < 100
array = np.where(liver, 150.0, 60.0) + np.random.default_rng(0).normal(0.0, 20.0, liver.shape)
volume = nodes.volumeNodeFromImage(Image(array.astype(np.float32), (0.9, 0.9, 1.8)), "CT")
reference = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
nodes.writeMaskToSegment(liver, reference, volume, name="liver")
reference.GetSegmentation().AddEmptySegment("", "liver tumour")
outputs = ROGRobustnessLogic().evaluate(volume, reference, checkpoint, eps=[0, 8], attacks=["apgd-ce", "square"],
                                        iterations=2, squareQueries=5, device="cpu")
print("ROWS", outputs.tableNode.GetTable().GetNumberOfRows(), "SERIES", outputs.plotChartNode.GetNumberOfPlotSeriesNodes())
"""

ROG_TRAINING = """
import json
import numpy as np
from pathlib import Path
from DeepImagingCommonLib import nodes, process
from deepimaging.core.image import Image
from deepimaging.rog.plan import Plan
from deepimaging.rog.synthetic import cpu_friendly
from ROGSegmentLib import ROGSegmentLogic, exportTrainingData, trainingSteps
from ROGSegmentLib.training import TrainingJob
import slicer

out = Path({folder!r})
rng = np.random.default_rng(0)
pairs = []
for index in range(2):
    z, y, x = np.indices((16, 32, 32))
    organ = (x - 16) ** 2 + (y - 15) ** 2 + ((z - 8) * 2) ** 2 < 64 + 20 * index
    array = np.where(organ, 120.0, 20.0) + rng.normal(0.0, 10.0, organ.shape)
    volume = nodes.volumeNodeFromImage(Image(array.astype(np.float32), (1.0, 1.0, 2.0)), f"Case {{index}}")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    nodes.writeMaskToSegment(organ, segmentation, volume, name="organ")
    pairs.append((volume, segmentation))
data = exportTrainingData(pairs, out / "data", modality="CT")
steps = trainingSteps(data.folder, out / "model", 1, 2, "cpu")
planning = TrainingJob(steps[:1], out / "model").start()
planning.wait(timeout=240)
assert planning.state == process.ProcessState.SUCCEEDED, planning.errorMessage()
planFile = out / "model" / "plan.json"
planFile.write_text(json.dumps(cpu_friendly(Plan.from_dict(json.loads(planFile.read_text())), (16, 32, 32)).to_dict()))
training = TrainingJob(steps[1:], out / "model").start()  # augmentation on, as the panel trains
log = training.wait(timeout=240)
assert training.state == process.ProcessState.SUCCEEDED, training.errorMessage() + "\\n".join(log)
node = ROGSegmentLogic().segment(pairs[0][0], training.bestCheckpoint, device="cpu")
print("TRAINED", training.status.epoch, node.GetSegmentation().GetNumberOfSegments())
"""

NIRST_RECONSTRUCT = """
from NIRSTReconLib import NIRSTReconLogic

logic = NIRSTReconLogic()
phantom = logic.simulatePhantom(seed=3, loadTruth=True, directory={folder!r})
result = logic.reconstruct(phantom.measurementFile, phantom.mriVolume, device="cpu")
contrast = logic.hbtContrast(result.volumes["HbT"], phantom.segmentationNode, phantom.segmentId)
print("MAPS", len(result.volumes), "CONTRAST", round(contrast, 3))
"""

NIRST_TRAINING = """
from pathlib import Path
from DeepImagingCommonLib.process import parseProgressLine
from deepimaging.nirst import save_dataset, simulate_phantoms
from NIRSTReconLib import NIRSTReconLogic

folder = Path({folder!r})
save_dataset(folder / "data" / "shard_0.npz", simulate_phantoms(4, seed=7, workers=1))
process = NIRSTReconLogic().startTraining(folder / "data", folder / "out", epochs=1, device="cpu")
lines = process.wait(timeout=240)
assert process.state.value == "succeeded", "\\n".join(lines)
assert any(parseProgressLine(line) for line in lines), "\\n".join(lines)
print("CHECKPOINT", NIRSTReconLogic.trainedCheckpoint(folder / "out").name)
"""

GLS_SEGMENT_AND_TRAIN = """
from pathlib import Path
import slicer
from DeepImagingCommonLib import nodes
from GLSSegmentLib import GLSSegmentLogic
from GLSSegmentLib.selftest import bscanVolume, randomCheckpoint

folder = Path({folder!r})
volume, masks, keypoints = bscanVolume(slices=2)
outputs = GLSSegmentLogic().segment(volume, randomCheckpoint(folder), device="cpu")
print("POINTS", outputs.keypointCount)
segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
nodes.writeMaskToSegment(masks, segmentation, volume, name="iris")
job = GLSSegmentLogic().startTraining(folder / "run", pairs=[(volume, segmentation)], architecture="global", epochs=1,
                                      device="cpu", extraArguments=["--size", "64", "64", "--widths", "4", "8", "16",
                                                                    "32", "64"])
job.wait(timeout=300)
assert job.state.value == "succeeded", job.errorMessage()
print("TRAINED", (folder / "run" / "best.pt").is_file())
"""


def run(slicer_python, module, code, **options):
    return slicer_python.run(module, textwrap.dedent(code), **options)


def test_levelset_refine(slicer_python):
    out = slicer_python.check(run(slicer_python, "LevelSetRefine", LEVELSET_REFINE))
    before, after = (float(v) for v in out.split("DICE")[1].split())
    assert after > before + 0.2 and after > 0.85, out


def test_levelset_refine_learned_training_child_refine_and_box(slicer_python, tmp_path):
    """Scene pairs -> ``deepimaging levelset train`` child -> learned refinement and segment in a box,
    with Slicer's packages and torch only (LevelSetRefine has no on-demand packages)."""
    out = slicer_python.check(run(slicer_python, "LevelSetRefine", LEVELSET_REFINE_LEARNED.format(folder=str(tmp_path)),
                                  timeout=400))
    assert "LEARNED (1, 48, 48) BOX" in out, out
    assert out.split("BOX")[1].split()[0] in ("found", "empty", "DeepImagingError"), out


def test_rog_segment(slicer_python, tmp_path):
    out = slicer_python.check(run(slicer_python, "ROGSegment", ROG_SEGMENT.format(checkpoint=str(tmp_path / "m.pt"))))
    assert "SEGMENTS liver|liver tumour" in out


def test_rog_segment_needs_exactly_its_on_demand_package(slicer_python, tmp_path):
    """Without monai (ROGSegment's on-demand package) the path stops with the message that says
    how to install it; with it (test above) nothing else is needed."""
    result = run(slicer_python, "ROGSegment", ROG_SEGMENT.format(checkpoint=str(tmp_path / "m.pt")),
                 withoutOnDemand=("monai",))
    assert result.returncode != 0, result.stdout
    assert "DependencyError: ROGSegment needs packages that are not installed" in result.stderr, result.stderr
    assert "monai>=1.3 (installed: none)" in result.stderr and "ensureModuleDependencies('ROGSegment')" in result.stderr


def test_rog_robustness(slicer_python, tmp_path):
    out = slicer_python.check(run(slicer_python, "ROGSegment", ROG_ROBUSTNESS.format(checkpoint=str(tmp_path / "m.pt"))))
    assert "ROWS 2 SERIES 4" in out, out


@pytest.mark.slow
def test_rog_training_children_plan_and_train(slicer_python, tmp_path):
    out = slicer_python.check(run(slicer_python, "ROGSegment", ROG_TRAINING.format(folder=str(tmp_path)), timeout=600))
    assert "TRAINED 1 1" in out, out


def test_nirst_simulate_and_reconstruct_with_the_shipped_znet(slicer_python, tmp_path):
    out = slicer_python.check(run(slicer_python, "NIRSTRecon", NIRST_RECONSTRUCT.format(folder=str(tmp_path))))
    maps, contrast = out.split("MAPS")[1].split("CONTRAST")
    assert int(maps) == 5 and float(contrast) > 1.3, out


def test_nirst_training_child(slicer_python, tmp_path):
    out = slicer_python.check(run(slicer_python, "NIRSTRecon", NIRST_TRAINING.format(folder=str(tmp_path)),
                                  timeout=400))
    assert "CHECKPOINT best.pt" in out


def test_gls_segment_and_training_child(slicer_python, tmp_path):
    out = slicer_python.check(run(slicer_python, "GLSSegment", GLS_SEGMENT_AND_TRAIN.format(folder=str(tmp_path)),
                                  timeout=400))
    assert "POINTS 4" in out and "TRAINED True" in out, out
