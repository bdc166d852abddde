#!/bin/sh
# Builds the otel_context extension (otel_context.c) for the python3 that will load it, into
# DIR (default: this directory). PYTHON and CC choose the interpreter and the compiler.
set -eu
here=$(dirname "$0")
out=${1:-$here}
py=${PYTHON:-python3}
include=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# TLSDESC, the dialect OTEP 4947 recommends for a module loaded with dlopen; relocations
# resolved at load, before any thread publishes.
"${CC:-gcc}" -shared -fPIC -O2 -Wall -Werror -mtls-dialect=gnu2 -Wl,-z,now \
    -I"$include" -o "$out/otel_context$suffix" "$here/otel_context.c"
