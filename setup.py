"""Builds modelpress's C extensions; all metadata lives in pyproject.toml.

The extensions are optional: without a C compiler the package still installs, the `fans` codec
reports that it is unavailable (modelpress.codecs.NATIVE_AVAILABLE is False), and compressed
Linear layers run on the portable PyTorch kernel (modelpress.nn.qmatmul.NATIVE_AVAILABLE is False).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("modelpress.codecs._fcodec", ["src/modelpress/codecs/_fcodec.c"], optional=True, extra_compile_args=["-O3"]),
        Extension("modelpress.nn._qmatmul", ["src/modelpress/nn/_qmatmul.c"], optional=True,
                  extra_compile_args=["-O3", "-ffp-contract=off", "-pthread"], extra_link_args=["-pthread"]),
    ],
)
