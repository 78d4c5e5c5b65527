"""Moved: the ONNX Runtime runtime is ``moorize.runtime`` (``moorize.runtime.session.MoOREOrtModel``).

This alias keeps ``from moorize.exporters.ort import MoOREOrtModel`` working for one release.
"""

from __future__ import annotations

import warnings

from ..runtime.format import read_export_meta  # noqa: F401
from ..runtime.generation import GenerationTimes  # noqa: F401
from ..runtime.limits import model_limits  # noqa: F401
from ..runtime.providers import default_providers, nvidia_gpu_visible  # noqa: F401
from ..runtime.sampling import sample_nucleus  # noqa: F401
from ..runtime.session import MoOREOrtModel  # noqa: F401

warnings.warn("moorize.exporters.ort moved to moorize.runtime (MoOREOrtModel: moorize.runtime.session); "
              "the old name goes in the next release", DeprecationWarning, stacklevel=2)
