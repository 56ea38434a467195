"""PLACEHOLDER: attention rollout (model issue)."""

__all__ = ["attention_rollout"]


def attention_rollout(attentions):
    raise NotImplementedError
