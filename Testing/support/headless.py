"""A real MRML scene from the ``slicer-core`` wheel, wired the way Slicer's application wires it.

With this wiring ``slicer.util``'s volume and segment helpers and the module Logic run exactly
as inside Slicer (see shared SLICER-CORE.md for why each step is needed).  Plain Python (no
pytest), so the Slicer-like subprocess tests use it too.
"""

import types

import slicer
import slicer.util  # noqa: F401  (the segment and volume helpers the Logic uses)


class HeadlessSlicer:
    """The scene and the logics a test may need (``slicer.mrmlScene`` is ``scene``)."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.color_logic = self.app_logic.GetColorLogic()
        self.color_logic.SetMRMLScene(self.scene)
        self.color_logic.AddDefaultColorNodes()
        self.volumes_logic = slicer.vtkSlicerVolumesLogic()
        self.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        for logic in (self.volumes_logic, self.segmentations_logic):
            logic.SetMRMLScene(self.scene)
            logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic("Colors", self.color_logic)
        self.app_logic.SetModuleLogic("Volumes", self.volumes_logic)
        self.app_logic.SetModuleLogic("Segmentations", self.segmentations_logic)

    def install(self):
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(
            colors=_ModuleStub(self.color_logic),
            volumes=_ModuleStub(self.volumes_logic),
            segmentations=_ModuleStub(self.segmentations_logic))

    def close(self):
        self.scene.Clear(1)


class _ModuleStub:
    """What ``slicer.modules.<name>`` offers that slicer.util uses: ``logic()``."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic
