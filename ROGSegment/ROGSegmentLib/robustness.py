"""ROGSegment's robustness Logic: AutoAttack on a volume + reference segmentation, results as nodes.

The maths is :mod:`deepimaging.robustness` (attacks, benchmark) and
:mod:`deepimaging.robustness.rog` (ROG binding, mapping an adversarial example back to the
volume's grid and intensities); this file converts nodes to arrays and the results to new
nodes: the adversarial volume, the perturbation, the segmentation of the adversarial volume,
and the Dice-vs-eps results as a table node with a plot chart.  Qt-free: it runs headless on
slicer-core and from Slicer's Python console.
"""

import logging
import time
from dataclasses import dataclass

import numpy as np

import slicer
from DeepImagingCommonLib import nodes
from DeepImagingCommonLib.dependencies import requireModuleDependencies
from deepimaging.core.errors import InputError
from deepimaging.core.progress import report, sub_progress

from .logic import ROGSegmentLogic, modelInfoFromHeader, requireDevice, requireModelPath, segmentColor, volumeImage

ATTACK_CHOICES = ("apgd-ce", "apgd-dlr", "fab-t", "square", "pgd")
DEFAULT_ATTACKS = ("apgd-ce", "apgd-dlr", "fab-t", "square")
DEFAULT_EPS = (0.0, 4.0, 8.0)


@dataclass
class RobustnessOutputs:
    """The nodes and numbers one robustness evaluation made."""

    result: object                 # deepimaging.robustness.RobustnessResult
    shownEps: float                # the eps (in /255) of the adversarial volume and its segmentation
    attackedDice: float            # mean foreground Dice of the model on that adversarial volume
    adversarialVolume: object
    perturbationVolume: object
    attackedSegmentation: object
    tableNode: object
    plotChartNode: object
    seconds: float


