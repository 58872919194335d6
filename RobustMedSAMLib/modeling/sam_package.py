"""Use ``segment_anything.modeling`` without running ``segment_anything/__init__.py`` first.

The package's ``__init__`` imports ``SamPredictor`` and ``SamAutomaticMaskGenerator``, which import
torchvision: about 1.9 s and 0.16 GiB of resident memory on the build machine, for code the engine never
calls (it builds on the modeling classes only). :func:`defer_package_init` registers the package module
without executing its ``__init__``; the submodules (``segment_anything.modeling``, ``.utils``, ...) import
normally, and the first access to a name the ``__init__`` defines (``sam_model_registry``,
``SamPredictor``, ...) runs it then, so other code in the process (tests, user scripts in Slicer) sees the
usual package. Nothing happens if the package was imported already or is not installed.
"""
from __future__ import annotations

import importlib.util
import sys
import threading

PACKAGE = "segment_anything"
_lock = threading.RLock()


def defer_package_init(package: str = PACKAGE) -> bool:
    """Register ``package`` with its ``__init__`` deferred to the first attribute access; True if done now."""
    with _lock:
        if package in sys.modules:
            return False
        spec = importlib.util.find_spec(package)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return False  # not installed (the real import then raises the usual error) or not a package
        module = importlib.util.module_from_spec(spec)

        def __getattr__(name: str):
            if name.startswith("__"):  # e.g. __version__, __all__ probes: do not trigger the import
                raise AttributeError(name)
            with _lock:
                if module.__dict__.get("__getattr__") is __getattr__:
                    del module.__dict__["__getattr__"]
                    try:
                        spec.loader.exec_module(module)  # the package's own __init__, in place
                    except BaseException:
                        module.__getattr__ = __getattr__  # still deferred: the next access tries again
                        raise
            try:
                return module.__dict__[name]
            except KeyError:
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

        module.__getattr__ = __getattr__
        sys.modules[package] = module
        return True
