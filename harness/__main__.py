"""``python -m harness`` and the ``eph`` command.

Ctrl-C or SIGTERM while Python is still importing (nothing started, nothing to
keep) exits quietly with code 130 instead of a traceback. From then on ``eph``'s
own handling takes over: a run stops its children and keeps its data. It leaves
through :func:`harness.kernel.exit.run_and_exit`: no C++ destructor of pyarrow's
can abort it once its work is written.
"""

import signal
import sys
from types import FrameType


def _quiet(signum: int, frame: FrameType | None) -> None:
    sys.exit(130)


def run() -> None:
    previous = {sig: signal.signal(sig, _quiet) for sig in (signal.SIGINT, signal.SIGTERM)}
    from harness.cli import main
    from harness.kernel.exit import run_and_exit

    for sig, handler in previous.items():
        signal.signal(sig, handler)
    run_and_exit(main)


if __name__ == "__main__":
    run()
