"""RobustMedSAM: degradation-resilient prompt-based segmentation (SAM ViT-B family) for 3D Slicer.

Module (settings, model and weights, segment a volume from markups, IoU plot), Logic (``RobustMedSAMLogic``:
the GUI-free bridge of ``RobustMedSAMLogic/`` plus dependency installation) and self-test. The two Segment
Editor effects ("RobustMedSAM", "RobustMedSAM Propagate") are registered by the hidden modules
``SegmentEditorRobustMedSAM`` and ``SegmentEditorRobustMedSAMPropagate``.

Importing this file needs neither torch nor the engine (it works with ``--no-main-window`` and before the
dependencies are installed); nothing pops up when the module opens. The engine runs in its own process
(``RobustMedSAMLogic.engine``): this process never imports torch, and the panel never waits for the engine.
Settings live on a plain ``vtkMRMLScriptedModuleNode`` read and written by ``RobustMedSAMLogic.logic.Settings``.
"""
import os

import ctk
import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from RobustMedSAMLogic import panel  # settings <-> widgets, tables and plots (plain Python, no engine)

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # pragma: no cover - Slicer < 5.4
    def _(text):
        return text

    def translate(context, text):
        return text


HERE = os.path.dirname(os.path.abspath(__file__))


class RobustMedSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RobustMedSAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["RobustMedSAM developers"]
        self.parent.helpText = _(
            "Prompt-based segmentation that keeps working on noisy, blurred or motion-corrupted images "
            "(RobustMedSAM: MedSAM encoders + RobustSAM decoder, SAM ViT-B family).<br>"
            "In the <b>Segment Editor</b>: the <b>RobustMedSAM</b> effect segments a slice from clicks and boxes; "
            "<b>RobustMedSAM Propagate</b> extends a segment through the volume and stops where the object ends.<br>"
            "Here: choose the model and device, download the weights, and segment a volume from point lists / ROIs."
            "<br>Batch mode: <tt>Slicer --no-main-window --python-script &lt;module folder&gt;/Scripts/segment_volume.py "
            "--input ct.nrrd --prompts prompts.json --output ct.seg.nrrd</tt>.<br>"
            "See <a href='https://github.com/RobustMedSAM/SlicerRobustMedSAM'>the documentation</a>.")
        self.parent.acknowledgementText = _(
            "Built on Segment Anything (Meta AI, Apache-2.0), RobustSAM (MIT), MedSAM (Apache-2.0) and RobustMedSAM "
            "(Li et al., CVPR 2026 CV4Clinic workshop, MIT). Model weights are downloaded from their publishers "
            "and keep their own licenses.")


#
# Widget
#

class RobustMedSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self.tracker = None  # the engine request the panel is waiting for (panel.RequestTracker)
        self.chartNode = None
        self.tableNode = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RobustMedSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.tracker = panel.RequestTracker(
            self.ui.progressBar, self.ui.statusLabel, self._requestFinished,
            guard=lambda message: slicer.util.tryWithErrorDisplay(message, waitCursor=True),
            cancelled_text=_("Cancelled; nothing was changed."))
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RobustMedSAMLogic()

        from RobustMedSAMLogic.engine import INTENSITY_CHOICES, PRECISION_CHOICES  # numpy only, no torch

        self.ui.intensityComboBox.addItems(list(INTENSITY_CHOICES))
        self.ui.precisionComboBox.addItems(list(PRECISION_CHOICES))
        self.ui.axisComboBox.addItems(["k", "j", "i", "axial", "coronal", "sagittal"])
        self.ui.deviceComboBox.addItems(["auto", "cpu", "cuda"])  # refined by the engine once it runs
        self.ui.checkpointPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.checkpointPathLineEdit.nameFilters = ["Checkpoints (*.pth *.safetensors)"]
        self._fillModels()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        panel.connect_settings(self.ui, self.updateParameterNodeFromGUI)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.markupsSelector.connect("checkedNodesChanged()", self.updateButtons)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)  # Undo
        self.ui.downloadButton.connect("clicked(bool)", self.onDownload)
        self.ui.cancelDownloadButton.connect("clicked(bool)", self.onCancelTask)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelTask)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.unloadButton.connect("clicked(bool)", self.onUnload)
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.robustnessButton.connect("clicked(bool)", self.onRobustness)
        self.initializeParameterNode()

    def _engine(self):
        """The shared engine session, pumped by a Qt timer (starts the engine process only when used)."""
        from RobustMedSAMLogic.pump import ensure_pump

        engine = self.logic.engineSession()
        ensure_pump(engine)
        return engine

    def _refreshDevices(self):
        """Devices as the engine's torch sees them (asked of the running engine; nothing imported here)."""
        def done(request):
            if not request.ok:
                return
            devices = list(request.result)
            current = self.logic.settings().device
            wasBlocked = self.ui.deviceComboBox.blockSignals(True)
            self.ui.deviceComboBox.clear()
            self.ui.deviceComboBox.addItems(devices)
            self.ui.deviceComboBox.currentText = current if current in devices else "auto"
            self.ui.deviceComboBox.blockSignals(wasBlocked)

        self._engine().devices(on_done=done)

    def cleanup(self):
        self.removeObservers()
        self.onCancelTask()

    def enter(self):
        self.initializeParameterNode()
        self.updateStatus()

    def exit(self):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        """Cancel what runs (its answer would land in the next scene) and forget nodes of this scene."""
        self.onCancelTask()
        self.tracker.forget()
        self.tableNode = self.chartNode = None
        if self.logic is not None:
            self.logic.forgetScene()
        self.setParameterNode(None)
        self.updateButtons()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, node):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def _fillModels(self):
        """Model names (torch-free engine table); keeps the user's choice (signals blocked while refilling)."""
        try:
            from RobustMedSAMLogic.engine import CUSTOM_CHECKPOINT, model_names

            names = list(model_names()) + [CUSTOM_CHECKPOINT]
        except Exception:  # engine not importable yet (dependencies missing)
            names = ["robustmedsam", "robustsam", "medsam", "sam-vit-b", "litemedsam", "custom checkpoint"]
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        try:
            self.ui.modelComboBox.clear()
            self.ui.modelComboBox.addItems(names)
            if self._parameterNode is not None:
                self.ui.modelComboBox.currentText = self.logic.settings(self._parameterNode).model
        finally:
            self.ui.modelComboBox.blockSignals(wasBlocked)

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            s = self.logic.settings(self._parameterNode)
            panel.show_settings(self.ui, s)
            self.ui.checkpointPathLineEdit.enabled = s.model == "custom checkpoint"
        finally:
            self._updatingGUI = False
        self.updateStatus()
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None or self._updatingGUI:
            return
        self.logic.setSettings(panel.read_settings(self.ui, self.logic.settings(self._parameterNode)),
                               self._parameterNode)

    # status --------------------------------------------------------------------------------------
    def updateStatus(self):
        """Weights and cache status; never imports torch (cheap, no popup)."""
        try:
            from RobustMedSAMLogic.engine import CUSTOM_CHECKPOINT, weights_status

            model = self.ui.modelComboBox.currentText
            if model == CUSTOM_CHECKPOINT:
                path = self.ui.checkpointPathLineEdit.currentPath
                text = f"checkpoint: {path}" if path and os.path.isfile(path) else "choose a checkpoint file"
            else:
                text = weights_status(model)[2]
            missing = self.logic.missingDependencies()
            if missing:
                text += "<br>Python packages to install: " + ", ".join(missing)
            self.ui.installButton.visible = bool(missing)
            self.ui.weightsStatusLabel.text = text
            engine = self.logic.engine
            self.ui.cacheStatusLabel.text = engine.cache_text() if engine is not None else "empty"
        except Exception as e:  # missing or broken packages: a message, never a traceback
            self.ui.weightsStatusLabel.text = f"Python packages missing or broken ({e}); click 'Install dependencies'"
            self.ui.installButton.visible = True

    @property
    def running(self):
        return self.tracker is not None and self.tracker.running

    def updateButtons(self, *args):
        running = self.running
        hasInputs = self.ui.inputVolumeSelector.currentNode() is not None and len(self.ui.markupsSelector.checkedNodes()) > 0
        self.ui.applyButton.enabled = hasInputs and not running
        self.ui.robustnessButton.enabled = hasInputs and not running
        self.ui.downloadButton.enabled = not running
        self.ui.cancelButton.enabled = running
        self.ui.cancelDownloadButton.enabled = running
        seg = self.ui.outputSegmentationSelector.currentNode()
        self.ui.undoButton.enabled = bool(seg is not None and self.logic.canUndo(seg))

    # running engine requests ---------------------------------------------------------------------
    def _track(self, request, what, onResult):
        """Show ``request``'s progress; ``onResult(result)`` runs (GUI thread) if it succeeds; buttons are
        restored however it ends (``panel.RequestTracker``)."""
        self.tracker.track(request, what, onResult, _("Writing the result failed."))
        self.updateButtons()

    def _requestFinished(self):
        self.updateStatus()
        self.updateButtons()

    def onInstall(self):
        with slicer.util.tryWithErrorDisplay(_("Installing the Python packages failed."), waitCursor=True):
            self.logic.setupPythonRequirements()
            self._fillModels()
            self.initializeParameterNode()
        self.updateStatus()

    def onDownload(self):
        with slicer.util.tryWithErrorDisplay(_("The model could not be prepared."), waitCursor=True):
            self.logic.setupPythonRequirements()
            engine = self._engine()

            def loaded(result):
                self.ui.statusLabel.text = engine.describe()
                self._refreshDevices()
                engine.refresh_status(on_done=lambda r: self.updateStatus())

            self._track(engine.load(allow_download=True), "starting the engine and preparing the model...", loaded)

    def onApply(self):
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            self.logic.setupPythonRequirements()
            volumeNode = self.ui.inputVolumeSelector.currentNode()
            s = self.logic.settings()
            objects = self.logic.promptsFromMarkups(self.ui.markupsSelector.checkedNodes(), volumeNode, s.axis)
            engine = self._engine()
            if not engine.is_loaded:
                engine.load(allow_download=s.allowDownload)
            request = self.logic.bridge.segmentVolumeRequest(
                volumeNode, objects, axis=s.axis, propagate=s.propagate, iouThreshold=s.iouThreshold,
                projection=s.projection, boxExtension=s.boxExtension, intensity=s.intensity, engine=engine,
                stopRule=s.stopRule)

            def write(result):
                seg = self.ui.outputSegmentationSelector.currentNode()
                seg, ids, _ = self.logic.writeResult(volumeNode, result, seg)
                self.ui.outputSegmentationSelector.setCurrentNode(seg)
                self.showPlot(result)
                self.ui.statusLabel.text = ", ".join(f"{o.name}: {int(o.mask.sum())} voxels" for o in result.objects)
                engine.refresh_status(on_done=lambda r: self.updateStatus())

            self._track(request, "segmenting...", write)

    def onRobustness(self):
        """The same volume and prompts segmented clean and under each chosen corruption (in the engine);
        the Dice table goes into a table node shown in the layout. Nothing is written into segmentations."""
        with slicer.util.tryWithErrorDisplay(_("The robustness check failed."), waitCursor=True):
            self.logic.setupPythonRequirements()
            volumeNode = self.ui.inputVolumeSelector.currentNode()
            s = self.logic.settings()
            names = [n for n in self.ui.corruptionsLineEdit.text.replace(",", " ").split() if n]
            objects = self.logic.promptsFromMarkups(self.ui.markupsSelector.checkedNodes(), volumeNode, s.axis)
            engine = self._engine()
            if not engine.is_loaded:
                engine.load(allow_download=s.allowDownload)
            request = self.logic.robustnessRequest(
                volumeNode, objects, self.ui.referenceSegmentationSelector.currentNode(), axis=s.axis,
                corruptions=names or None, severity=int(self.ui.severitySpinBox.value), intensity=s.intensity,
                engine=engine, iou_threshold=s.iouThreshold, box_extension=s.boxExtension, stop_rule=s.stopRule,
                projection=None if s.projection == "auto" else s.projection,
                propagate_volume=s.propagate)

            def show(rows):
                from RobustMedSAMLib.robustness import worst_conditions

                panel.show_table(self.logic.robustnessTable(rows))
                self.ui.statusLabel.text = "lowest Dice vs clean: " + ", ".join(
                    f"{name} {d:.2f} ({c})" for name, (d, c) in worst_conditions(rows).items())

            self._track(request, "checking robustness...", show)

    def onCancelTask(self):
        if self.tracker is not None:
            self.tracker.cancel()

    def onClearCache(self):
        if self.logic.engine is not None:
            self.logic.engine.clear_cache()
            self.logic.engine.status = {}
        self.updateStatus()

    def onUnload(self):
        """End the engine process: the model and its encodings leave memory."""
        if self.logic.engine is not None:
            self.onCancelTask()
            self.tracker.forget()
            self.logic.engine.unload()
            self.ui.statusLabel.text = _("Engine stopped; its memory was released. The next action starts it again.")
        self.updateStatus()
        self.updateButtons()

    def onUndo(self):
        seg = self.ui.outputSegmentationSelector.currentNode()
        if seg is not None:
            self.logic.undo(seg)
        self.updateButtons()

    def showPlot(self, result):
        self.tableNode = self.logic.iouTable(result, self.tableNode)
        self.chartNode = self.logic.iouPlot(self.tableNode, self.chartNode)
        panel.show_chart(self.ui.iouPlotWidget, self.chartNode, slicer.mrmlScene)


