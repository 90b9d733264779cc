"""The one error type of the bench harness for bad user input."""

from __future__ import annotations

__all__ = ["BenchInputError"]


class BenchInputError(ValueError):
    """Bad input to ``blockopt bench`` / ``blockopt plan``: a missing data path, an unknown
    optimizer or model, a malformed list, a missing optional package, an output folder
    that holds another sweep. The message is one line that names the argument, the bad
    value and what is allowed; the CLI prints it and exits with status 2."""
