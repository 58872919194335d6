"""The engine in its own process: a worker that owns the model, and a client that talks to it.

3D Slicer's Python runs without thread support (PythonQt keeps the GIL while the main thread idles in Qt's
event loop), so engine work in a Python thread of the Slicer process only moves during GUI callbacks. The
module and the Segment Editor effects therefore run the engine in a separate process started with Slicer's
own Python (``PythonSlicer``) and talk to it over its standard input/output pipes (no network port):

* :mod:`.protocol` -- message framing and the wire codec (JSON header + raw numpy buffers, bool arrays bit
  packed, a fixed list of dataclasses; nothing is unpickled). numpy only.
* :mod:`.service` -- :class:`~.service.EngineService`, the request handlers (model, volumes, predict,
  prefetch, propagate, repropagate, segment a volume, robustness check). Runs in the worker (or in-process).
* :mod:`.server` -- the worker process's loop: a reader thread, one job thread, latest-wins prefetching,
  cancellation, progress (``python -m RobustMedSAMLib.worker``).
* :mod:`.requests` -- :class:`~.requests.Request` and the errors a request ends with (:class:`~.requests.EngineError`,
  :class:`~.requests.WorkerDied`, :class:`~.requests.RequestCancelled`), shared by both clients.
* :mod:`.client` -- :class:`~.client.WorkerClient` (starts the worker, non-blocking ``poll``, restarts it
  after a crash); :mod:`.inprocess` -- :class:`~.inprocess.InProcessClient` (same interface, same handlers,
  no process: batch scripts and tests); :mod:`.connection` -- what a front end keeps of the worker (model
  choice, volumes, debounced prefetch). torch is never imported on the client side.
"""
