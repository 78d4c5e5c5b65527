"""Which ONNX Runtime execution providers a session gets by default: CUDA where usable, else the CPU."""

from __future__ import annotations


def default_providers() -> list[str]:
    """CUDA when this onnxruntime has it and a GPU is visible, else CPU (asked without torch, which a
    deployment may not have: a server with onnxruntime-gpu alone must still choose the GPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and nvidia_gpu_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def checked_providers(providers: list[str]) -> list[str]:
    """The user's providers, each one this onnxruntime has: ONNX Runtime itself only warns about an unknown
    one and runs on the CPU, which a user who asked for the GPU would not notice."""
    import onnxruntime as ort

    from ..selectors import require_matches

    require_matches("--provider", providers, ort.get_available_providers(), noun="execution provider",
                    plural=f"execution providers in this onnxruntime ({ort.__version__})")
    return list(providers)


def nvidia_gpu_visible() -> bool:
    """Whether this process can see an NVIDIA GPU: not hidden by ``CUDA_VISIBLE_DEVICES``, and on Linux
    a device file of the driver present. Elsewhere ONNX Runtime is trusted to fall back to the CPU."""
    import glob
    import os
    import sys

    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False
    if sys.platform.startswith("linux"):
        return bool(glob.glob("/dev/nvidia[0-9]*"))
    return True
