#!/usr/bin/env bash
# Every GPU check in one command, for a CUDA machine held for a few minutes: the device tests
# (`pytest -m gpu`), then benchmarks/gpu.py. It uses the machine's own torch, transformers,
# accelerate, peft, onnx, onnxscript and onnxruntime, installs moorize from this checkout without
# dependencies, and installs any wheels in .whl/ first (onnxruntime-gpu, say). Logs, the
# environment and the figures (gpu.json) go to $OUT (default ./gpu-results); every step has its own
# time limit, so a lease that ends early still leaves what finished.
#
#   bash benchmarks/gpu_session.sh                   # tests + every benchmark part, 8B shapes at 4 blocks
#   bash benchmarks/gpu_session.sh --layers 32       # arguments go to benchmarks/gpu.py
#
#   MOORIZE_GPU_DEVICE   the device (default cuda; cpu rehearses the whole session, e.g. with --quick)
#   MOORIZE_GPU_TEST_S   limit for the tests (default 240 s)
#   MOORIZE_GPU_BENCH_S  limit for the benchmark (default 420 s)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moorize-site \
        .whl/*.whl >"$out/install.log" 2>&1 || { tail -5 "$out/install.log"; exit 1; }
    export PYTHONPATH="/tmp/moorize-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# editable where the machine's setuptools can (tests import this checkout), else a plain install
if ! "$py" -m pip install -q --no-deps --no-build-isolation -e . >>"$out/install.log" 2>&1; then
    "$py" -m pip install -q --no-deps --no-build-isolation --target /tmp/moorize-pkg . >>"$out/install.log" 2>&1 \
        || { echo "installing moorize failed:"; tail -5 "$out/install.log"; exit 1; }
    export PYTHONPATH="/tmp/moorize-pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    "$py" - <<'EOF'
import importlib.metadata as md
import torch
import onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())
for name in ("transformers", "accelerate", "peft", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
print("onnxruntime providers", ort.get_available_providers())
EOF
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
echo "== pytest -m gpu"
timeout "${MOORIZE_GPU_TEST_S:-240}" "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_devices.py 2>&1 \
    | tee "$out/tests.log" | tail -25
echo "== benchmarks/gpu.py"
timeout "${MOORIZE_GPU_BENCH_S:-420}" "$py" benchmarks/gpu.py --device "${MOORIZE_GPU_DEVICE:-cuda}" --json "$out/gpu.json" \
    --budget $(( ${MOORIZE_GPU_BENCH_S:-420} * 2 / 3 )) "$@" 2>&1 | tee "$out/bench.md"
