"""An MRML scene that can hold segments without the Slicer application (``slicer-core`` or plain Python).

The Slicer application attaches module logics to its scene at start-up; without them a bare scene cannot
create binary labelmap segments ("Unable to construct empty representation type 'Binary labelmap'") and
``slicer.util``'s array helpers, which use ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()``, fail.
:func:`make_headless_scene` does the same set-up by hand. Inside Slicer, use ``slicer.mrmlScene`` instead.
"""
from __future__ import annotations

import types
from typing import Dict, Tuple

_KEEP: list = []  # logics must outlive the scene they are attached to


def in_slicer_application() -> bool:
    """True inside the Slicer application (with or without main window), False on slicer-core."""
    import slicer

    return getattr(slicer, "app", None) is not None


def make_headless_scene(quiet: bool = True, set_globals: bool = True) -> Tuple["object", Dict[str, object]]:
    """A new ``vtkMRMLScene`` with the application, colour, volumes, terminologies, segmentations, markups
    and subject hierarchy logics attached; returns ``(scene, {name: logic})``.

    ``set_globals`` makes it ``slicer.mrmlScene`` and provides ``slicer.modules.<name>.logic()`` (what
    ``slicer.util`` needs); never use this inside the Slicer application.
    """
    import slicer
    import vtk

    if quiet:
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetSliceLogics(vtk.vtkCollection())
    app.SetViewLogics(vtk.vtkCollection())
    logics: Dict[str, object] = {"application": app}
    for name, cls in [("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Terminologies", slicer.vtkSlicerTerminologiesModuleLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("Markups", slicer.vtkSlicerMarkupsLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)]:
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    _KEEP.append((scene, logics))
    del _KEEP[:-8]
    if set_globals:
        slicer.mrmlScene = scene
        slicer.modules = types.SimpleNamespace(**{
            key: types.SimpleNamespace(logic=(lambda lg=lg: lg)) for key, lg in logics.items()})
    return scene, logics
