"""Builds vitcore's one compiled module (the npz/zip/npy reader) with torch's cpp_extension."""

import glob

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    name="vitcore",
    version="0.1.0",
    description="Vision Transformer fine-tuning with official checkpoints and Triton kernels",
    packages=find_packages(include=["vitcore*", "kernels*", "train*"]),
    python_requires=">=3.10",
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
