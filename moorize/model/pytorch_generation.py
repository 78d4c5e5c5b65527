"""An adapter on its factored checkpoint in PyTorch, as text in and text (or class scores) out.

What ``moorize generate`` runs: judging an adapter takes seconds this way, where an
ONNX export takes minutes. Decoding is transformers' own ``generate`` on the routed
model, so greedy output equals what the export and ``moorize run`` produce.

With ``compile=True`` the decode step runs as one ``torch.compile(fullgraph=True)`` graph over a
static KV cache (transformers' own compiled-generation path): CUDA graphs on a GPU
(``reduce-overhead``), inductor's code on the CPU. The first call pays the compile; later calls
of the same batch and length reuse it (inductor also caches its code on disk across processes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MoorizeError
from .adapter import read_adapter_config


def compiled_decoding(device: torch.device) -> dict:
    """``generate`` keywords for a static KV cache whose decode step transformers compiles whole, on any device
    (CUDA graphs, ``reduce-overhead``, on a GPU). MOORIZE_COMPILE_BACKEND picks another torch.compile backend,
    as for ``moorize train --compile`` (``aot_eager``: capture without code generation)."""
    import os

    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False,
                           mode="reduce-overhead" if torch.device(device).type == "cuda" else "default",
                           backend=os.environ.get("MOORIZE_COMPILE_BACKEND", "inductor"))
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return {"cache_implementation": "static", "compile_config": config, "disable_compile": False}


class PyTorchGenerator:
    """The routed model of ``factored_dir`` (with ``adapter`` when given) on one device, with its tokenizer."""

    def __init__(self, factored_dir, adapter=None, device: torch.device | str = "cpu", compile: bool = False):
        from transformers import AutoTokenizer

        from .heads import load_classifier
        from .routed import load

        self.device = torch.device(device)
        self.compile = compile
        self.directory = Path(factored_dir)
        heads = adapter is not None and "heads" in read_adapter_config(adapter)
        if compile and heads:
            raise MoorizeError("--compile compiles text generation; a classifier adapter scores classes in one "
                               "forward, so leave --compile out")
        if heads:
            self.model = load_classifier(factored_dir, adapter)
            self.kind = "classifier"
            self.tasks = list(self.model.tasks)
        else:
            self.model = load(factored_dir, adapter).eval()
            config = self.model.config
            self.kind = "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "decoder"
            if not hasattr(self.model, "generate") or not getattr(self.model, "can_generate", lambda: False)():
                raise MoorizeError(f"{factored_dir} holds a {type(self.model).__name__}, which does not generate text; "
                                   "train a classifier adapter (text/label data) to score classes")
            self.tasks = list(self.model.moore.config.tasks)
        self.model.to(self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.directory)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure is the same one line for the user
            raise MoorizeError(f"{factored_dir} has no usable tokenizer ({type(e).__name__}); moorize convert copies "
                               "the source's tokenizer files, so convert from a directory that has them") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _encode(self, texts: list[str], left_pad: bool):
        tok = self.tokenizer
        tok.padding_side = "left" if left_pad else "right"
        limit = getattr(self.model.config, "max_position_embeddings", None) if self.kind != "classifier" else None
        enc = tok(texts, return_tensors="pt", padding=True)
        for i, n in enumerate(enc["attention_mask"].sum(1).tolist()):
            if n == 0:
                raise MoorizeError(f"input {i + 1} is empty: it has no tokens")
            if limit and n > limit:
                raise MoorizeError(f"input {i + 1} has {n} tokens: more than the model's {limit} positions")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def generate(self, texts: list[str], tasks: list[str], *, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 num_beams: int = 1) -> list[str]:
        """The new text of each prompt (greedy unless ``do_sample``; beam search with ``num_beams`` > 1), cut at
        the end-of-sequence token. The generation config's own ``num_beams`` is not applied: greedy unless asked,
        as the export's runtime does."""
        ids, mask = self._encode(texts, left_pad=self.kind == "decoder")
        if seed is not None:
            torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        compiled = compiled_decoding(self.device) if self.compile else {}
        out = self.model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, max_new_tokens=max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, num_beams=num_beams, **sampling,
                                  **compiled)
        new = out[:, ids.shape[1]:] if self.kind == "decoder" else out
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]

    @torch.no_grad()
    def classify(self, texts: list[str], tasks: list[str]) -> list[dict]:
        """Each text's label and the probability of every label of its task."""
        ids, mask = self._encode(texts, left_pad=False)
        logits = self.model(ids, mask, tasks).float()
        out = []
        for row, task in zip(logits, tasks):
            labels = self.model.labels[task]
            probs = torch.softmax(row[: len(labels)], -1).tolist()
            best = max(range(len(labels)), key=probs.__getitem__)
            out.append({"output": labels[best], "scores": {lab: round(p, 6) for lab, p in zip(labels, probs)}})
        return out
