#!/usr/bin/env bash
# Take a fresh machine (Python 3.11) to a working featcache environment in a project-local venv.
#
# Idempotent: a stamp holding the hash of every input (constraints, package lists, this script,
# setup.cfg, the CUDA switches) makes a second run return in well under a second. Versions are
# pinned only in requirements/constraints.txt.
#
# GPU machines: FEATCACHE_CUDA=1 builds mmcv's ops with CUDA (FORCE_CUDA=1) and installs the spconv
# wheel named by FEATCACHE_SPCONV (e.g. spconv-cu121); point pip at a CUDA torch 2.13.0 build with
# PIP_EXTRA_INDEX_URL. The CPU path (defaults) is unchanged by these switches.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEATCACHE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
CUDA="${FEATCACHE_CUDA:-0}"
SPCONV="${FEATCACHE_SPCONV:-spconv}"
REQ="$ROOT/requirements"
CONSTRAINTS="$REQ/constraints.txt"

stamp_inputs() {
  cat "$CONSTRAINTS" "$REQ/runtime.txt" "$REQ/nodeps.txt" "$ROOT/tools/setup_env.sh" "$ROOT/setup.cfg"
  echo "cuda=$CUDA spconv=$SPCONV extra_index=${PIP_EXTRA_INDEX_URL:-}"
}
STAMP_WANT="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
STAMP_FILE="$VENV/.featcache-setup-stamp"
if [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP_WANT" ]]; then
  echo "setup_env: $VENV is up to date"
  exit 0
fi

start=$(date +%s)
log() { echo "setup_env [$(( $(date +%s) - start ))s]: $*"; }

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"featcache needs Python 3.11, found {sys.version}"'
[[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_PROGRESS_BAR=off
# This machine's pip config lists optional local wheel folders; their absence is not an error.
pip_install() { "${PIP[@]}" install "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; return "${PIPESTATUS[0]}"; }

log "build tools"
pip_install -q -c "$CONSTRAINTS" setuptools wheel
log "torch and runtime dependencies"
pip_install -q -c "$CONSTRAINTS" -r "$REQ/runtime.txt"
log "spconv ($SPCONV)"
pip_install -q -c "$CONSTRAINTS" "$SPCONV"
# mmcv 2.1.0 ships only as source; it compiles against the installed torch (hence no build
# isolation). pip's wheel cache keeps the built wheel, so this compiles once per machine.
log "mmcv (compiled once, then taken from pip's wheel cache)"
MMCV_WITH_OPS=1 FORCE_CUDA="$CUDA" MAX_JOBS="${MAX_JOBS:-2}" \
  pip_install -q --no-build-isolation -c "$CONSTRAINTS" mmcv
log "mmdet3d and its SDKs (--no-deps)"
pip_install -q --no-deps -c "$CONSTRAINTS" -r "$REQ/nodeps.txt"
log "featcache (editable)"
pip_install -q --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c 'import mmdet3d, mmcv.ops, spconv.pytorch, zarr, onnxruntime, onnxscript, featcache, trainer; print("setup_env: imports ok")'
echo "$STAMP_WANT" > "$STAMP_FILE"
log "done"
