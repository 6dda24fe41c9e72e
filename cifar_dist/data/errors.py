"""The one exception type for problems with data files."""

from __future__ import annotations

from cifar_dist.config.schema import ConfigError


class DataError(RuntimeError):
    """A data file is missing, corrupt, unsafe or unusable.

    The message is always ONE line naming the file and the problem: the CLI prints it
    without a traceback, so newlines coming from wrapped exceptions are folded here.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class BatchSizeError(ConfigError):
    """data.batch_size does not fit the data (more than the training split, or not divisible).

    Every rank computes the same answer from the same config and split, so the CLI prints it
    on rank 0 only (`rank0_only`): one line for the user, not one per process.
    """

    rank0_only = True