def parseEps(text):
    """``"0, 4, 8"`` -> ``[0.0, 4.0, 8.0]`` (eps in 1/255 of the valid range); a clear error otherwise."""
    try:
        values = [float(part) for part in str(text).replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise InputError(f"eps must be comma-separated numbers (in 1/255 of the intensity range), got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise InputError(f"give at least one non-negative eps, got {text!r}")
    return sorted(set(values))


def referenceLabelImage(segmentationNode, volumeNode, labels):
    """The reference as a label-value :class:`Image` on the volume grid.

    Segments are matched to the model's ``labels`` ``{value: name}`` by name (case-insensitive);
    every foreground label needs a segment of its name (an empty segment says "absent").
    """
    if segmentationNode is None:
        raise InputError("no reference segmentation selected")
    segmentation = segmentationNode.GetSegmentation()
    byName = {segmentation.GetSegment(i).GetName().strip().lower(): i for i in segmentation.GetSegmentIDs()}
    missing = [name for value, name in sorted(labels.items()) if value != 0 and name.strip().lower() not in byName]
    if missing:
        raise InputError(
            f"the reference segmentation '{segmentationNode.GetName()}' has no segment named "
            f"{', '.join(repr(m) for m in missing)}; name its segments as the model's labels "
            f"({', '.join(n for v, n in sorted(labels.items()) if v != 0)}); add an empty segment for a label that is absent")
    image = volumeImage(volumeNode)
    labelArray = np.zeros(image.shape, np.uint8)
    for value, name in sorted(labels.items()):
        if value == 0:
            continue
        mask = nodes.segmentMask(segmentationNode, byName[name.strip().lower()], volumeNode)
        labelArray[mask] = value
    return image, image.with_array(labelArray)


def resultTable(result, eps255, name):
    """A table node: eps (/255), clean, one column per attack, robust Dice."""
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", nodes.uniqueNodeName(name))
    columns = [("eps (1/255 of range)", list(eps255)), ("clean", [result.clean_dice] * len(eps255))]
    columns += [(attack, values) for attack, values in result.attacks.items()]
    columns.append(("robust", result.robust_dice))
    slicer.util.updateTableFromArray(table, [np.asarray(values, dtype=np.float64) for _, values in columns],
                                     [title for title, _ in columns])
    return table


def resultPlot(tableNode, seriesNames, name):
    """A plot chart node with one line per column of ``seriesNames`` against the eps column."""
    chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", nodes.uniqueNodeName(name))
    chart.SetTitle("Mean foreground Dice vs eps")
    chart.SetXAxisTitle("eps (1/255 of the intensity range)")
    chart.SetYAxisTitle("Dice")
    xColumn = tableNode.GetTable().GetColumn(0).GetName()
    for index, series in enumerate(seriesNames):
        plot = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", nodes.uniqueNodeName(f"{name} {series}"))
        plot.SetAndObserveTableNodeID(tableNode.GetID())
        plot.SetXColumnName(xColumn)
        plot.SetYColumnName(series)
        plot.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        plot.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        plot.SetColor(*segmentColor(index))
        chart.AddAndObservePlotSeriesNodeID(plot.GetID())
    return chart


class ROGRobustnessLogic:
    """Evaluates a ROG model's adversarial robustness on a volume and its reference segmentation."""

    def __init__(self):
        self.lastOutputs = None

    def evaluate(self, volumeNode, referenceSegmentationNode, modelPath, eps=DEFAULT_EPS, attacks=DEFAULT_ATTACKS,
                 iterations=None, squareQueries=None, showEps=None, device="auto", progress=None, cancel=None):
        """Attack the model on the volume for every eps and add the result nodes; returns :class:`RobustnessOutputs`.

        ``eps`` in 1/255 of the model's valid intensity range (the paper's 8/255); the adversarial
        volume, perturbation and attacked segmentation are those of ``showEps`` (default: the
        largest eps), the worst over the attacks.  Nothing is added when it fails or is cancelled.
        """
        started = time.time()
        eps = parseEps(",".join(str(e) for e in eps)) if not isinstance(eps, str) else parseEps(eps)
        attacks = [a.strip().lower() for a in attacks if a.strip()]
        unknown = [a for a in attacks if a not in ATTACK_CHOICES]
        if unknown or not attacks:
            raise InputError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACK_CHOICES)}")
        showEps = max(eps) if showEps is None else float(showEps)
        if showEps not in eps:
            raise InputError(f"the eps to show ({showEps:g}) is not among the evaluated eps {eps}")
        deviceName = requireDevice(device)
        path = requireModelPath(modelPath)
        requireModuleDependencies("ROGSegment")
        from deepimaging.core.checkpoint import load_checkpoint
        from deepimaging.robustness.rog import attacked_case, evaluate_rog_robustness

        info = modelInfoFromHeader(path, load_checkpoint(path, method="rog").header)
        if len(info.channels) != 1:
            raise InputError(f"model '{info.name}' needs {len(info.channels)} input volumes; this module feeds it one")
        report(progress, 0.0, "Reading the volume and the reference")
        image, reference = referenceLabelImage(referenceSegmentationNode, volumeNode, info.labels)
        logging.info(f"Robustness of {path} on '{volumeNode.GetName()}': eps {eps}/255, attacks {attacks}")
        result, prepared = evaluate_rog_robustness(
            path, [(image, reference)], eps, attacks=attacks, iterations=iterations, square_queries=squareQueries,
            keep_examples=True, device=deviceName, progress=sub_progress(progress, 0.02, 0.9), cancel=cancel)
        report(progress, 0.9, "Segmenting the adversarial volume")
        attacked = attacked_case(path, image, prepared[0], result.examples[eps.index(showEps)][0])
        report(progress, 0.95, "Adding the results to the scene")
        outputs = self._addNodes(volumeNode, info, result, eps, showEps, attacked, started)
        self.lastOutputs = outputs
        report(progress, 1.0, "Done")
        return outputs

    @staticmethod
    def _addNodes(volumeNode, info, result, eps, showEps, attacked, started):
        base, added = volumeNode.GetName(), []
        try:
            suffix = f"(eps {showEps:g}/255)"
            adversarial = nodes.volumeNodeFromImage(attacked.adversarial, f"{base} adversarial {suffix}")
            perturbation = nodes.volumeNodeFromImage(attacked.perturbation, f"{base} perturbation {suffix}")
            added += [adversarial, perturbation]
            for node in (adversarial, perturbation):
                nodes.placeLikeInput(node, volumeNode)
            segmentation = ROGSegmentLogic.createSegmentation(
                attacked.labels.array, info.foregroundLabels, adversarial, f"{base} attacked segmentation {suffix}")
            added.append(segmentation)
            table = resultTable(result, eps, f"{base} robustness")
            added.append(table)
            chart = resultPlot(table, ["clean", *result.attacks, "robust"], f"{base} robustness")
            added.append(chart)
        except Exception:
            for node in added:
                slicer.mrmlScene.RemoveNode(node)
            raise
        return RobustnessOutputs(result, showEps, attacked.dice, adversarial, perturbation, segmentation, table, chart,
                                 time.time() - started)
