"""PLACEHOLDER: the VisionTransformer module (model issue)."""

__all__ = ["VisionTransformer"]


class VisionTransformer:
    pass
