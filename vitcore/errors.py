"""The exception classes vitcore raises for bad input."""

__all__ = ["NpzError", "CheckpointError"]


class NpzError(ValueError):
    """A `.npz`/`.npy` file that cannot be read: names the file, the member and the problem."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: lists every offending name and both shapes."""
