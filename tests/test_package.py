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


def _top_level_imports(package: str, skip: tuple[str, ...] = ()) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        if path.name in skip:
            continue
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


def test_benchmarks_import_train_only_to_measure_it():
    # What benchmarks and train both need (FLOPs, precisions) lives in vitcore/; the input-pipeline benchmark
    # measures train's own data path, so it is the one that may import it.
    assert "train" not in _top_level_imports("benchmarks", skip=("bench_input_pipeline.py",))
