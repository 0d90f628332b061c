"""`python -m mxptq` and the `mxptq` console script: a Ctrl-C at any moment, even while torch and
transformers import, ends with one line and exit 130, not a traceback (mxptq.interrupts)."""

import sys

from .interrupts import RECEIVED, start_up


def main() -> None:
    start_up()
    try:
        from .cli import app

        app()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except Exception:
        if not RECEIVED:
            raise
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
