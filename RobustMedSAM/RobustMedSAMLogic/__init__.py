"""GUI-free bridge between 3D Slicer's MRML scene and the RobustMedSAM engine (``RobustMedSAMLib``).

Everything here imports only ``slicer`` (MRML/segmentation classes, no Qt), ``vtk``, numpy and the engine,
so it runs in the Slicer application, in ``Slicer --no-main-window`` batch mode and on the ``slicer-core``
wheel (headless tests). torch is never imported here: the engine runs in its own process (in batch mode and
tests it may run in-process, through the same requests).

Modules:

* :mod:`.volumes` -- scalar volume node <-> engine :class:`~RobustMedSAMLib.volume_io.Volume` (exact
  IJK/RAS geometry), masks <-> ``vtkOrientedImageData``, reading a segment on a volume's voxel grid.
* :mod:`.segments` -- writing masks into segments the way the Segment Editor does (masking, overwrite,
  undo), and the preview segmentation.
* :mod:`.markups` -- point list / ROI markups nodes -> engine prompts.
* :mod:`.engine` -- the engine process (``RobustMedSAMLib.worker``) as the module and both effects share it:
  model choice, volumes sent once, requests that return at once and answer in ``on_done``.
* :mod:`.pump` -- the Qt timer that reads the engine's answers while requests are pending (Slicer only).
* :mod:`.interaction` -- slice-view clicks/drags -> 2D prompts, prompt editing, preview/apply/cancel.
* :mod:`.propagation` -- the propagate effect's session (seeds from a segment, repropagation, apply).
* :mod:`.logic` -- :class:`~.logic.RobustMedSAMBridgeLogic`: parameters, ``segmentVolume``/``process``, IoU
  table and plot; the batch script and the module's Logic use it.
* :mod:`.panel` -- the module panel's Qt-free plumbing: settings <-> widgets, the running-request tracker,
  tables and plots in the layout.
* :mod:`.headless` -- the MRML scene set-up that makes segments work without the Slicer application.
* :mod:`.dependencies` -- which Python requirements are missing, and installing them inside Slicer.
"""
__all__ = ["volumes", "segments", "markups", "engine", "pump", "interaction", "propagation", "logic",
           "panel", "headless", "dependencies"]
