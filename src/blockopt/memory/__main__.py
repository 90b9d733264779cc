"""``python -m blockopt.memory '<json>'``: one setup's measured run (what :func:`blockopt.memory.measure`
starts for each setup); the record is the last line of stdout."""

import sys

from .child import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
