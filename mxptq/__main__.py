"""`python -m mxptq` and the `mxptq` console script. The command line's modules import torch and
transformers, seconds of start-up; a Ctrl-C in that time (or anywhere the commands do not catch
it themselves) ends with one line and exit 130, not a KeyboardInterrupt traceback."""

import sys


def main() -> None:
    try:
        from .cli import app

        app()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
