"""The ``ecf8`` command (``python -m ecf8``; the console script calls ``main``): ecf8/cli.py, with
Ctrl-C during its start-up (the imports of NumPy and the codec) handled like Ctrl-C later on."""

import os
import signal
import sys

_interrupted: list[int] = []


def _interrupt(signum, frame):
    """Python's Ctrl-C (KeyboardInterrupt), noted: an import can turn it into another error (NumPy's
    C extensions raise ImportError when interrupted while loading)."""
    _interrupted.append(signum)
    raise KeyboardInterrupt


def main() -> int:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:     # (an ignored one stays so)
        signal.signal(signal.SIGINT, _interrupt)
    try:
        from .cli import main as cli_main
    except BaseException as e:
        if not (_interrupted or isinstance(e, KeyboardInterrupt)):
            raise
        print("ecf8: interrupted", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
