#!/usr/bin/env bash
# Sets up libtorch for the rso-tch crate without a libtorch download: installs the
# torch==2.11.0 wheel (which carries libtorch 2.11.0, the version tch 0.24 expects) into .venv/
# at the repository root, and lays out .venv/libtorch/ (include/, lib/, build-version) for
# torch-sys, which .cargo/config.toml points LIBTORCH at.
#
# Idempotent: when the venv already holds torch 2.11.0 and the layout is in place it does
# nothing. Environment: PYTHON (default python3) creates the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
VENV=.venv
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "setup-libtorch: creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

# importlib.metadata reads the version without importing torch (which takes seconds).
installed=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ "${installed%%+*}" != "$TORCH_VERSION" ]; then
    echo "setup-libtorch: installing torch==$TORCH_VERSION into $VENV (found: ${installed:-none})"
    "$PY" -m pip install --disable-pip-version-check --no-input "torch==$TORCH_VERSION"
fi

torch_dir=$("$PY" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])')
if [ ! -f "$torch_dir/lib/libtorch_cpu.so" ] || [ ! -d "$torch_dir/include" ]; then
    echo "setup-libtorch: $torch_dir has no lib/libtorch_cpu.so or include/; reinstall torch" >&2
    exit 1
fi

# The layout torch-sys expects of LIBTORCH; build-version lets it check the version.
lt="$VENV/libtorch"
mkdir -p "$lt"
for d in include lib; do
    if [ "$(readlink "$lt/$d" 2>/dev/null || true)" != "$torch_dir/$d" ]; then
        ln -sfn "$torch_dir/$d" "$lt/$d"
    fi
done
if [ "$(cat "$lt/build-version" 2>/dev/null || true)" != "$TORCH_VERSION" ]; then
    echo "$TORCH_VERSION" > "$lt/build-version"
fi
echo "setup-libtorch: libtorch $TORCH_VERSION ready in $lt"
