"""Builds kvfabric._native from native/ with the system C compiler.

A failed build is an install error: the package has no silent pure-Python fallback.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvfabric._native",
            sources=["native/kvfabric_native.c"],
            depends=[
                "native/third_party/xxhash.h",
                "native/third_party/xxh_x86dispatch.c",
                "native/third_party/xxh_x86dispatch.h",
            ],
            include_dirs=["native", "native/third_party"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror"],
            optional=False,
        )
    ]
)
