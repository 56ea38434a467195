import ast
import pathlib

import pytest

import vitcore

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_zoo_names_and_unknown_name_error():
    assert {"ViT-B_16", "ViT-H_14", "R50-ViT-B_16", "testing"} <= set(vitcore.CONFIGS)
    with pytest.raises(KeyError, match="valid names: .*ViT-B_16"):
        vitcore.CONFIGS["ViT-X_99"]


def test_extension_imports():
    from vitcore import _C

    assert _C.__doc__


def _top_level_imports(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    "package, forbidden",
    [("kernels", {"vitcore", "train", "numpy", "scipy"}), ("vitcore", {"train"})],
)
def test_data_flows_one_way(package, forbidden):
    # DESIGN.md: train/ imports vitcore/; vitcore/ imports kernels/; kernels/ imports only torch and triton.
    assert not (_top_level_imports(package) & forbidden)
