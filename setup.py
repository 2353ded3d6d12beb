"""Builds modelpress's one C extension; all metadata lives in pyproject.toml.

The extension is optional: without a C compiler the package still installs, and the `fans` codec
reports that it is unavailable (modelpress.codecs.NATIVE_AVAILABLE is False).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("modelpress.codecs._fcodec", ["src/modelpress/codecs/_fcodec.c"], optional=True, extra_compile_args=["-O3"]),
    ],
)
