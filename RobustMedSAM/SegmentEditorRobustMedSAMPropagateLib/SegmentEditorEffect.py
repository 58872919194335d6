"""Segment Editor effect "RobustMedSAM Propagate": extends the selected segment from its annotated slices
through the volume (IoU-stopped propagation of the RobustMedSAM engine).

Thin Qt glue around ``RobustMedSAMLogic.propagation.PropagationSession``: the run happens in the engine
process (progress bar, Cancel; the GUI never waits), the result is previewed in a separate node, and Apply
writes it as one undoable modification through ``scriptedEffect.modifySegmentByLabelmap`` (masking
settings respected). After a correction on a slice, Propagate again recomputes only what depends on the
corrected slice. A cancelled or failed run never touches the segmentation; an answer that arrives after
Cancel or after leaving the effect is dropped.
"""
import logging
import os

import qt

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

AXES = [("k (axial for most scans)", "k"), ("j (coronal for most scans)", "j"), ("i (sagittal for most scans)", "i"),
        ("axial", "axial"), ("coronal", "coronal"), ("sagittal", "sagittal")]
PROJECTIONS = ["auto", "mask", "box", "points", "points_and_mask", "single_point"]
STOP_RULES = ["consistency", "micro-sam"]  # RobustMedSAMLib.stop_rules.RULES


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Propagate a segment through the volume with RobustMedSAM."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "RobustMedSAM Propagate"
        scriptedEffect.title = "RobustMedSAM Propagate"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.sessions = None   # RobustMedSAMLogic.propagation.SessionRegistry (created on first use)
        self.session = None
        self.preview = None
        self.active = False
        self._sceneObserver = None
        self.plotTable = self.plotChart = None  # "Show predicted IoU per slice" nodes, reused

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return ("<html>Propagate the selected segment from the slices where it is drawn (e.g. with the RobustMedSAM "
                "effect) to the neighbouring slices, until the object ends: with the consistency rule where a slice "
                "stops looking like the drawn ones (grey levels, image features, area) or overlaps the previous one "
                "less than the IoU threshold."
                "<p><b>Propagate</b> computes a preview (Cancel stops it; nothing is changed), <b>Apply</b> writes it "
                "in one undoable step. After correcting a slice, Propagate again: only the slices that depend on "
                "the correction are recomputed. Erasing a slice beyond the drawn slices ends the object there; "
                "a slice erased between drawn slices stays empty.</html>")

    # options -----------------------------------------------------------------------------------------
    def setupOptionsFrame(self):
        self.axisCombo = qt.QComboBox()
        for label, value in AXES:
            self.axisCombo.addItem(label, value)
        self.scriptedEffect.addLabeledOptionsWidget("Axis:", self.axisCombo)
        self.thresholdSlider = slicer.qMRMLSliderWidget()
        self.thresholdSlider.minimum, self.thresholdSlider.maximum = 0.0, 1.0
        self.thresholdSlider.singleStep, self.thresholdSlider.decimals = 0.05, 2
        self.thresholdSlider.toolTip = "Stop when a slice overlaps the previous one less than this (IoU)."
        self.scriptedEffect.addLabeledOptionsWidget("IoU threshold:", self.thresholdSlider)
        self.projectionCombo = qt.QComboBox()
        self.projectionCombo.addItems(PROJECTIONS)
        self.projectionCombo.toolTip = ("Prompts derived from the previous slice's mask. auto: the model's choice "
                                        "(boxes for models trained with boxes only, such as MedSAM and LiteMedSAM; "
                                        "box + mask otherwise).")
        self.scriptedEffect.addLabeledOptionsWidget("Prompt from mask:", self.projectionCombo)
        self.stopRuleCombo = qt.QComboBox()
        self.stopRuleCombo.addItems(STOP_RULES)
        self.stopRuleCombo.toolTip = ("consistency: stop where the slice stops looking like the annotated one (grey "
                                      "levels, image features, area jumps) or overlaps the previous slice less than "
                                      "the IoU threshold; micro-sam: stop on the IoU threshold only.")
        self.scriptedEffect.addLabeledOptionsWidget("Stop rule:", self.stopRuleCombo)
        rangeRow = qt.QHBoxLayout()
        self.rangeCheck = qt.QCheckBox("Limit to slices")
        self.firstSpin = qt.QSpinBox()
        self.lastSpin = qt.QSpinBox()
        for spin in (self.firstSpin, self.lastSpin):
            spin.maximum = 100000
        rangeRow.addWidget(self.rangeCheck)
        rangeRow.addWidget(self.firstSpin)
        rangeRow.addWidget(qt.QLabel("to"))
        rangeRow.addWidget(self.lastSpin)
        self.scriptedEffect.addOptionsWidget(rangeRow)
        self.fullRunCheck = qt.QCheckBox("Start over (use all non-empty slices as annotations)")
        self.scriptedEffect.addOptionsWidget(self.fullRunCheck)
        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.objectName = self.__class__.__name__ + "Propagate"
        self.scriptedEffect.addOptionsWidget(self.propagateButton)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        row = qt.QHBoxLayout()
        self.cancelButton = qt.QPushButton("Cancel")
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        row.addWidget(self.cancelButton)
        row.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(row)
        self.plotButton = qt.QPushButton("Show predicted IoU per slice")
        self.scriptedEffect.addOptionsWidget(self.plotButton)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        for w, signal in ((self.axisCombo, "currentIndexChanged(int)"), (self.thresholdSlider, "valueChanged(double)"),
                          (self.projectionCombo, "currentIndexChanged(int)"),
                          (self.stopRuleCombo, "currentIndexChanged(int)"), (self.rangeCheck, "toggled(bool)"),
                          (self.firstSpin, "valueChanged(int)"), (self.lastSpin, "valueChanged(int)")):
            w.connect(signal, self.updateMRMLFromGUI)
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.applyButton.connect("clicked()", self.onApply)
        self.plotButton.connect("clicked()", self.onPlot)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Axis", "k")
        from RobustMedSAMLib.stop_rules import DEFAULT_RULE, RULE_DEFAULTS

        self.scriptedEffect.setParameterDefault("IoUThreshold", RULE_DEFAULTS[DEFAULT_RULE]["iou_threshold"])
        self.scriptedEffect.setParameterDefault("Projection", "auto")
        self.scriptedEffect.setParameterDefault("StopRule", DEFAULT_RULE)
        self.scriptedEffect.setParameterDefault("LimitRange", 0)
        self.scriptedEffect.setParameterDefault("FirstSlice", 0)
        self.scriptedEffect.setParameterDefault("LastSlice", 0)

    def updateGUIFromMRML(self):
        widgets = (self.axisCombo, self.thresholdSlider, self.projectionCombo, self.stopRuleCombo, self.rangeCheck,
                   self.firstSpin, self.lastSpin)
        blocked = [w.blockSignals(True) for w in widgets]
        index = self.axisCombo.findData(self.scriptedEffect.parameter("Axis") or "k")
        self.axisCombo.currentIndex = max(index, 0)
        self.thresholdSlider.value = self.scriptedEffect.doubleParameter("IoUThreshold")
        self.projectionCombo.currentText = self.scriptedEffect.parameter("Projection") or "auto"
        self.stopRuleCombo.currentText = self.scriptedEffect.parameter("StopRule") or STOP_RULES[0]
        self.rangeCheck.checked = bool(self.scriptedEffect.integerParameter("LimitRange"))
        self.firstSpin.value = self.scriptedEffect.integerParameter("FirstSlice")
        self.lastSpin.value = self.scriptedEffect.integerParameter("LastSlice")
        for w, b in zip(widgets, blocked):
            w.blockSignals(b)
        self._updateButtons()

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("Axis", self.axisCombo.currentData)
        self.scriptedEffect.setParameter("IoUThreshold", self.thresholdSlider.value)
        self.scriptedEffect.setParameter("Projection", self.projectionCombo.currentText)
        self.scriptedEffect.setParameter("StopRule", self.stopRuleCombo.currentText)
        self.scriptedEffect.setParameter("LimitRange", int(self.rangeCheck.checked))
        self.scriptedEffect.setParameter("FirstSlice", self.firstSpin.value)
        self.scriptedEffect.setParameter("LastSlice", self.lastSpin.value)

    # lifecycle ---------------------------------------------------------------------------------------
    def activate(self):
        self.active = True
        if self._sceneObserver is None:
            self._sceneObserver = slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self._onSceneClose)

    def deactivate(self):
        self.active = False
        self.onCancel()

    def cleanup(self):
        self.deactivate()
        if self._sceneObserver is not None:
            slicer.mrmlScene.RemoveObserver(self._sceneObserver)
            self._sceneObserver = None
        self._forgetSessions()

    def sourceVolumeNodeChanged(self):
        self._forgetSessions()

    def referenceGeometryChanged(self):
        self._forgetSessions()

    def _onSceneClose(self, caller=None, event=None):
        self._forgetSessions()

    def _forgetSessions(self):
        """Drop every session: after a scene close node IDs are reused, and a session made on another
        volume or geometry would read and write the wrong grid."""
        if self.sessions is not None:
            self.sessions.clear()
        self.session = None
        if self.preview is not None:
            self.preview.remove()
            self.preview = None
        self._updateButtons()

    # session -----------------------------------------------------------------------------------------
    def _nodes(self):
        psn = self.scriptedEffect.parameterSetNode()
        if psn is None:
            return None, None, None
        return psn.GetSegmentationNode(), psn.GetSelectedSegmentID(), psn.GetSourceVolumeNode()

    def _logic(self):
        from RobustMedSAMLogic.logic import RobustMedSAMBridgeLogic

        return RobustMedSAMBridgeLogic(slicer.mrmlScene)

    def _engine(self):
        from RobustMedSAMLogic.pump import ensure_pump

        engine = self._logic().engineSession()
        ensure_pump(engine)
        return engine

    def _session(self):
        from RobustMedSAMLogic import segments
        from RobustMedSAMLogic.propagation import SessionRegistry, bind_session, engine_runner

        segNode, segmentID, volumeNode = self._nodes()
        if segNode is None or not segmentID or volumeNode is None:
            raise ValueError("select a segmentation, a segment and a source volume")
        if self.sessions is None:
            self.sessions = SessionRegistry()

        def make():
            writer = segments.SegmentWriter(segments.EffectAccess(self.scriptedEffect, segNode), segNode, volumeNode)
            if self.preview is not None:
                self.preview.remove()
            self.preview = segments.PreviewSegmentation(slicer.mrmlScene, volumeNode, segNode)
            intensity = self._logic().settings().intensity
            return bind_session(segNode, segmentID, volumeNode, engine_runner(self._engine(), volumeNode, intensity),
                                writer, self.preview)

        return self.sessions.get(segNode, segmentID, volumeNode, make)

    def _options(self, volumeNode):
        from RobustMedSAMLogic import volumes
        from RobustMedSAMLogic.propagation import PropagationOptions

        axis = volumes.volume_from_node(volumeNode).resolve_axis(self.axisCombo.currentData)
        n = volumes.shape_of(volumeNode)[axis]
        sliceRange = None
        if self.rangeCheck.checked:
            first, last = sorted((self.firstSpin.value, self.lastSpin.value))
            sliceRange = (max(0, first), min(n - 1, last))
        return PropagationOptions(axis, self.thresholdSlider.value, self.projectionCombo.currentText, None, sliceRange,
                                  self.stopRuleCombo.currentText)

    @property
    def running(self):
        return self.session is not None and self.session.running

    def onPropagate(self):
        if self.running:
            return
        try:
            self.session = self._session()
            _, _, volumeNode = self._nodes()
            plan = self.session.plan(self._options(volumeNode), force_full=self.fullRunCheck.checked)
            engine = self._engine()
            if not engine.is_loaded:
                engine.load(allow_download=False)  # cached weights only; the module's button downloads
        except Exception as e:
            self._status(str(e))
            return
        session = self.session

        def progress(done, total, message):
            if not self.active or session is not self.session:  # (the session drops cancelled runs' progress)
                return
            if total:
                self.progressBar.maximum = int(total)
                self.progressBar.value = int(done)
            self._status(message)

        def done(request):
            self.progressBar.visible = False
            if not self.active or session is not self.session:
                return
            if request.ok:
                session.preview()
                res = session.result
                self._status(f"preview: slices {res.z_range[0]}..{res.z_range[1]}; stopped below: "
                             f"{res.stops['lower'].reason}, above: {res.stops['upper'].reason}. Apply to keep it.")
            elif request.status in ("cancelled", "dropped"):
                self._status("cancelled; the segmentation is unchanged")
            else:
                logging.error(getattr(request.error, "details", "") or str(request.error))
                self._status(f"propagation failed, the segmentation is unchanged: {request.error}")
            self._updateButtons()

        try:
            session.start(plan, progress, done)
        except Exception as e:  # the engine could not be reached (not started, volume unreadable...)
            logging.exception("RobustMedSAM Propagate")
            self._status(f"propagation could not start, the segmentation is unchanged: {e}")
            return
        self.progressBar.visible = session.running
        self.progressBar.value = 0
        what = "correction on slices " + ", ".join(map(str, plan.changed)) if plan.mode == "repropagate" else \
            f"{len(plan.seeds)} annotated slice(s)"
        if session.running:
            self._status(f"propagating from {what}...")
        self._updateButtons()

    def onCancel(self):
        if self.session is not None:
            wasRunning = self.session.running
            self.session.cancel()
            if wasRunning:
                self._status("cancelled; the segmentation is unchanged")
        if hasattr(self, "progressBar"):
            self.progressBar.visible = False
        self._updateButtons()

    def onApply(self):
        if self.session is None or self.session.result is None:
            return
        # a hidden segment: Slicer asks whether to show it; Cancel (NotConfirmed = 0) keeps the result unwritten
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return
        try:
            self.session.apply()
            self._status("applied (Undo reverts the whole propagation)")
        except Exception as e:
            logging.exception("RobustMedSAM Propagate apply")
            self._status(f"apply failed: {e}")
        self._updateButtons()

    def onPlot(self):
        if self.session is None:
            return
        result = self.session.result if self.session.result is not None else self.session.last_applied
        if result is None:
            return
        logic = self._logic()
        live = lambda node: node if node is not None and node.GetScene() is not None else None  # noqa: E731
        self.plotTable = logic.iouTable({"segment": result}, live(self.plotTable))  # one table and chart, reused
        self.plotChart = logic.iouPlot(self.plotTable, live(self.plotChart))
        slicer.modules.plots.logic().ShowChartInLayout(self.plotChart)

    def _updateButtons(self):
        if not hasattr(self, "applyButton"):
            return
        running = self.running
        self.propagateButton.enabled = not running
        self.applyButton.enabled = bool(not running and self.session and self.session.result is not None)
        self.cancelButton.enabled = bool(running or (self.session and self.session.result is not None))

    def _status(self, text):
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = text
