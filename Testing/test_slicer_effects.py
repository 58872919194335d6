"""The two Segment Editor effects on slicer-core, driven through their own files (``SegmentEditorEffect.py``).

Harness: stand-ins for what only the Slicer application has (``qt`` widgets, ``SegmentEditorEffects``, the
C++ ``qSlicerSegmentEditorScriptedEffect``); real MRML, real segment editing and the real engine (in-process,
tiny model) everywhere else.

:class:`FakeScriptedEffect` offers only the API names of Slicer's ``qSlicerSegmentEditorAbstractEffect``
(``Q_INVOKABLE`` methods and properties found in both v5.8.1 and v5.10.0 of
``Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorAbstractEffect.h``): calling any other
name fails, so an effect that uses a misspelt or missing API fails here too. Its editing is Slicer's own
``vtkSlicerSegmentEditorLogic`` (modifier labelmaps on the segmentation's reference geometry, undo states).
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):  # pragma: no cover
    pytest.skip("slicer-core (with vtkSlicerSegmentEditorLogic) is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "RobustMedSAM"))

#: qSlicerSegmentEditorAbstractEffect API (v5.8.1 and v5.10.0 headers: Q_INVOKABLE methods, Q_PROPERTYs)
SLICER_EFFECT_API = frozenset("""
activate active addActor2D addActor3D addLabeledOptionsWidget addOptionsWidget applyImageMask
commonParameterDefined confirmCurrentSegmentVisible cursorOff cursorOn deactivate defaultModifierLabelmap
doubleParameter forceRender helpText integerParameter maskLabelmap modifierLabelmap modifySegmentByLabelmap
modifySelectedSegmentByLabelmap nodeReference optionsFrame optionsLayout parameter parameterDefined
parameterSetNode rasToXy referenceGeometryImage removeActor2D removeActor3D renderWindow renderer
saveStateForUndo scene scheduleRender segmentationDisplayableInView selectEffect selectedSegmentLabelmap
setCommonNodeReference setCommonParameter setCommonParameterDefault setNodeReference setParameter
setParameterDefault setParameterSetNode sliceSpacing sourceVolumeImageData viewNode xyToIjk xyToRas xyzToIjk
xyzToRas name title perSegment requireSegments showEffectCursorInSliceView showEffectCursorInThreeDView
""".split())
NOT_CONFIRMED, CONFIRMED_WITHOUT_DIALOG, CONFIRMED_WITH_DIALOG = 0, 1, 2  # ConfirmationResult enum order
LIVE_EFFECTS: list = []  # FakeScriptedEffects to close at the end of a test


# ------------------------------------------------------------------------------------------------ qt
class _Widget:
    """A Qt widget stand-in: properties are plain attributes, ``connect`` records slots, ``emit`` calls them."""

    def __init__(self, *args, **kwargs):
        self.enabled, self.visible, self.checked, self.text = True, True, False, args[0] if args else ""
        self.value, self.minimum, self.maximum = 0, 0, 100
        self.items, self.data, self.currentIndex, self.toolTip = [], [], -1, ""
        self.slots, self._blocked = {}, False

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal, slot):
        self.slots.get(signal, []).remove(slot)

    def emit(self, signal, *args):
        for slot in list(self.slots.get(signal, [])):
            slot(*args)

    def blockSignals(self, blocked):
        was, self._blocked = self._blocked, bool(blocked)
        return was

    # combo boxes
    def addItems(self, items):
        for item in items:
            self.addItem(item)

    def addItem(self, text, data=None):
        self.items.append(text)
        self.data.append(data)
        if self.currentIndex < 0:
            self.currentIndex = 0

    def findData(self, data):
        return self.data.index(data) if data in self.data else -1

    @property
    def currentText(self):
        return self.items[self.currentIndex] if 0 <= self.currentIndex < len(self.items) else ""

    @currentText.setter
    def currentText(self, text):
        if text in self.items:
            self.currentIndex = self.items.index(text)

    @property
    def currentData(self):
        return self.data[self.currentIndex] if 0 <= self.currentIndex < len(self.data) else None

    def addWidget(self, widget):
        pass

    # timers
    def setInterval(self, ms):
        self.interval = ms

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return getattr(self, "active", False)


def fake_qt() -> types.ModuleType:
    qt = types.ModuleType("qt")
    for name in ("QComboBox", "QPushButton", "QLabel", "QHBoxLayout", "QCheckBox", "QSpinBox", "QProgressBar",
                 "QTimer"):
        setattr(qt, name, type(name, (_Widget,), {}))
    qt.QIcon = lambda *args: object()
    return qt


def fake_segment_editor_effects() -> types.ModuleType:
    module = types.ModuleType("SegmentEditorEffects")

    class AbstractScriptedSegmentEditorEffect:  # the part of Slicer's base class the effects rely on
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

    module.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    return module


# --------------------------------------------------------------------------------- scripted effect
class FakeScriptedEffect:
    """``self.scriptedEffect`` of an effect, on a real segment editor node and Slicer's segment editor logic.

    ``confirm``: what ``confirmCurrentSegmentVisible()`` answers (the user's choice in Slicer's dialog);
    ``calls`` records every API call by name.
    """

    def __init__(self, scene, segmentation_node, volume_node, segment_id, confirm=CONFIRMED_WITHOUT_DIALOG):
        import slicer

        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "_state", {"name": "", "title": "", "perSegment": False, "requireSegments": False})
        self._params = {}
        self.confirm = confirm
        node = slicer.vtkMRMLSegmentEditorNode()
        scene.AddNode(node)
        node.SetAndObserveSegmentationNode(segmentation_node)
        node.SetAndObserveSourceVolumeNode(volume_node)
        node.SetSelectedSegmentID(segment_id)
        node.SetOverwriteMode(node.OverwriteNone)
        self._node = node
        self._logic = slicer.vtkSlicerSegmentEditorLogic()
        self._logic.SetMRMLScene(scene)
        self._logic.SetSegmentEditorNode(node)
        self._logic.SetMaximumNumberOfUndoStates(10)
        LIVE_EFFECTS.append(self)

    def close(self):
        """Detach Slicer's logic from the nodes and the scene (the fixture does it while they exist, so
        nothing of a test is left for a later garbage collection)."""
        self._logic.SetSegmentEditorNode(None)
        self._logic.SetMRMLScene(None)

    _OWN = {"confirm", "_params", "_node", "_logic"}

    def __setattr__(self, name, value):
        if name in self._OWN:
            object.__setattr__(self, name, value)
        elif name in ("name", "title", "perSegment", "requireSegments"):
            self._state[name] = value
        else:
            raise AttributeError(f"qSlicerSegmentEditorAbstractEffect has no settable {name!r}")

    def __getattr__(self, name):
        if name in self._state:
            return self._state[name]
        if name not in SLICER_EFFECT_API:
            raise AttributeError(f"qSlicerSegmentEditorAbstractEffect has no {name!r} (Slicer 5.8/5.10 API)")
        impl = getattr(type(self), "_" + name, None)
        if impl is None:
            raise NotImplementedError(f"the harness does not implement {name!r}")

        def call(*args):
            self.calls.append(name)
            return impl(self, *args)

        return call

    # API implementations (names as in Slicer, prefixed with _)
    def _parameterSetNode(self):
        return self._node

    def _parameter(self, name):
        return str(self._params.get(name, ""))

    def _setParameter(self, name, value):
        self._params[name] = value

    def _setParameterDefault(self, name, value):
        self._params.setdefault(name, value)

    def _doubleParameter(self, name):
        return float(self._params.get(name) or 0)

    def _integerParameter(self, name):
        return int(float(self._params.get(name) or 0))

    def _addOptionsWidget(self, widget):
        pass

    def _addLabeledOptionsWidget(self, label, widget):
        pass

    def _confirmCurrentSegmentVisible(self):
        return self.confirm

    def _saveStateForUndo(self):
        self._logic.SaveStateForUndo()

    def _defaultModifierLabelmap(self):
        import slicer

        image = slicer.vtkOrientedImageData()
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(self._logic.GetReferenceImageGeometryString(),
                                                                 image, True)
        return image

    def _modifySegmentByLabelmap(self, segmentation_node, segment_id, labelmap, mode, bypass_masking=False):
        self._logic.ModifySegmentByLabelmap(segmentation_node, segment_id, labelmap, mode, bool(bypass_masking),
                                            False)

    def _addActor2D(self, view, actor):
        pass

    def _removeActor2D(self, view, actor):
        pass

    def _scheduleRender(self, view):
        pass

    # what tests use
    def undo(self):
        self._logic.Undo()


# ---------------------------------------------------------------------------------------- loading
def install_stand_ins(monkeypatch):
    """Make the effect files importable (``qt``, ``SegmentEditorEffects``, the C++ enums on ``slicer``) and
    give ``slicer.app`` a layout manager with no slice views. Undone by ``monkeypatch``."""
    import slicer

    monkeypatch.setitem(sys.modules, "qt", fake_qt())
    monkeypatch.setitem(sys.modules, "SegmentEditorEffects", fake_segment_editor_effects())
    L = slicer.vtkSlicerSegmentEditorLogic
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect", types.SimpleNamespace(
        ModificationModeSet=L.ModificationModeSet, ModificationModeAdd=L.ModificationModeAdd,
        ModificationModeRemove=L.ModificationModeRemove, NotConfirmed=NOT_CONFIRMED), raising=False)
    monkeypatch.setattr(slicer, "qMRMLSliderWidget", _Widget, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(layoutManager=lambda: None), raising=False)
    plots = types.SimpleNamespace(ShowChartInLayout=lambda chart: None)
    monkeypatch.setattr(slicer.modules, "plots", types.SimpleNamespace(logic=lambda: plots), raising=False)


def load_effect(lib: str):
    """The ``SegmentEditorEffect`` class of ``RobustMedSAM/<lib>/SegmentEditorEffect.py`` (a fresh module)."""
    path = ROOT / "RobustMedSAM" / lib / "SegmentEditorEffect.py"
    spec = importlib.util.spec_from_file_location(f"_{lib}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SegmentEditorEffect


def make_effect(lib: str, scripted_effect):
    """An effect instance as Slicer builds it: ``__init__``, ``setupOptionsFrame``, ``setMRMLDefaults``,
    ``updateGUIFromMRML``."""
    effect = load_effect(lib)(scripted_effect)
    effect.setupOptionsFrame()
    effect.setMRMLDefaults()
    effect.updateGUIFromMRML()
    return effect


def box_scene(value=500, shape=(6, 32, 40)):
    """A headless scene with a volume holding a bright box and a segmentation with one empty segment."""
    import slicer
    import slicer.util

    from RobustMedSAMLogic.headless import make_headless_scene

    scene, logics = make_headless_scene()
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    arr = np.zeros(shape, np.int16)
    arr[:, 8:24, 10:30] = value
    slicer.util.updateVolumeFromArray(vol, arr)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid = seg.GetSegmentation().AddEmptySegment("organ", "organ")
    return scene, logics, vol, seg, sid


# ------------------------------------------------------------------------------------------- tests
import slicer.util  # noqa: E402

from RobustMedSAMLogic import engine as engine_module  # noqa: E402
from RobustMedSAMLogic import volumes  # noqa: E402
from RobustMedSAMLogic.interaction import SlicePosition  # noqa: E402

PROMPT_LIB, PROPAGATE_LIB = "SegmentEditorRobustMedSAMLib", "SegmentEditorRobustMedSAMPropagateLib"


@pytest.fixture
def editor(monkeypatch, tiny_model):
    """``(scene, volume, segmentation, segment id, engine)`` with the stand-ins installed and an in-process
    engine (tiny model) as the shared session both effects use."""
    scene, logics, vol, seg, sid = box_scene()  # sets slicer.mrmlScene and slicer.modules
    install_stand_ins(monkeypatch)
    engine = engine_module.EngineSession(loaded=tiny_model)
    engine_module.set_shared_session(engine)
    yield scene, vol, seg, sid, engine
    import gc

    engine_module.set_shared_session(None)
    while LIVE_EFFECTS:
        LIVE_EFFECTS.pop().close()
    gc.collect()  # the effects' reference cycles go while their scene is alive
    del logics


def segment(seg, sid, vol):
    return volumes.segment_mask(seg, sid, vol)


def test_effects_use_only_slicer_api_names():
    """Every ``scriptedEffect.<name>`` in the effects and their helpers exists in Slicer 5.8 and 5.10."""
    import re

    files = [ROOT / "RobustMedSAM" / lib / "SegmentEditorEffect.py" for lib in (PROMPT_LIB, PROPAGATE_LIB)]
    files += [ROOT / "RobustMedSAM" / "RobustMedSAMLogic" / name for name in ("drawing.py", "edit_access.py")]
    used = set()
    for path in files:
        used |= set(re.findall(r"(?:scriptedEffect|self\.effect)\.([A-Za-z_][A-Za-z0-9_]*)", path.read_text()))
    assert used and used <= SLICER_EFFECT_API, sorted(used - SLICER_EFFECT_API)


def prompt_preview(effect, engine):
    a, b = SlicePosition(0, 2, (10, 8), (10, 8, 2)), SlicePosition(0, 2, (29, 23), (29, 23, 2))
    effect.session.set_box(a, b, (32, 40))
    assert effect.session.state == "pending"  # the click returned before the engine answered
    engine.poll()  # what the Qt pump does
    assert effect.session.state == "preview", effect.session.message
    return effect.session.mask.copy()


def test_prompt_apply_respects_the_hidden_segment_dialog(editor):
    """Slicer asks before editing a hidden segment; Cancel (NotConfirmed) must leave the segment untouched
    and keep the preview; once confirmed, Apply writes the preview on its slice in one undoable step."""
    scene, vol, seg, sid, engine = editor
    se = FakeScriptedEffect(scene, seg, vol, sid, confirm=NOT_CONFIRMED)
    effect = make_effect(PROMPT_LIB, se)
    effect.activate()
    expected = prompt_preview(effect, engine)
    effect.onApply()
    assert "modifySegmentByLabelmap" not in se.calls and not segment(seg, sid, vol).any()
    assert effect.session.can_apply  # the user can make the segment visible and Apply again
    se.confirm = CONFIRMED_WITH_DIALOG
    effect.onApply()
    written = segment(seg, sid, vol)
    np.testing.assert_array_equal(written[2], expected)
    assert not written[[0, 1, 3, 4, 5]].any()
    first_edit = se.calls.index("modifySegmentByLabelmap")
    assert "saveStateForUndo" in se.calls[:first_edit]
    se.undo()
    assert not segment(seg, sid, vol).any()
    effect.deactivate()


def seed_slice(seg, sid, vol, index=2):
    mask = np.zeros(volumes.shape_of(vol), np.uint8)
    mask[index, 8:24, 10:30] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, sid, vol)
    return mask.astype(bool)


def test_propagate_apply_respects_the_hidden_segment_dialog(editor):
    scene, vol, seg, sid, engine = editor
    before = seed_slice(seg, sid, vol)
    se = FakeScriptedEffect(scene, seg, vol, sid, confirm=NOT_CONFIRMED)
    effect = make_effect(PROPAGATE_LIB, se)
    effect.activate()
    effect.thresholdSlider.value = 0.0
    effect.stopRuleCombo.currentText = "micro-sam"  # IoU only: the tiny model's masks reach every slice
    effect.onPropagate()
    engine.poll()
    assert effect.session.result is not None, effect.statusLabel.text
    effect.onApply()
    np.testing.assert_array_equal(segment(seg, sid, vol), before)
    assert effect.session.result is not None and effect.applyButton.enabled
    se.confirm = CONFIRMED_WITHOUT_DIALOG
    expected = effect.session.full_mask()
    assert expected.sum() > before.sum() and expected[[1, 3]].any()  # propagated beyond the seed slice
    effect.onApply()
    np.testing.assert_array_equal(segment(seg, sid, vol), expected)
    se.undo()
    np.testing.assert_array_equal(segment(seg, sid, vol), before)
    effect.cleanup()


class _HeldRequest:
    """A run the test answers by hand: progress and the reply come when the test says."""

    def __init__(self, on_progress, on_done):
        self.on_progress, self.on_done = on_progress, on_done
        self.finished, self.status, self.result, self.error = False, "pending", None, None
        self.cancelled = False

    @property
    def ok(self):
        return self.status == "ok"

    def cancel(self):
        self.cancelled = True


def test_propagate_progress_after_cancel_is_ignored(editor, monkeypatch):
    """The engine keeps reporting progress of a cancelled run until its reply arrives; the status must keep
    saying that the run was cancelled, and the hidden progress bar must stay hidden."""
    import RobustMedSAMLogic.propagation as propagation

    scene, vol, seg, sid, engine = editor
    seed_slice(seg, sid, vol)
    held = []

    def runner(plan, options, on_progress=None, on_done=None):
        held.append(_HeldRequest(on_progress, on_done))
        return held[-1]

    monkeypatch.setattr(propagation, "engine_runner", lambda engine, volume, intensity="display": runner)
    effect = make_effect(PROPAGATE_LIB, FakeScriptedEffect(scene, seg, vol, sid))
    effect.activate()
    effect.onPropagate()
    held[0].on_progress(1, 6, "slice 1 of 6")
    assert effect.progressBar.visible and effect.progressBar.value == 1
    effect.onCancel()
    assert held[0].cancelled and not effect.progressBar.visible
    status = effect.statusLabel.text
    assert "cancelled" in status
    held[0].on_progress(2, 6, "slice 2 of 6")  # still on its way from the engine
    assert effect.statusLabel.text == status and not effect.progressBar.visible and effect.progressBar.value == 1
    effect.onPropagate()  # a new run: its own progress is shown
    held[1].on_progress(3, 6, "slice 3 of 6")
    assert effect.statusLabel.text == "slice 3 of 6" and effect.progressBar.value == 3
    held[0].on_progress(4, 6, "slice 4 of 6")  # the old run must not move the new run's bar
    assert effect.progressBar.value == 3
    effect.deactivate()
    held[1].on_progress(5, 6, "slice 5 of 6")  # after leaving the effect
    assert effect.progressBar.value == 3
    effect.cleanup()  # removes its scene observer (Slicer >= 5.10 calls this)
