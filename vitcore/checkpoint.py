"""PLACEHOLDER: official-checkpoint mapping (model issue)."""

__all__ = ["LoadReport", "load_pretrained", "save_npz"]


class LoadReport:
    pass


def load_pretrained(model, path_or_arrays):
    raise NotImplementedError


def save_npz(model, path):
    raise NotImplementedError
