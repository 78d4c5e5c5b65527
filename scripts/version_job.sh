#!/usr/bin/env bash
# One job of the version matrix: a fresh environment .venv-NAME with the given torch, then the
# `versions` test subset (convert, load and its exactness, the layer's kernels, training and merge,
# ONNX export with and without --with-past and its validation, TorchScript / pt2, moorize run, compile).
#
#   bash scripts/version_job.sh NAME TORCH_REQUIREMENT [minimums]
#
#   bash scripts/version_job.sh min "torch==2.9.1" minimums   # every declared minimum pinned
#   bash scripts/version_job.sh newest torch                   # the newest torch on the index
#   bash scripts/version_job.sh t211 "torch==2.11.0"           # any other release
#
# With `minimums`, every lower bound of pyproject.toml is pinned (scripts/min_constraints.py).
# Torch releases other than the local CPU wheel are CUDA builds (~3 GB, kept in pip's cache); they run on
# the CPU. A machine-wide cap on torch (a pip constraints file) is lifted for this job's installs.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 torch_req=$2 mode=${3:-}
venv=".venv-$name"
if [ "$mode" = minimums ]; then
    python3 scripts/min_constraints.py > "$venv.constraints.txt"
    export MOORIZE_PIP_CONSTRAINTS="$venv.constraints.txt"
fi
PIP_CONSTRAINT=/dev/null MOORIZE_VENV="$venv" MOORIZE_TORCH="$torch_req" bash scripts/bootstrap.sh
"$venv/bin/python" -m pip list 2>/dev/null \
    | grep -E -i "^(torch|transformers|onnx|onnxruntime|onnxscript|accelerate|peft|numpy|safetensors) " | tr -s ' ' | paste -sd ' '
"$venv/bin/python" -m pytest -q -n 2 -m versions -p no:cacheprovider
