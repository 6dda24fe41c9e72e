"""The one exception type for problems with data files."""

from __future__ import annotations


class DataError(RuntimeError):
    """A data file is missing, corrupt, unsafe or unusable.

    The message is always ONE line naming the file and the problem: the CLI prints it
    without a traceback, so newlines coming from wrapped exceptions are folded here.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
