"""Builds vitcore's one compiled module (the npz/zip/npy reader) with torch's cpp_extension.

Everything else (name, version, dependencies, packages) is in pyproject.toml.
"""

import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            name="vitcore._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3"],
            libraries=["z"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
