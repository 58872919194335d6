"""The module panel's plumbing that needs no Qt import: which widget shows which setting, and where tables
and plots are shown.

* :data:`SETTINGS_WIDGETS` -- each :class:`~.logic.Settings` field the panel shows: the widget (a name in
  ``Resources/UI/RobustMedSAM.ui``), its Qt property and change signal; :func:`show_settings`,
  :func:`read_settings` and :func:`connect_settings` apply the table to the panel's ``ui`` namespace.
* :class:`RequestTracker` -- the panel's one running engine request: progress bar and status line follow
  it, and the panel's buttons are restored however it ends.
* :func:`show_table` -- a table node in the view layout (switching to a layout with a table view if needed,
  as the Segment Statistics module does); :func:`plot_view_node` / :func:`show_chart` -- the panel's own plot.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import replace
from typing import Callable, Optional, Tuple

#: (Settings field, widget name, Qt property, change signal, type of the field)
SETTINGS_WIDGETS: Tuple[Tuple[str, str, str, str, type], ...] = (
    ("model", "modelComboBox", "currentText", "currentIndexChanged(int)", str),
    ("checkpoint", "checkpointPathLineEdit", "currentPath", "currentPathChanged(QString)", str),
    ("device", "deviceComboBox", "currentText", "currentIndexChanged(int)", str),
    ("cacheMB", "cacheSizeSpinBox", "value", "valueChanged(double)", float),
    ("fp16Cache", "fp16CheckBox", "checked", "toggled(bool)", bool),
    ("intensity", "intensityComboBox", "currentText", "currentIndexChanged(int)", str),
    ("precision", "precisionComboBox", "currentText", "currentIndexChanged(int)", str),
    ("axis", "axisComboBox", "currentText", "currentIndexChanged(int)", str),
    ("propagate", "propagateCheckBox", "checked", "toggled(bool)", bool),
    ("iouThreshold", "iouThresholdSliderWidget", "value", "valueChanged(double)", float),
)


def show_settings(ui, settings) -> None:
    """Put ``settings`` into the panel's widgets (the caller blocks its own update handler)."""
    for name, widget, prop, _, _ in SETTINGS_WIDGETS:
        setattr(getattr(ui, widget), prop, getattr(settings, name))


def read_settings(ui, settings):
    """``settings`` with the fields shown in the panel replaced by the widgets' values (others kept)."""
    return replace(settings, **{name: kind(getattr(getattr(ui, widget), prop))
                                for name, widget, prop, _, kind in SETTINGS_WIDGETS})


def connect_settings(ui, slot: Callable) -> None:
    """Call ``slot`` whenever one of the settings widgets changes."""
    for _, widget, _, signal, _ in SETTINGS_WIDGETS:
        getattr(ui, widget).connect(signal, slot)


class RequestTracker:
    """The panel's running engine request (``RobustMedSAMLib.worker.requests.Request``).

    :meth:`track` shows its progress in ``progress_bar`` / ``status_label`` and runs ``on_result(result)``
    (GUI thread, inside ``guard(message)``: Slicer's ``tryWithErrorDisplay``) if it succeeds; ``finished()``
    (the panel re-enables its buttons) runs however it ends, also when ``on_result`` fails. An answer to a
    request that was forgotten (scene closed, engine unloaded) or superseded is ignored.
    """

    def __init__(self, progress_bar, status_label, finished: Callable[[], None],
                 guard: Optional[Callable[[str], object]] = None,
                 cancelled_text: str = "Cancelled; nothing was changed.") -> None:
        self.progress_bar, self.status_label, self.finished = progress_bar, status_label, finished
        self.guard = guard or (lambda message: nullcontext())
        self.cancelled_text = cancelled_text
        self.request = None

    @property
    def running(self) -> bool:
        return self.request is not None and not self.request.finished

    def cancel(self) -> None:
        if self.running:
            self.request.cancel()

    def forget(self) -> None:
        self.request = None

    def track(self, request, what: str, on_result: Callable, error_message: str = "Writing the result failed."):
        self.request = request
        self.progress_bar.visible = True
        self.progress_bar.value = 0
        self.status_label.text = what

        def progress(r) -> None:
            if r is not self.request:
                return
            if r.total:
                self.progress_bar.maximum = int(r.total)
                self.progress_bar.value = int(r.done)
            self.status_label.text = r.message or what

        def done(r) -> None:
            if r is not self.request:
                return  # cancelled and superseded, or the scene was closed
            self.request = None
            try:
                if r.ok:
                    with self.guard(error_message):
                        on_result(r.result)
                elif r.status in ("cancelled", "dropped"):
                    self.status_label.text = self.cancelled_text
                else:
                    logging.error(getattr(r.error, "details", "") or str(r.error))
                    self.status_label.text = str(r.error)  # e.g. the weights how-to message when offline
            finally:
                self.progress_bar.visible = False
                self.finished()

        request.on_progress, request.on_done = progress, done
        if request.finished:  # answered already (in-process engine)
            done(request)
        return request


def show_table(table_node) -> None:
    """Show ``table_node`` in the view layout (Slicer application only)."""
    import slicer

    layout_manager = slicer.app.layoutManager()
    if layout_manager is not None:
        layout_manager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layout_manager.layout))
    slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table_node.GetID())
    slicer.app.applicationLogic().PropagateTableSelection()


PLOT_VIEW_TAG = "RobustMedSAMPlotView"


def plot_view_node(scene):
    """The panel's plot view node (a singleton of ``scene``, created on first use)."""
    import slicer

    node = scene.GetSingletonNode(PLOT_VIEW_TAG, "vtkMRMLPlotViewNode")
    if node is None:
        node = slicer.vtkMRMLPlotViewNode()
        node.SetSingletonTag(PLOT_VIEW_TAG)
        node = scene.AddNode(node)
    return node


def show_chart(plot_widget, chart_node, scene) -> None:
    """Show ``chart_node`` in the panel's ``qMRMLPlotWidget``."""
    view = plot_view_node(scene)
    plot_widget.setMRMLPlotViewNode(view)
    view.SetPlotChartNodeID(chart_node.GetID())
