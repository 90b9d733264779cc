"""``python -m blockopt``: the same command line as ``blockopt``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
