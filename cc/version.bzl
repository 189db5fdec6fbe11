"""The library version in Bazel, for the shared library's SONAME and the install layout.

Must equal MXMOE_VERSION_MAJOR/MINOR/PATCH in cc/include/mxmoe/mxmoe.h and the version node of
cc/libmxmoe.map (MXMOE_<major>); tests/build/libmxmoe_symbols_test.sh checks all three.
"""

MXMOE_VERSION = "0.1.0"

MXMOE_SOVERSION = MXMOE_VERSION.split(".")[0]
