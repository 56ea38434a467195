"""Test-wide set-up: the Triton interpreter on CPU, hypothesis profiles, the `gpu` marker."""

import os

import pytest
import torch

# The interpreter must be chosen before triton is first imported (kernels import it lazily).
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Interpreted kernels are slow and their run time varies with machine load: no deadline, no too-slow check.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=6, derandomize=True, **_COMMON)  # quick and reproducible
settings.register_profile("dev", max_examples=20, **_COMMON)
settings.register_profile("thorough", max_examples=100, **_COMMON)  # GPU runs
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
