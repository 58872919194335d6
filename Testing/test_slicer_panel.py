"""The module panel's Qt-free plumbing (``RobustMedSAMLogic/panel.py``) on plain objects and slicer-core:
settings <-> widgets, the running-request tracker (buttons restored however a request ends), the plot view."""
from __future__ import annotations

import sys
import types
from dataclasses import fields
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "RobustMedSAM"))

from RobustMedSAMLib.worker.requests import EngineError, Request  # noqa: E402
from RobustMedSAMLogic import panel  # noqa: E402
from RobustMedSAMLogic.logic import Settings  # noqa: E402


class Widget(types.SimpleNamespace):
    def connect(self, signal, slot):
        self.__dict__.setdefault("slots", []).append((signal, slot))


def panel_ui():
    return types.SimpleNamespace(**{w: Widget() for _, w, _, _, _ in panel.SETTINGS_WIDGETS},
                                 progressBar=Widget(visible=False, value=0, maximum=0), statusLabel=Widget(text=""))


def test_settings_round_trip_through_the_widgets():
    ui = panel_ui()
    chosen = Settings(model="litemedsam", checkpoint="/x.pth", device="cpu", cacheMB=256.0, fp16Cache=True,
                      intensity="lung", precision="bf16", axis="j", propagate=False, iouThreshold=0.4)
    panel.show_settings(ui, chosen)
    assert panel.read_settings(ui, Settings()) == chosen  # every shown field goes both ways
    shown = {name for name, *_ in panel.SETTINGS_WIDGETS}
    assert shown <= {f.name for f in fields(Settings)}
    ui.cacheSizeSpinBox.value = 128  # Qt hands back ints for whole values
    assert panel.read_settings(ui, chosen).cacheMB == 128.0 and isinstance(panel.read_settings(ui, chosen).cacheMB,
                                                                           float)
    hidden = Settings(stopRule="micro-sam", boxExtension=0.3)
    assert panel.read_settings(ui, hidden).stopRule == "micro-sam"  # fields without a widget are kept
    calls = []
    panel.connect_settings(ui, calls.append)
    assert all(len(getattr(ui, w).slots) == 1 for _, w, *_ in panel.SETTINGS_WIDGETS)


def request(kind="segment_volume"):
    return Request(None, 1, kind, {})


@pytest.mark.parametrize("outcome", ["ok", "write fails", "error", "cancelled"])
def test_tracker_restores_the_panel_however_a_request_ends(outcome):
    ui, finished = panel_ui(), []
    tracker = panel.RequestTracker(ui.progressBar, ui.statusLabel, lambda: finished.append(True))
    written = []

    def write(result):
        if outcome == "write fails":
            raise RuntimeError("segment not writable")
        written.append(result)

    r = tracker.track(request(), "segmenting...", write)
    assert tracker.running and ui.progressBar.visible and ui.statusLabel.text == "segmenting..."
    r._progress(3, 10, "slice 3")
    assert (ui.progressBar.value, ui.progressBar.maximum, ui.statusLabel.text) == (3, 10, "slice 3")
    if outcome in ("ok", "write fails"):
        r._finish("ok", "result")  # the callback's exception is logged by the client, as in Slicer
    elif outcome == "error":
        r._finish("error", error=EngineError("the RobustMedSAM engine process stopped (killed)"))
    else:
        r._finish("cancelled")
    assert finished == [True] and not ui.progressBar.visible and not tracker.running
    assert written == (["result"] if outcome == "ok" else [])
    if outcome == "error":
        assert ui.statusLabel.text.startswith("the RobustMedSAM engine process stopped")
    if outcome == "cancelled":
        assert ui.statusLabel.text == tracker.cancelled_text


def test_tracker_ignores_a_forgotten_request():
    ui, finished = panel_ui(), []
    tracker = panel.RequestTracker(ui.progressBar, ui.statusLabel, lambda: finished.append(True))
    r = tracker.track(request(), "checking robustness...", lambda result: pytest.fail("written after close"))
    tracker.forget()  # scene closed
    r._progress(1, 2, "late")
    r._finish("ok", "late result")
    assert finished == [] and ui.statusLabel.text == "checking robustness..."


def test_plot_view_node_is_one_singleton():
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):  # pragma: no cover
        pytest.skip("slicer-core is not installed")
    scene = slicer.vtkMRMLScene()
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode")
    shown = []
    widget = types.SimpleNamespace(setMRMLPlotViewNode=shown.append)
    panel.show_chart(widget, chart, scene)
    panel.show_chart(widget, chart, scene)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotViewNode") == 1 and shown[0] is shown[1]
    assert shown[0].GetPlotChartNodeID() == chart.GetID()
