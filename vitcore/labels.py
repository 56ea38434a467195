"""Class names of the official ImageNet-1k heads (i21k+i1k, SAM and AugReg's imagenet2012 fine-tunings).

`data/imagenet1k_classes.txt` holds one line per class, `<wnid>\\t<WordNet lemmas>`, in the official label order:
the ILSVRC2012 synsets sorted by wnid (index 0 is n01440764, "tench"). The lemmas are those of the official
`ilsvrc2012_wordnet_lemmas.txt` with spaces for underscores (taken from timm's packaged synset tables).
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["imagenet1k_wnids", "imagenet1k_classes", "class_names"]


@functools.lru_cache(maxsize=1)
def _rows() -> tuple[tuple[str, str], ...]:
    text = resources.files("vitcore").joinpath("data", "imagenet1k_classes.txt").read_text(encoding="utf-8")
    return tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line)


def imagenet1k_wnids() -> list[str]:
    """The 1000 WordNet ids in label order (sorted), e.g. `root/test/<wnid>/` folders of an ImageNet val set."""
    return [wnid for wnid, _ in _rows()]


def imagenet1k_classes() -> list[str]:
    """The 1000 class names in label order: each class's first lemma ("tench", "goldfish", "great white shark").

    Two pairs share a first lemma as in ImageNet itself: 134 and 517 are both "crane" (the bird, the machine),
    638 and 639 "maillot".
    """
    return [lemmas.split(", ")[0] for _, lemmas in _rows()]


def class_names(num_classes: int) -> list[str]:
    """Names for a head of `num_classes` outputs: ImageNet-1k's for 1000, else the indices as strings."""
    return imagenet1k_classes() if num_classes == 1000 else [str(i) for i in range(num_classes)]
