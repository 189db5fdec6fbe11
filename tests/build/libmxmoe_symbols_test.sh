#!/usr/bin/env bash
# libmxmoe.so as a C/C++ stack sees it: SONAME libmxmoe.so.<major>, and its dynamic symbol table
# defines exactly the functions declared in mxmoe.h (no CUTLASS, cudart or libstdc++ copies that
# could clash with another user of those in the same process). The version in mxmoe.h,
# cc/version.bzl and the version script's node must agree.
# Arguments: libmxmoe.so, mxmoe.h, cc/version.bzl, cc/libmxmoe.map.
set -euo pipefail
lib="$1" header="$2" version_bzl="$3" map="$4"

fail() { echo "FAIL: $*" >&2; exit 1; }

define() { sed -n "s/^#define $1 \([0-9]*\)$/\1/p" "${header}"; }
major="$(define MXMOE_VERSION_MAJOR)"
version="${major}.$(define MXMOE_VERSION_MINOR).$(define MXMOE_VERSION_PATCH)"
[[ -n "${major}" ]] || fail "no MXMOE_VERSION_MAJOR in ${header}"
bzl_version="$(sed -n 's/^MXMOE_VERSION = "\(.*\)"$/\1/p' "${version_bzl}")"
[[ "${bzl_version}" == "${version}" ]] \
  || fail "cc/version.bzl says ${bzl_version}, mxmoe.h says ${version}"
grep -q "^MXMOE_${major} {" "${map}" || fail "${map} has no version node MXMOE_${major}"

soname="$(readelf -d "${lib}" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
[[ "${soname}" == "libmxmoe.so.${major}" ]] || fail "SONAME is '${soname}', want libmxmoe.so.${major}"

# Defined dynamic symbols, without the version node itself (an absolute symbol named MXMOE_0).
exported="$(nm -D --defined-only "${lib}" | awk '$2 != "A" {print $3}' | sed 's/@.*//' | sort -u)"
# Functions declared in the header: "name(" outside comments.
declared="$(sed 's://.*$::' "${header}" | grep -oE '\bmxmoe_[a-z0-9_]+\(' | tr -d '(' | sort -u)"
[[ -n "${declared}" ]] || fail "found no function declarations in ${header}"

unexpected="$(comm -23 <(echo "${exported}") <(echo "${declared}"))"
missing="$(comm -13 <(echo "${exported}") <(echo "${declared}"))"
[[ -z "${unexpected}" ]] || fail "exported but not in mxmoe.h ($(wc -l <<<"${unexpected}")):
$(head -n 20 <<<"${unexpected}")"
[[ -z "${missing}" ]] || fail "declared in mxmoe.h but not exported: ${missing}"
echo "PASS: ${soname} exports exactly the $(wc -l <<<"${declared}") mxmoe_* functions of mxmoe.h"
