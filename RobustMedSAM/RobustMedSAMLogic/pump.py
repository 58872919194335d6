"""Driving the engine's replies from Qt: one timer per session that calls ``EngineSession.poll`` while
requests are pending, and stops when none are.

This is the bridge's only Qt code and runs only inside the Slicer application (``qt`` is imported when a
pump is created). Each tick is short: :meth:`EngineSession.poll` reads what has arrived within a small time
budget and never waits for the engine.
"""
from __future__ import annotations

import logging

INTERVAL_MS = 40


class QtPump:
    """Attach to an :class:`~.engine.EngineSession`: the session wakes the pump on every request."""

    def __init__(self, session, interval_ms: int = INTERVAL_MS) -> None:
        import qt

        self.session = session
        self.timer = qt.QTimer()
        self.timer.setInterval(int(interval_ms))
        self.timer.connect("timeout()", self.tick)
        session.pump = self.wake

    def wake(self) -> None:
        if not self.timer.isActive():
            self.timer.start()

    def tick(self) -> None:
        try:
            pending = self.session.poll()
        except Exception:  # a failing callback must not stop the replies of others
            logging.exception("RobustMedSAM: handling an engine reply failed")
            pending = self.session.pending
        if not pending:
            self.timer.stop()

    def stop(self) -> None:
        self.timer.stop()
        self.timer.disconnect("timeout()", self.tick)  # Slicer #7392: stopped timers keep their Python slot


def ensure_pump(session) -> None:
    """Give ``session`` a Qt pump unless it has one (inside the Slicer application)."""
    if getattr(session, "_qt_pump", None) is None:
        session._qt_pump = QtPump(session)