#
# Logic
#

def _bridge():
    from RobustMedSAMLogic.logic import RobustMedSAMBridgeLogic

    return RobustMedSAMBridgeLogic


class RobustMedSAMLogic(ScriptedLoadableModuleLogic):
    """The module's logic. Can be used without GUI widget: ``segmentVolume``/``process`` (see
    ``RobustMedSAMLogic/logic.py``) write one segment per object through Slicer's segment editor logic."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._bridge = None

    @property
    def bridge(self):
        if self._bridge is None:
            self._bridge = _bridge()(slicer.mrmlScene)
        elif self._bridge.scene is not slicer.mrmlScene:
            self._bridge.scene = slicer.mrmlScene
        return self._bridge

    @property
    def engine(self):
        return self.bridge.engine

    def getParameterNode(self):
        return self.bridge.getParameterNode()

    def settings(self, node=None):
        return self.bridge.settings(node)

    def setSettings(self, settings, node=None):
        self.bridge.setSettings(settings, node)

    def engineSession(self):
        return self.bridge.engineSession()

    def volumeFromNode(self, volumeNode):
        return self.bridge.volumeFromNode(volumeNode)

    def promptsFromMarkups(self, markupsNodes, volumeNode, axis="k"):
        return self.bridge.promptsFromMarkups(list(markupsNodes), volumeNode, axis)

    def segmentVolume(self, volumeNode, objects, segmentationNode=None, **kwargs):
        """See ``RobustMedSAMLogic.logic.RobustMedSAMBridgeLogic.segmentVolume``. Can be used without GUI widget."""
        self.setupPythonRequirements()
        return self.bridge.segmentVolume(volumeNode, objects, segmentationNode, **kwargs)

    process = segmentVolume

    def robustnessCheck(self, volumeNode, objects, referenceSegmentationNode=None, **kwargs):
        """See ``RobustMedSAMLogic.logic.RobustMedSAMBridgeLogic.robustnessCheck``: Dice of the objects under
        each corruption vs clean (and vs a reference segmentation node); returns ``(rows, table node)``."""
        self.setupPythonRequirements()
        return self.bridge.robustnessCheck(volumeNode, objects, referenceSegmentationNode, **kwargs)

    def robustnessRequest(self, volumeNode, objects, referenceSegmentationNode=None, **kwargs):
        """See ``RobustMedSAMBridgeLogic.robustnessRequest``: checks and reads here, the engine does the work."""
        return self.bridge.robustnessRequest(volumeNode, objects, referenceSegmentationNode, **kwargs)

    def robustnessTable(self, rows, tableNode=None):
        return self.bridge.robustnessTable(rows, tableNode)

    def writeResult(self, volumeNode, result, segmentationNode=None):
        """Write an engine ``VolumeResult`` (GUI thread, one undo step)."""
        return self.bridge.writeResult(volumeNode, result, segmentationNode)

    def forgetScene(self):
        """Scene closed: drop undo writers and the engine's copies of this scene's volumes."""
        self.bridge.forgetScene()
        if self.bridge.engine is not None:
            self.bridge.engine.forget_scene()

    def canUndo(self, segmentationNode):
        return self.bridge.canUndo(segmentationNode)

    def undo(self, segmentationNode):
        return self.bridge.undo(segmentationNode)

    def iouTable(self, result, tableNode=None):
        return self.bridge.iouTable(result, tableNode)

    def iouPlot(self, tableNode, chartNode=None):
        return self.bridge.iouPlot(tableNode, chartNode)

    def missingDependencies(self):
        from RobustMedSAMLogic.dependencies import plan_installation, read_requirements

        torchNeeded, others = plan_installation(read_requirements(os.path.join(HERE, "Resources", "requirements.txt")))
        return (["torch"] if torchNeeded else []) + others

    def setupPythonRequirements(self):
        """Install missing packages after one confirmation (PyTorch via the PyTorch extension)."""
        from RobustMedSAMLogic.dependencies import ensure_dependencies

        ensure_dependencies(os.path.join(HERE, "Resources", "requirements.txt"))


#
# Test
#

# Slicer looks for <Module>Test in this module ("Reload and Test", ctest py_RobustMedSAM): the self-test lives
# in its own file and is imported here.
from RobustMedSAMTesting.selftest import RobustMedSAMTest  # noqa: E402,F401
