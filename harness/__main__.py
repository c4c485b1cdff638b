"""``python -m harness`` and the ``eph`` command.

Ctrl-C or SIGTERM while Python is still importing (nothing started, nothing to
keep) exits quietly with code 130 instead of a traceback. From then on ``eph``'s
own handling takes over: a run stops its children and keeps its data. It leaves
through :func:`harness.kernel.exit.run_and_exit`: no C++ destructor of pyarrow's
can abort it once its work is written.

numpy's OpenBLAS starts a thread per CPU as it is imported, and eph does no
linear algebra worth a second thread: one thread (unless the user chose) saves
0.09 s of CPU in every eph process, measured here (0.39 to 0.30 s for ``eph listen
--help``; a lab run starts five). The children inherit it.
"""

import os
import signal
import sys
from types import FrameType


def one_blas_thread() -> None:
    """numpy's BLAS on one thread, unless ``OPENBLAS_NUM_THREADS`` says otherwise."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _quiet(signum: int, frame: FrameType | None) -> None:
    sys.exit(130)


def run() -> None:
    previous = {sig: signal.signal(sig, _quiet) for sig in (signal.SIGINT, signal.SIGTERM)}
    one_blas_thread()  # before numpy is imported
    from harness.cli import main
    from harness.kernel.exit import run_and_exit

    for sig, handler in previous.items():
        signal.signal(sig, handler)
    run_and_exit(main)


if __name__ == "__main__":
    run()
