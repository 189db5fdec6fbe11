#!/bin/sh
echo "bazel coverage is not supported offline in mxmoe" >&2
exit 1
