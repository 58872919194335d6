"""``python -m RobustMedSAMLib.worker``: the engine worker process (see :mod:`RobustMedSAMLib.worker.server`)."""
import os
import sys

from .server import main

if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (threads blocked in reads, library atexit hooks)
