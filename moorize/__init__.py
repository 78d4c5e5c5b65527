"""moorize: turn a pretrained Hugging Face checkpoint into a Mixture of Orthogonal Rank-one Experts."""

__version__ = "0.1.0"

from .errors import MoorizeError  # noqa: E402
from .format import FactoredCheckpoint, LayerRecord  # noqa: E402
from .convert import ConvertReport, convert  # noqa: E402
from .modeling import MoOREConfig, MoORELinear  # noqa: E402
from .routed import load, merge, moore_layers, prepare_for_training, use_task  # noqa: E402
from .adapter import read_adapter, save_adapter  # noqa: E402
from .training import TrainOptions, TrainReport, train  # noqa: E402
from .heads import MoOREClassifier, TaskHeads, load_classifier  # noqa: E402

__all__ = ["__version__", "MoorizeError", "FactoredCheckpoint", "LayerRecord", "ConvertReport", "convert",
           "MoOREConfig", "MoORELinear", "load", "merge", "moore_layers", "prepare_for_training", "use_task",
           "read_adapter", "save_adapter", "MoOREClassifier", "TaskHeads", "load_classifier", "train", "TrainOptions", "TrainReport"]
