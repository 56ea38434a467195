import pytest

import vitcore


def test_zoo_names_and_unknown_name_error():
    assert {"ViT-B_16", "ViT-H_14", "R50-ViT-B_16", "testing"} <= set(vitcore.CONFIGS)
    with pytest.raises(KeyError, match="valid names: .*ViT-B_16"):
        vitcore.CONFIGS["ViT-X_99"]


def test_extension_imports():
    from vitcore import _C

    assert _C.__doc__
