"""The ``ecf8`` command (``python -m ecf8``; the console script calls ``main``): ecf8/cli.py, with
Ctrl-C during its start-up (the imports of NumPy and the codec) handled like Ctrl-C later on."""

import os
import sys


def main() -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("ecf8: interrupted", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
