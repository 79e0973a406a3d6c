"""What the "Level set refine" Segment Editor effect does on Apply, Qt-free.

``SegmentEditorEffect.onApply`` only confirms that the segment is visible, shows the wait
cursor and calls :func:`applyRefinementEffect` with its scripted effect and
``slicer.util.errorDisplay``; the order of the steps and the error reporting live here, so
the headless tests run exactly what Slicer runs (with ``vtkSlicerSegmentEditorLogic``
standing in for the scripted effect).

The order matters for Undo: the dependency step and the computation come first, and the undo
state is saved only when a refined labelmap is ready to be written.  Declining the torch
installation, an empty segment, a bad source image or a failed computation therefore leave
the segment and the undo stack as they were, and every failure reaches the user as a message.
"""

import contextlib
import logging

from DeepImagingCommonLib.dependencies import DependencyError
from deepimaging.core.errors import DeepImagingError

from .learned import METHOD_CLASSIC, METHOD_LEARNED, requireMethod
from .logic import refineOrientedLabelmap

# Parameter names of the effect (stored in the segment editor node).
MU_PARAMETER = "Mu"
MAX_ITERATIONS_PARAMETER = "MaxIterations"
METHOD_PARAMETER = "Method"  # "classic" (Chan-Vese) or "learned" (a trained checkpoint)
CHECKPOINT_PARAMETER = "Checkpoint"  # path of the learned refiner's checkpoint

EFFECT_TITLE = "Level set refine"

_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def isOutOfMemoryError(error):
    """True for ``MemoryError``, torch's ``OutOfMemoryError`` and "out of memory" RuntimeErrors.

    torch is not imported: it may not be installed when the error comes from elsewhere.
    """
    if isinstance(error, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__):
        return True
    if isinstance(error, RuntimeError):
        text = str(error).lower()
        return any(message in text for message in _MEMORY_MESSAGES)
    return False


def isExpectedError(error):
    """True for failures whose message says everything: bad input, dependencies, memory.

    Other exceptions are bugs or surprises: their traceback belongs in the log.
    """
    return isinstance(error, (DeepImagingError, DependencyError)) or isOutOfMemoryError(error)


def describeEffectError(error):
    """The message shown to the user for an exception raised while applying the effect.

    Failures raised on purpose (bad input, a level set that vanished, a declined or failed
    installation) show their own text; running out of memory says so and what to try; a
    package that cannot be imported says so; anything else names the exception's type.
    """
    if isinstance(error, (DeepImagingError, DependencyError)):
        return f"{EFFECT_TITLE}: {error}"
    if isOutOfMemoryError(error):
        return (f"{EFFECT_TITLE} ran out of memory ({type(error).__name__}: {error}).\n"
                "Refine a smaller region (a smaller segment, or a source volume cropped with Crop Volume), "
                "or run on the CPU: start Slicer with the environment variable DEEPIMAGING_DEVICE=cpu.")
    if isinstance(error, ImportError):
        return (f"{EFFECT_TITLE} failed: a Python package it needs could not be imported "
                f"({type(error).__name__}: {error}).\n"
                "Click Apply again to install the missing packages, or restart Slicer after an installation.")
    return f"{EFFECT_TITLE} failed: {type(error).__name__}: {error}"


def effectParameters(effect):
    """The keyword arguments of :func:`refineOrientedLabelmap` from the effect's parameters.

    An unset method (an editor node saved before the learned method existed) is classic.
    """
    method = requireMethod(effect.parameter(METHOD_PARAMETER))
    if method == METHOD_LEARNED:
        return {"method": METHOD_LEARNED, "checkpoint": effect.parameter(CHECKPOINT_PARAMETER)}
    return {"method": METHOD_CLASSIC, "mu": effect.doubleParameter(MU_PARAMETER),
            "max_iterations": effect.integerParameter(MAX_ITERATIONS_PARAMETER)}


def applyRefinementEffect(effect, ensureDependencies, reportError, modificationMode, busy=None):
    """Refine the selected segment in place, as the effect's Apply button does; return whether it changed.

    :param effect: the scripted effect, or anything offering its methods used here:
        ``sourceVolumeImageData()``, ``selectedSegmentLabelmap()``, ``parameter(name)``,
        ``doubleParameter(name)``, ``integerParameter(name)``, ``saveStateForUndo()``,
        ``defaultModifierLabelmap()`` and ``modifySelectedSegmentByLabelmap(labelmap, mode)``.
        Its "Method" parameter chooses classic (Mu, MaxIterations) or learned (Checkpoint).
    :param ensureDependencies: called first, with no arguments; installs or checks torch and
        the module's packages (in Slicer ``ensureModuleDependencies("LevelSetRefine",
        askConfirmation=True)``) and raises ``DependencyError`` when they are missing or the
        user declines the installation.
    :param reportError: called with one message string when anything fails.
    :param modificationMode: the editor's "set" mode
        (``slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet``); the segment is
        written through the editor so its masking settings (editable area, overwrite of other
        segments) apply.
    :param busy: optional context-manager factory wrapped around the long part (computation
        and writing), not around the dependency step, which may ask the user; in Slicer it
        shows the wait cursor.

    Steps: (1) dependencies, (2) validate the inputs and compute the refined labelmap (the
    segment is not touched), (3) save the undo state, (4) write the labelmap.  Any exception
    in these steps is reported through ``reportError`` (see :func:`describeEffectError`) and
    ``False`` is returned; no exception escapes, and no undo state is saved unless the
    refinement produced a labelmap.
    """
    busy = busy or contextlib.nullcontext
    try:
        ensureDependencies()
        with busy():
            refined = refineOrientedLabelmap(
                effect.sourceVolumeImageData(), effect.selectedSegmentLabelmap(), **effectParameters(effect))
            # Only now can the segment change: Undo returns to this state.
            effect.saveStateForUndo()
            modifierLabelmap = effect.defaultModifierLabelmap()
            modifierLabelmap.DeepCopy(refined)
            effect.modifySelectedSegmentByLabelmap(modifierLabelmap, modificationMode)
    except Exception as error:  # every failure becomes a message, none escapes into Qt's event loop
        message = describeEffectError(error)
        if isExpectedError(error):
            logging.warning(message)
        else:
            logging.exception(message, exc_info=error)
        reportError(message)
        return False
    return True
