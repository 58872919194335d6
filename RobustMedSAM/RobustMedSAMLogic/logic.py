"""The module's logic without GUI: parameters, volume segmentation into segments, IoU table and plot.

:class:`RobustMedSAMBridgeLogic` is what the module's ``RobustMedSAMLogic`` (a
``ScriptedLoadableModuleLogic``), both effects and the batch script ``Scripts/segment_volume.py`` call.
Engine work goes through an :class:`~.engine.EngineSession`: the ``...Request`` methods read MRML here and
return at once (the result arrives in ``on_done``); the plain methods wait for it (batch mode, scripts).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from RobustMedSAMLib.stop_rules import DEFAULT_RULE, RULE_DEFAULTS

from . import segments, volumes
from .engine import EngineSession, ModelChoice, shared_session  # noqa: F401 (ModelChoice re-exported)

PARAMETER_TAG = "RobustMedSAM"
IOU_SERIES_ATTRIBUTE = "RobustMedSAM.IoUSeries"  # marks the plot series nodes :meth:`iouPlot` made


@dataclass
class Settings:
    """Module settings, stored as strings on a ``vtkMRMLScriptedModuleNode`` (singleton tag "RobustMedSAM")."""

    model: str = "robustmedsam"
    checkpoint: str = ""
    device: str = "auto"
    cacheMB: float = 1024.0
    fp16Cache: bool = False
    precision: str = "auto"                                             # auto / fp32 / bf16 (engine.PRECISION_CHOICES)
    intensity: str = "display"
    axis: str = "k"
    stopRule: str = DEFAULT_RULE                                        # see RobustMedSAMLib.stop_rules
    iouThreshold: float = RULE_DEFAULTS[DEFAULT_RULE]["iou_threshold"]
    projection: str = "auto"                                            # auto: the model's (boxes for box-trained)
    boxExtension: float = RULE_DEFAULTS[DEFAULT_RULE]["box_extension"]
    propagate: bool = True
    multimask: str = "auto"
    allowDownload: bool = True

    def model_choice(self) -> ModelChoice:
        return ModelChoice(self.model, self.checkpoint, self.device, None, float(self.cacheMB), bool(self.fp16Cache),
                           self.precision)


def _parse(kind, text: str):
    if kind is bool or kind == "bool":
        return text.strip().lower() in ("1", "true", "yes", "on")
    if kind is float or kind == "float":
        return float(text)
    if kind is int or kind == "int":
        return int(text)
    return text


class RobustMedSAMBridgeLogic:
    """GUI-free logic. ``scene``: the MRML scene (default ``slicer.mrmlScene``); ``engine``: a shared
    :class:`~.engine.EngineSession` (created from the settings if omitted)."""

    def __init__(self, scene=None, engine: Optional[EngineSession] = None) -> None:
        import slicer

        self.scene = scene if scene is not None else slicer.mrmlScene
        self.engine = engine
        self.last_result = None
        self._writers: Dict[int, Tuple[object, segments.SegmentWriter]] = {}  # id(node) -> (node, writer)

    # parameters -----------------------------------------------------------------------------------
    def getParameterNode(self):
        """The singleton ``vtkMRMLScriptedModuleNode`` holding :class:`Settings` (created with defaults)."""
        import slicer

        node = self.scene.GetSingletonNode(PARAMETER_TAG, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(PARAMETER_TAG)
            node.SetName(PARAMETER_TAG)
            node.SetAttribute("ModuleName", PARAMETER_TAG)
            node = self.scene.AddNode(node)
        defaults = Settings()
        for f in fields(Settings):
            if not node.GetParameter(f.name):
                node.SetParameter(f.name, str(getattr(defaults, f.name)))
        return node

    def settings(self, node=None) -> Settings:
        node = node or self.getParameterNode()
        values = {}
        for f in fields(Settings):
            text = node.GetParameter(f.name)
            if text:
                values[f.name] = _parse(f.type if not isinstance(f.type, str) else f.type, text)
        return Settings(**values)

    def setSettings(self, settings: Settings, node=None) -> None:
        node = node or self.getParameterNode()
        wasModifying = node.StartModify()
        try:
            for f in fields(Settings):
                node.SetParameter(f.name, str(getattr(settings, f.name)))
        finally:
            node.EndModify(wasModifying)

    def engineSession(self) -> EngineSession:
        """The engine session configured from the current settings; it forgets this scene's volumes when
        the scene closes (also when only the effects are used and the module panel was never opened)."""
        choice = self.settings().model_choice()
        if self.engine is None:
            self.engine = shared_session(choice)
        else:
            self.engine.configure(choice)
        self.engine.watch_scene(self.scene)
        return self.engine

    # nodes ---------------------------------------------------------------------------------------
    def volumeFromNode(self, volumeNode):
        """Engine ``Volume`` (array ``(K, J, I)``, ``ijk_to_lps``) of a scalar volume node."""
        return volumes.volume_from_node(volumeNode)

    def promptsFromMarkups(self, markupsNodes: Sequence, volumeNode, axis="k"):
        from .markups import prompts_from_markups_nodes

        return prompts_from_markups_nodes(markupsNodes, volumeNode, axis)

    def createSegmentationNode(self, volumeNode, name: Optional[str] = None):
        """A new segmentation node whose geometry is the volume's (with display nodes)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                            name or f"{volumeNode.GetName()} RobustMedSAM")
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        node.GetSegmentation().SetSourceRepresentationName(segments.BINARY_LABELMAP)
        if volumeNode.GetParentTransformNode() is not None:
            node.SetAndObserveTransformNodeID(volumeNode.GetParentTransformNode().GetID())
        return node

    def writer(self, segmentationNode, volumeNode, access=None) -> segments.SegmentWriter:
        """The :class:`~.segments.SegmentWriter` (Slicer's editor logic, or the 5.8 fallback) of these nodes;
        one per segmentation node *object* (node IDs are reused after a scene close), reused while the source
        volume stays the same, so :meth:`undo` reverts the last write and no editor node piles up."""
        key = id(segmentationNode)
        entry = self._writers.get(key)
        if (access is None and entry is not None and entry[0] is segmentationNode
                and entry[1].volume_node is volumeNode):
            return entry[1]
        if entry is not None:
            entry[1].close()
        if access is None:
            access = segments.editor_access(self.scene, segmentationNode, volumeNode)
        w = segments.SegmentWriter(access, segmentationNode, volumeNode)
        self._writers[key] = (segmentationNode, w)
        return w

    def _writer_of(self, segmentationNode) -> Optional[segments.SegmentWriter]:
        entry = self._writers.get(id(segmentationNode))
        return entry[1] if entry is not None and entry[0] is segmentationNode else None

    def canUndo(self, segmentationNode) -> bool:
        w = self._writer_of(segmentationNode)
        return bool(w and w.can_undo())

    def undo(self, segmentationNode) -> bool:
        """Revert the last write of :meth:`segmentVolume` into ``segmentationNode``."""
        w = self._writer_of(segmentationNode)
        return bool(w and w.undo())

    def forgetScene(self) -> None:
        """Drop every undo writer and its helper nodes (call on scene close: their nodes are gone)."""
        for _, w in self._writers.values():
            w.close()
        self._writers.clear()
        self.last_result = None

    # processing ----------------------------------------------------------------------------------
    def segmentVolumeRequest(self, volumeNode, objects, *, axis="k", propagate: bool = True,
                             iouThreshold: Optional[float] = None, projection: Optional[str] = "auto",
                             boxExtension: Optional[float] = None, sliceRange: Optional[Tuple[int, int]] = None,
                             intensity="display", engine=None, stopRule: Optional[str] = None, on_progress=None,
                             on_done=None):
        """Start segmenting ``objects`` in the engine (nothing written yet); returns the request, whose result
        is an engine ``VolumeResult`` for :meth:`writeResult`. MRML is read here (GUI thread). None (and
        projection "auto") take the engine's defaults: the stop rule's threshold and box extension, the
        model's projection."""
        engine = engine or self.engineSession()
        ax = volumes.volume_from_node(volumeNode).resolve_axis(axis)
        options = {"propagate_volume": bool(propagate), "slice_range": tuple(sliceRange) if sliceRange else None,
                   "iou_threshold": None if iouThreshold is None else float(iouThreshold),
                   "projection": None if projection in (None, "auto") else projection,
                   "box_extension": None if boxExtension is None else float(boxExtension), "stop_rule": stopRule}
        return engine.segment_volume(volumeNode, list(objects), ax, options, intensity, on_progress, on_done)

    def writeResult(self, volumeNode, result, segmentationNode=None, access=None, replaceSegments: bool = True):
        """Write an engine ``VolumeResult``: one segment per object, all in one undo step (GUI thread).
        Returns ``(segmentationNode, {object name: segment ID}, result)``."""
        if segmentationNode is None:
            segmentationNode = self.createSegmentationNode(volumeNode)
        writer = self.writer(segmentationNode, volumeNode, access)
        ids: Dict[str, str] = {}
        writer.begin()
        for obj in result.objects:
            sid = writer.ensure_segment(obj.name, obj.color, replace=replaceSegments)
            writer.set_segment(sid, obj.mask, undo=False)
            ids[obj.name] = sid
        self.last_result = result
        return segmentationNode, ids, result

    def segmentVolume(self, volumeNode, objects, segmentationNode=None, *, axis="k", propagate: bool = True,
                      iouThreshold: Optional[float] = None, projection: Optional[str] = "auto",
                      boxExtension: Optional[float] = None, sliceRange: Optional[Tuple[int, int]] = None,
                      intensity="display", engine=None, stopRule: Optional[str] = None,
                      progress: Optional[Callable[[int, int, str], None]] = None, access=None,
                      replaceSegments: bool = True, timeout: Optional[float] = None):
        """Segment objects in a volume and write one segment per object. Can be used without GUI widget
        (it waits for the engine: batch mode, scripts; the module panel uses :meth:`segmentVolumeRequest`).

        Arguments:
            volumeNode: the source ``vtkMRMLScalarVolumeNode``.
            objects: engine ``ObjectPrompts`` (from :meth:`promptsFromMarkups` or
                ``RobustMedSAMLib.prompt_files.read_prompts``) on slices along ``axis``.
            segmentationNode: where to write (a new node with the volume's geometry if None).
            axis: 0/1/2, k/j/i or axial/coronal/sagittal; propagate, iouThreshold, projection, boxExtension,
                sliceRange, stopRule: as in the engine's ``segment_volume`` (None / "auto": its defaults);
                intensity: see ``engine.INTENSITY_CHOICES``.
            progress: ``progress(done, total, message)``.
            access: how to write (default: Slicer's segment editor logic with the Segment Editor's masking
                settings, or the 5.8 fallback); all objects are written in one undo step.
            replaceSegments: an object whose name matches an existing segment replaces its content; False
                always adds new segments.

        Returns ``(segmentationNode, {object name: segment ID}, VolumeResult)``. Nothing is written if the
        engine fails.
        """
        engine = engine or self.engineSession()
        on_progress = None if progress is None else (
            lambda r: progress(int(r.done), int(r.total or 0), r.message))
        request = self.segmentVolumeRequest(volumeNode, objects, axis=axis, propagate=propagate,
                                            iouThreshold=iouThreshold, projection=projection,
                                            boxExtension=boxExtension, sliceRange=sliceRange, intensity=intensity,
                                            engine=engine, stopRule=stopRule, on_progress=on_progress)
        result = engine.wait(request, timeout).value()
        return self.writeResult(volumeNode, result, segmentationNode, access, replaceSegments)

    process = segmentVolume

    def robustnessCheck(self, volumeNode, objects, referenceSegmentationNode=None, *, tableNode=None,
                        progress: Optional[Callable[[int, int, str], None]] = None, timeout: Optional[float] = None,
                        **kwargs):
        """The engine's robustness check (``RobustMedSAMLib.robustness``) on a volume node: the objects
        segmented clean and under each corruption, Dice vs clean and vs the reference node's segments of the
        same names. Writes nothing into segmentations; waits; returns ``(rows, vtkMRMLTableNode)``.

        ``kwargs``: those of :meth:`robustnessRequest`.
        """
        on_progress = None if progress is None else (
            lambda r: progress(int(r.done), int(r.total or 0), r.message))
        request = self.robustnessRequest(volumeNode, objects, referenceSegmentationNode, on_progress=on_progress,
                                         **kwargs)
        engine = kwargs.get("engine") or self.engineSession()
        rows = engine.wait(request, timeout).value()
        return rows, self.robustnessTable(rows, tableNode)

    def robustnessRequest(self, volumeNode, objects, referenceSegmentationNode=None, *, axis="k",
                          corruptions: Optional[Sequence[str]] = None, severity: int = 3, seed: int = 0,
                          intensity="display", engine=None, on_progress=None, on_done=None, **options):
        """Check and read everything here (GUI thread), then start the check in the engine; returns the
        request (result: the rows for :meth:`robustnessTable`).

        Bad corruption names, severity or reference segment names raise ValueError here, before any model
        work. ``options``: propagation options of the engine (``iou_threshold``, ``projection``, ...).
        """
        from RobustMedSAMLib.robustness import check_conditions, reference_masks

        names = check_conditions(corruptions, severity)
        engine = engine or self.engineSession()
        objects = list(objects)
        volume = volumes.volume_from_node(volumeNode)
        reference = None
        if referenceSegmentationNode is not None:
            segmentation = referenceSegmentationNode.GetSegmentation()
            named = {}
            for n in range(segmentation.GetNumberOfSegments()):
                sid = segmentation.GetNthSegmentID(n)
                named[segmentation.GetSegment(sid).GetName()] = volumes.segment_mask(
                    referenceSegmentationNode, sid, volumeNode)
            reference = reference_masks(named, objects)  # {object name: mask}; raises on a missing name
        return engine.robustness(volumeNode, objects, volume.resolve_axis(axis), reference, names, severity, seed,
                                 options, intensity, on_progress, on_done)

    def robustnessTable(self, rows, tableNode=None):
        """A ``vtkMRMLTableNode`` of robustness rows: corruption, severity, object, voxels, Dice vs clean,
        Dice vs reference (NaN without a reference)."""
        import vtk

        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", "RobustMedSAM robustness")
        table = tableNode.GetTable()
        table.Initialize()
        columns = [("corruption", vtk.vtkStringArray), ("severity", vtk.vtkIntArray), ("object", vtk.vtkStringArray),
                   ("voxels", vtk.vtkIntArray), ("Dice vs clean", vtk.vtkDoubleArray),
                   ("Dice vs reference", vtk.vtkDoubleArray)]
        arrays = []
        for name, kind in columns:
            arrays.append(kind())
            arrays[-1].SetName(name)
            table.AddColumn(arrays[-1])
        for r in rows:
            values = (r.corruption, r.severity, r.object, r.voxels, r.dice_vs_clean,
                      float("nan") if r.dice_vs_reference is None else r.dice_vs_reference)
            for array, value in zip(arrays, values):
                array.InsertNextValue(value)
        tableNode.Modified()
        return tableNode

    # reports -------------------------------------------------------------------------------------
    def iouTable(self, result, tableNode=None, name: str = "RobustMedSAM IoU"):
        """A ``vtkMRMLTableNode`` with per-slice predicted IoU (and inter-slice IoU) per object.

        ``result``: an engine ``VolumeResult`` or a ``PropagationResult`` (or ``{name: PropagationResult}``).
        Columns: ``slice``, then ``<object> predicted IoU`` and ``<object> slice-to-slice IoU``; slices an
        object did not reach are NaN.
        """
        import vtk

        runs = self._runs(result)
        indices = sorted({row["index"] for rows in runs.values() for row in rows})
        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        table = tableNode.GetTable()
        table.Initialize()
        col = vtk.vtkIntArray()
        col.SetName("slice")
        for i in indices:
            col.InsertNextValue(int(i))
        table.AddColumn(col)
        for obj, rows in runs.items():
            by_index = {r["index"]: r for r in rows}
            for key, label in (("predicted_iou", "predicted IoU"), ("interslice_iou", "slice-to-slice IoU")):
                arr = vtk.vtkDoubleArray()
                arr.SetName(f"{obj} {label}")
                for i in indices:
                    v = by_index.get(i, {}).get(key)
                    arr.InsertNextValue(float("nan") if v is None else float(v))
                table.AddColumn(arr)
        tableNode.Modified()
        return tableNode

    def iouPlot(self, tableNode, chartNode=None, name: str = "RobustMedSAM IoU"):
        """A ``vtkMRMLPlotChartNode`` plotting each ``* predicted IoU`` column of :meth:`iouTable` per slice.
        Re-plotting into ``chartNode`` replaces the series nodes made here before (removed from the scene)."""
        if chartNode is None:
            chartNode = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
        old = [chartNode.GetNthPlotSeriesNode(n) for n in range(chartNode.GetNumberOfPlotSeriesNodes())]
        chartNode.RemoveAllPlotSeriesNodeIDs()
        for series in old:
            if series is not None and series.GetAttribute(IOU_SERIES_ATTRIBUTE) and series.GetScene() is not None:
                series.GetScene().RemoveNode(series)
        table = tableNode.GetTable()
        for n in range(1, table.GetNumberOfColumns()):
            column = table.GetColumnName(n)
            if not column.endswith("predicted IoU"):
                continue
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", column)
            series.SetAttribute(IOU_SERIES_ATTRIBUTE, "1")
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetXColumnName("slice")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleCircle)
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        chartNode.SetTitle("Predicted IoU per slice")
        chartNode.SetXAxisTitle("slice")
        chartNode.SetYAxisTitle("predicted IoU")
        chartNode.SetYAxisRangeAuto(False)
        chartNode.SetYAxisRange(0.0, 1.05)
        return chartNode

    @staticmethod
    def _runs(result) -> Dict[str, List[dict]]:
        if isinstance(result, dict):
            return {name: r.report() for name, r in result.items()}
        if hasattr(result, "objects"):
            out = {}
            for obj in result.objects:
                rows = obj.propagation.report() if obj.propagation is not None else []
                for index, pred in obj.seeds.items():  # a seed's predicted IoU is the prompt's own
                    for row in rows:
                        if row["index"] == index and row["predicted_iou"] is None:
                            row["predicted_iou"] = float(pred.score)
                    if not rows:
                        rows.append({"index": int(index), "predicted_iou": float(pred.score), "interslice_iou": None})
                out[obj.name] = rows
            return out
        return {"segment": result.report()}

    @staticmethod
    def reportJson(result) -> str:
        """JSON text of an engine ``VolumeResult.report()``."""
        return json.dumps({"objects": result.report()}, indent=1)
