"""Segment Editor effect "RobustMedSAM": prompt-based 2D segmentation on the slice under the mouse.

Thin Qt/VTK glue: every decision is made by the GUI-free classes of ``RobustMedSAMLogic.interaction``
(events -> actions, view XY -> voxel slice prompt, drag -> box, prompt list, preview/apply/cancel) and the
edits go through ``scriptedEffect.saveStateForUndo()`` / ``modifySegmentByLabelmap``
(``RobustMedSAMLogic.segments``), so they are undoable with the Segment Editor's Undo and respect its
masking settings. Predictions come from the engine process (``RobustMedSAMLogic.engine``): a click sends a
request and returns; the preview appears when the answer arrives, so the GUI never waits.

Mouse: left click = positive point, Ctrl+left click or right click = negative point, left drag = box,
Shift+click = remove the nearest point (a double click gives two points). Keys: Enter = Apply, Backspace =
undo last prompt, N = next candidate mask (Esc is Slicer's: it leaves the effect, dropping the prompts).
"""
import logging
import os

import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from RobustMedSAMLogic.drawing import PromptDrawing


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Prompt-based 2D segmentation with RobustMedSAM (SAM ViT-B family)."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "RobustMedSAM"
        scriptedEffect.title = "RobustMedSAM"
        scriptedEffect.perSegment = False  # edits go through modifySegmentByLabelmap with our own undo step
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.session = None
        self.preview = None
        self.writer = None
        self.router = None     # RobustMedSAMLogic.interaction.EventRouter
        self.drawing = PromptDrawing(scriptedEffect)  # rubber band and prompt points in the slice views
        self.loadRequest = None
        self.active = False

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return ("<html>Segment the selected segment on a slice from prompts (RobustMedSAM: robust to noise, blur "
                "and motion).<p><b>Left click</b>: object point. <b>Ctrl+click</b> or <b>right click</b>: background "
                "point. <b>Left drag</b>: box. <b>Shift+click</b>: remove a point. The preview updates after each "
                "prompt; <b>Apply</b> (Enter) replaces the segment on that slice (undoable), <b>Cancel</b> "
                "drops it. <b>Backspace</b> undoes the last prompt, <b>N</b> shows the next candidate mask."
                "<p>Works in any slice view: the volume's voxel axis closest to the view is segmented; "
                "views tilted more than 20 degrees from it are refused. Then use <b>RobustMedSAM Propagate</b> to "
                "extend the segment through the volume.</html>")

    # options -----------------------------------------------------------------------------------------
    def setupOptionsFrame(self):
        self.multimaskCombo = qt.QComboBox()
        self.multimaskCombo.addItems(["auto", "always", "never"])
        self.multimaskCombo.toolTip = ("Three candidate masks: 'auto' for a single object point (ambiguous), "
                                       "'always' or 'never'. 'Next mask' cycles through the candidates.")
        self.scriptedEffect.addLabeledOptionsWidget("Multiple masks:", self.multimaskCombo)
        self.multimaskCombo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)

        buttons = qt.QHBoxLayout()
        self.undoPromptButton = qt.QPushButton("Undo prompt")
        self.nextMaskButton = qt.QPushButton("Next mask")
        self.clearButton = qt.QPushButton("Clear prompts")
        for b in (self.undoPromptButton, self.nextMaskButton, self.clearButton):
            buttons.addWidget(b)
        self.scriptedEffect.addOptionsWidget(buttons)
        applyRow = qt.QHBoxLayout()
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.cancelButton = qt.QPushButton("Cancel")
        applyRow.addWidget(self.cancelButton)
        applyRow.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(applyRow)
        self.loadModelButton = qt.QPushButton("Download / load model")
        self.loadModelButton.toolTip = "Load the model chosen in the RobustMedSAM module (downloads its weights once)"
        self.scriptedEffect.addOptionsWidget(self.loadModelButton)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.loadModelButton.connect("clicked()", lambda: self._startModelLoad(userRequested=True))

        self.undoPromptButton.connect("clicked()", lambda: self._run(lambda s: s.undo_last()))
        self.nextMaskButton.connect("clicked()", lambda: self._run(lambda s: s.next_candidate()))
        self.clearButton.connect("clicked()", lambda: self._run(lambda s: s.clear()))
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Multimask", "auto")

    def updateGUIFromMRML(self):
        value = self.scriptedEffect.parameter("Multimask") or "auto"
        wasBlocked = self.multimaskCombo.blockSignals(True)
        self.multimaskCombo.currentText = value
        self.multimaskCombo.blockSignals(wasBlocked)
        self._updateButtons()

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("Multimask", self.multimaskCombo.currentText)
        if self.session is not None:
            self.session.multimask = self.multimaskCombo.currentText
            self._run(lambda s: s.update())

    # lifecycle ---------------------------------------------------------------------------------------
    def activate(self):
        from RobustMedSAMLogic.events import EventRouter

        self.active = True
        self.router = EventRouter()
        self._resetSession()
        self._startModelLoad()
        for viewWidget in self._sliceWidgets():
            self._prefetchView(viewWidget)

    def deactivate(self):
        self.active = False
        if self.session is not None:
            self.session.cancel()  # an answer still on its way is ignored
        self._removePreview()
        self.drawing.remove_all()
        if self.router is not None:
            self.router.reset()

    def cleanup(self):
        self.deactivate()
        self.session = None

    def sourceVolumeNodeChanged(self):
        if self.active:  # notifications reach inactive effects too
            self._resetSession()

    def referenceGeometryChanged(self):
        if self.active:
            self._resetSession()

    # engine ------------------------------------------------------------------------------------------
    def _engine(self):
        """The shared engine session configured from the module's settings (never waits)."""
        from RobustMedSAMLogic.logic import RobustMedSAMBridgeLogic
        from RobustMedSAMLogic.pump import ensure_pump

        engine = RobustMedSAMBridgeLogic(slicer.mrmlScene).engineSession()
        ensure_pump(engine)
        return engine

    def _startModelLoad(self, userRequested=False):
        """Load the model in the engine process (no popup). Weights are downloaded only when the user asks
        (this button or the module's), with progress; on activation only cached weights are loaded."""
        try:
            from RobustMedSAMLogic.engine import download_needed
            engine = self._engine()
        except Exception as e:  # engine package missing or broken: a message, not a traceback
            self._status(f"RobustMedSAM needs its Python packages: open the RobustMedSAM module and click "
                         f"'Install dependencies' ({e}).")
            return
        if self.loadRequest is not None and not self.loadRequest.finished:
            return
        if engine.is_loaded and not userRequested:
            self._status(engine.describe())
            return
        if not userRequested:
            try:
                missing = download_needed(engine.choice)
            except Exception as e:
                self._status(str(e))
                return
            if missing:
                self._status(f"Model weights {missing}. Click 'Download / load model'.")
                return

        def progress(request):
            frac = request.fraction
            self._status(f"{request.message}: {frac * 100:.0f}%" if frac is not None else f"{request.message}...")

        def done(request):
            self.loadRequest = None
            if not self.active:
                return
            if request.ok:
                self._status(engine.describe())
                for viewWidget in self._sliceWidgets():
                    self._prefetchView(viewWidget)
            elif request.status in ("cancelled", "dropped"):
                self._status("Loading the model was cancelled.")
            else:
                logging.error(getattr(request.error, "details", "") or str(request.error))
                self._status(f"The model could not be loaded: {request.error}")

        try:
            self.loadRequest = engine.load(allow_download=True, on_progress=progress, on_done=done)
        except Exception as e:  # the engine process could not be started (PythonSlicer missing...)
            logging.exception("RobustMedSAM")
            self._status(f"The RobustMedSAM engine could not be started: {e}")
            return
        self._status("starting the engine and loading the model...")

    # session ------------------------------------------------------------------------------------------
    def _resetSession(self):
        from RobustMedSAMLogic import segments, volumes
        from RobustMedSAMLogic.interaction import PromptSession

        if self.session is not None:
            self.session.cancel()
        self._removePreview()
        self.session = None
        psn = self.scriptedEffect.parameterSetNode()
        if psn is None or psn.GetSegmentationNode() is None or psn.GetSourceVolumeNode() is None:
            return
        segNode, volumeNode = psn.GetSegmentationNode(), psn.GetSourceVolumeNode()
        try:
            access = segments.EffectAccess(self.scriptedEffect, segNode)
            self.writer = segments.SegmentWriter(access, segNode, volumeNode)
        except Exception as e:  # e.g. a segmentation stored as closed surfaces: say what to do
            self._status(str(e))
            return
        self.preview = segments.PreviewSegmentation(slicer.mrmlScene, volumeNode, segNode)
        shape = volumes.shape_of(volumeNode)

        def predict(axis, index, prompt, multimask, reply):
            engine = self._engine()

            def done(request):
                if request.ok:
                    reply(request.result)
                else:
                    reply(error=request.error)

            engine.predict(volumeNode, axis, index, prompt, multimask, self._intensity(), on_done=done)

        def show(axis, index, mask):
            if not self.active:
                return
            if mask is None:
                self.preview.remove()
            else:
                seg = segNode.GetSegmentation().GetSegment(psn.GetSelectedSegmentID() or "")
                self.preview.show_slice(shape, axis, index, mask, seg.GetColor() if seg else None)
            self._updateButtons()

        def write(axis, index, mask):
            segmentID = psn.GetSelectedSegmentID()
            if not segmentID:
                raise ValueError("select a segment first")
            self.writer.replace_slice(segmentID, axis, index, mask)

        def prefetch(axis, index):
            self._engine().prefetch(volumeNode, axis, index, self._intensity())

        multimask = self.scriptedEffect.parameter("Multimask") or "auto"
        self.session = PromptSession(predict, show, write, prefetch, multimask)
        self.session.on_change = self._afterAnswer

    def _afterAnswer(self):
        self._updateButtons()
        self._updatePromptActors()

    def _intensity(self):
        from RobustMedSAMLogic.logic import RobustMedSAMBridgeLogic

        return RobustMedSAMBridgeLogic(slicer.mrmlScene).settings().intensity

    def _run(self, action):
        if self.session is None:
            return
        try:
            action(self.session)
        except Exception as e:
            logging.exception("RobustMedSAM")
            self._status(str(e))
        self._updateButtons()
        self._updatePromptActors()

    def onApply(self):
        if self.session is None or not self.session.can_apply:
            return
        # a hidden segment: Slicer asks whether to show it; Cancel (NotConfirmed = 0) keeps the preview unwritten
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return
        try:
            self.session.apply()
        except Exception as e:
            logging.exception("RobustMedSAM apply")
            self._status(f"Apply failed: {e}")
        self._updateButtons()
        self._updatePromptActors()

    def onCancel(self):
        self._run(lambda s: s.cancel())

    def _updateButtons(self):
        s = self.session
        if not hasattr(self, "applyButton"):
            return
        self.applyButton.enabled = bool(s and s.can_apply)
        self.cancelButton.enabled = bool(s and s.prompts is not None and not s.prompts.empty)
        self.nextMaskButton.enabled = bool(s and s.candidates > 1)
        self.undoPromptButton.enabled = bool(s and s.prompts is not None and not s.prompts.empty)
        if s is not None and s.state == "error":
            self._status(s.message)
        elif s is not None and s.state == "pending":
            self._status("predicting...")
        elif s is not None and s.score is not None:
            self._status(f"Preview on slice {s.prompts.index} ({'kji'[s.prompts.axis]}): predicted IoU {s.score:.2f}"
                         + (f", mask {s.selected + 1} of {s.candidates}" if s.candidates > 1 else ""))

    def _status(self, text):
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = text

    # views --------------------------------------------------------------------------------------------
    def _sliceWidgets(self):
        lm = slicer.app.layoutManager()
        if lm is None:
            return []
        return [lm.sliceWidget(name) for name in lm.sliceViewNames() if lm.sliceWidget(name).isVisible()]

    def _mapper(self, viewWidget):
        from RobustMedSAMLogic import volumes
        from RobustMedSAMLogic.interaction import SliceViewMapper

        psn = self.scriptedEffect.parameterSetNode()
        volumeNode = psn.GetSourceVolumeNode() if psn else None
        if volumeNode is None or volumeNode.GetImageData() is None:
            return None
        sliceNode = viewWidget.sliceLogic().GetSliceNode()
        xyToRas = volumes.to_numpy(sliceNode.GetXYToRAS())
        normal = volumes.to_numpy(sliceNode.GetSliceToRAS())[:3, 2]
        ijkToWorld = volumes.local_to_world(volumeNode) @ volumes.ijk_to_ras(volumeNode)
        return SliceViewMapper(lambda xy: (xyToRas @ [xy[0], xy[1], 0.0, 1.0])[:3], ijkToWorld,
                               volumes.shape_of(volumeNode), normal)

    def _prefetchView(self, viewWidget):
        if self.session is None:
            return
        try:
            mapper = self._mapper(viewWidget)
            if mapper is None:
                return
            sliceNode = viewWidget.sliceLogic().GetSliceNode()
            sliceToRas = sliceNode.GetSliceToRAS()
            centre = [sliceToRas.GetElement(r, 3) for r in range(3)]
            pos = mapper.ras_to_position(centre, clamp=True)
            self.session.view_moved(pos.axis, pos.index)
        except Exception as e:  # an oblique view or a view outside the volume: nothing to encode
            logging.debug(f"RobustMedSAM prefetch skipped: {e}")

    def processViewNodeEvents(self, callerViewNode, eventId, viewWidget):
        if callerViewNode and callerViewNode.IsA("vtkMRMLSliceNode"):
            self._prefetchView(viewWidget)
            self._updatePromptActors()

    EVENTS = {vtk.vtkCommand.LeftButtonPressEvent: "press", vtk.vtkCommand.LeftButtonReleaseEvent: "release",
              vtk.vtkCommand.MouseMoveEvent: "move", vtk.vtkCommand.RightButtonPressEvent: "right_press",
              vtk.vtkCommand.KeyPressEvent: "key"}
    if hasattr(vtk.vtkCommand, "LeftButtonDoubleClickEvent"):
        EVENTS[vtk.vtkCommand.LeftButtonDoubleClickEvent] = "double_click"

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget" or self.session is None or self.router is None:
            return False
        kind = self.EVENTS.get(eventId)
        if kind is None:
            return False
        consumed, actions = self.router.handle(
            viewWidget, kind, callerInteractor.GetEventPosition(), control=bool(callerInteractor.GetControlKey()),
            shift=bool(callerInteractor.GetShiftKey()), key=callerInteractor.GetKeySym() if kind == "key" else "")
        for action in actions:
            self._perform(viewWidget, action)
        return consumed

    def _perform(self, viewWidget, action):
        if action.kind == "band":
            self._showRubberBand(viewWidget, action.rect)
        elif action.kind == "point":
            self._prompt(viewWidget, lambda m: self.session.add_point(m.xy_to_position(action.xy), m.slice_shape,
                                                                      action.positive))
        elif action.kind == "box":
            self._prompt(viewWidget, lambda m: self.session.set_box(
                m.xy_to_position(action.xy, clamp=True), m.xy_to_position(action.end, clamp=True), m.slice_shape))
        elif action.kind == "remove":
            self._prompt(viewWidget, lambda m: self.session.remove_point(m.xy_to_position(action.xy)))
        elif action.kind == "apply":
            self.onApply()
        elif action.kind == "undo":
            self._run(lambda s: s.undo_last())
        elif action.kind == "next":
            self._run(lambda s: s.next_candidate())

    def _prompt(self, viewWidget, action):
        from RobustMedSAMLogic.interaction import InteractionError

        try:
            mapper = self._mapper(viewWidget)
            if mapper is None:
                self._status("select a source volume")
                return True
            action(mapper)
        except InteractionError as e:
            self._status(str(e))
        except Exception as e:
            logging.exception("RobustMedSAM prompt")
            self._status(str(e))
        self._updateButtons()
        self._updatePromptActors()
        return True

    # drawing ----------------------------------------------------------------------------------------
    def _showRubberBand(self, viewWidget, rect):
        self.drawing.band(viewWidget, rect)

    def _updatePromptActors(self):
        """Draw the current prompt points (green: object, red: background) in every slice view."""
        psn = self.scriptedEffect.parameterSetNode()
        volumeNode = psn.GetSourceVolumeNode() if psn else None
        prompts = self.session.prompts if self.session is not None else None
        self.drawing.points(self._sliceWidgets(), prompts, volumeNode)

    def _removePreview(self):
        if self.preview is not None:
            self.preview.remove()
