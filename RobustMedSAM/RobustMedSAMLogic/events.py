"""Slice-view events of the prompt effect -> prompt actions (GUI-free).

The Segment Editor effect maps VTK event ids to the names below and forwards them to :class:`EventRouter`,
which decides what they mean (click, drag, double click, keys) and whether Slicer may still see them.
Positions are view pixels ``(x, y)``; :class:`~.interaction.SliceViewMapper` turns them into slice pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .interaction import InteractionError


class DragTracker:
    """Press / move / release in view pixels -> a click or a drag rectangle.

    A release closer than ``threshold`` view pixels to the press is a click. :attr:`rectangle` is the current
    rubber band ``(x0, y0, x1, y1)`` in view pixels (normalised, for drawing).
    """

    def __init__(self, threshold: float = 4.0) -> None:
        self.threshold = float(threshold)
        self.start: Optional[Tuple[float, float]] = None
        self.current: Optional[Tuple[float, float]] = None
        self.modifier = False

    @property
    def active(self) -> bool:
        return self.start is not None

    def press(self, xy: Sequence[float], modifier: bool = False) -> None:
        self.start = self.current = (float(xy[0]), float(xy[1]))
        self.modifier = bool(modifier)

    def move(self, xy: Sequence[float]) -> bool:
        """Update the drag; True if it is (now) a drag, i.e. the rubber band should be shown."""
        if self.start is None:
            return False
        self.current = (float(xy[0]), float(xy[1]))
        return self.is_drag

    @property
    def is_drag(self) -> bool:
        if self.start is None or self.current is None:
            return False
        return math.hypot(self.current[0] - self.start[0], self.current[1] - self.start[1]) >= self.threshold

    @property
    def rectangle(self) -> Optional[Tuple[float, float, float, float]]:
        if self.start is None or self.current is None:
            return None
        (xa, ya), (xb, yb) = self.start, self.current
        return (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))

    def release(self, xy: Sequence[float]) -> Tuple[str, Tuple[float, float], Tuple[float, float]]:
        """End the gesture: ``("click", start, start)`` or ``("drag", start, end)``."""
        if self.start is None:
            raise InteractionError("release without press")
        self.current = (float(xy[0]), float(xy[1]))
        kind = "drag" if self.is_drag else "click"
        start, end = self.start, self.current
        self.start = self.current = None
        return kind, start, end if kind == "drag" else start

    def cancel(self) -> None:
        self.start = self.current = None


PRESS, MOVE, RELEASE, DOUBLE_CLICK, RIGHT_PRESS, KEY = "press", "move", "release", "double_click", "right_press", "key"
#: keys the prompt effect handles (Esc is Slicer's shortcut for leaving the effect: it never reaches us, and
#: leaving the effect drops the prompts anyway)
KEY_ACTIONS = {"Return": "apply", "KP_Enter": "apply", "BackSpace": "undo", "n": "next"}


@dataclass(frozen=True)
class Action:
    """What an event asks for: ``kind`` "point" (``xy``, ``positive``), "box" (``xy`` to ``end``), "remove"
    (``xy``), "band" (rubber band ``rect`` in view pixels, or None to hide it), "apply", "undo", "next"."""

    kind: str
    xy: Optional[Tuple[float, float]] = None
    end: Optional[Tuple[float, float]] = None
    positive: bool = True
    rect: Optional[Tuple[float, float, float, float]] = None


class EventRouter:
    """Slice-view events of the prompt effect -> :class:`Action` lists, per view (GUI-free).

    Left press + release = click (object point; Ctrl = background point; Shift = remove the nearest point),
    left drag = box, right press = background point. A double click arrives without a press (the second
    press of a double click is reported as ``double_click``): it starts a click like a press, so a quick
    double click gives two points, and is consumed (otherwise Slicer maximizes the view).
    Returns ``(consumed, actions)``; consumed events must not reach Slicer's own handlers.
    """

    def __init__(self, drag_threshold: float = 4.0) -> None:
        self.drag_threshold = float(drag_threshold)
        self._drags: dict = {}
        self._shift: dict = {}

    def reset(self) -> None:
        self._drags.clear()
        self._shift.clear()

    def handle(self, view, kind: str, xy: Sequence[float], control: bool = False, shift: bool = False,
               key: str = "") -> Tuple[bool, List[Action]]:
        xy = (float(xy[0]), float(xy[1]))
        drag = self._drags.setdefault(view, DragTracker(self.drag_threshold))
        if kind == KEY:
            action = KEY_ACTIONS.get(key)
            return (True, [Action(action)]) if action else (False, [])
        if kind in (PRESS, DOUBLE_CLICK):
            drag.press(xy, modifier=control)
            self._shift[view] = bool(shift)
            return True, []
        if kind == MOVE:
            if not drag.active:
                return False, []
            return True, ([Action("band", rect=drag.rectangle)] if drag.move(xy) else [])
        if kind == RIGHT_PRESS:
            return True, [Action("point", xy, positive=False)]
        if kind == RELEASE and drag.active:
            negative = drag.modifier
            gesture, start, end = drag.release(xy)
            if gesture == "drag":
                return True, [Action("band"), Action("box", start, end)]
            if self._shift.pop(view, False):
                return True, [Action("remove", start)]
            return True, [Action("point", start, positive=not negative)]
        return False, []
