"""Serving an export with ONNX Runtime: ``MoOREOrtModel`` (generate, classify) for ``moorize run``.

One InferenceSession serves every task of the model, since the task is a graph
input. A ``--with-past`` decoder export generates one token per step: the prefill
starts from an empty cache and each step feeds the previous ``present`` tensors
back as ``past_key_values``. Everything comes from the export directory
(``moorize_export.json``, tokenizer, graph and its weights).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MoorizeError
from ..io.jsonfiles import read_versioned_json
from .metadata import EXPORT_FORMAT, EXPORT_VERSION, META_FILE

log = logging.getLogger(__name__)



def default_providers() -> list[str]:
    """CUDA when this onnxruntime has it and a GPU is visible, else CPU (asked without torch, which a
    deployment may not have: a server with onnxruntime-gpu alone must still choose the GPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and nvidia_gpu_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


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


def read_export_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not directory.is_dir():
        raise MoorizeError(f"export directory {directory} does not exist")
    if not path.is_file():
        raise MoorizeError(f"{directory} is not a moorize export: {META_FILE} is missing")
    return read_versioned_json(path, EXPORT_FORMAT, EXPORT_VERSION, "moorize export")


@dataclass
class GenerationTimes:
    """Wall-clock seconds of the last generate call: the prefill and every decoding step."""

    prefill: float = 0.0
    steps: list[float] = field(default_factory=list)
    new_tokens: int = 0  # generated tokens over the batch (finished rows excluded)

    @property
    def total(self) -> float:
        return self.prefill + sum(self.steps)


class MoOREOrtModel:
    """An exported routed model in an ONNX Runtime session."""

    def __init__(self, directory: Path, meta: dict, session, tokenizer):
        self.directory, self.meta, self.session, self.tokenizer = directory, meta, session, tokenizer
        self.tasks: dict[str, int] = dict(meta["tasks"])
        self.labels: dict[str, list[str]] | None = meta.get("labels")
        self.kind: str = meta["kind"]
        self.with_past: bool = bool(meta.get("with_past"))
        self.float_dtype = np.float16 if meta.get("dtype") == "float16" else np.float32
        self.last_times = GenerationTimes()
        self.max_positions, self.vocab_size = model_limits(directory)

    @classmethod
    def from_export(cls, directory, providers: list[str] | None = None, session_options=None) -> "MoOREOrtModel":
        """Load DIR written by ``moorize export --onnx DIR``; providers default to CUDA when usable, else CPU."""
        import onnxruntime as ort

        directory = Path(directory)
        meta = read_export_meta(directory)
        graph = directory / meta.get("graph", "model.onnx")
        if not graph.is_file():
            raise MoorizeError(f"{directory} lacks its graph {graph.name}")
        try:
            session = ort.InferenceSession(str(graph), sess_options=session_options,
                                           providers=providers or default_providers())
        except Exception as e:  # a missing weights file, an unknown provider, ...
            raise MoorizeError(f"ONNX Runtime cannot load {graph}: {str(e).splitlines()[0]}") from None
        tokenizer = None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception:
            log.info("no tokenizer in %s: pass token ids", directory)
        return cls(directory, meta, session, tokenizer)

    @property
    def provider(self) -> str:
        """The execution provider the session actually runs on first (e.g. CUDAExecutionProvider)."""
        return self.session.get_providers()[0]

    # ---- tasks and raw forward -------------------------------------------------------------------
    def task_id(self, task) -> int:
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
            if not 0 <= int(task) < len(self.tasks):
                raise MoorizeError(f"task id {int(task)} out of range: the model has {len(self.tasks)} task(s) "
                                   f"({', '.join(self.tasks)})")
            return int(task)
        if task not in self.tasks:
            raise MoorizeError(f"unknown task {task!r}; tasks are: {', '.join(self.tasks)}")
        return self.tasks[task]

    def task_ids(self, task, batch: int) -> np.ndarray:
        """[batch] int64 ids from one task (name or id) or one per row."""
        if task is None:
            if len(self.tasks) != 1:
                raise MoorizeError(f"this model has several tasks: choose one of {', '.join(self.tasks)}")
            task = 0
        rows = list(task) if isinstance(task, (list, tuple, np.ndarray)) else [task] * batch
        if len(rows) != batch:
            raise MoorizeError(f"{len(rows)} tasks for a batch of {batch}")
        return np.array([self.task_id(t) for t in rows], dtype=np.int64)

    def run(self, input_ids, attention_mask, task_ids, past: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """One session call; ``task_ids`` is checked here, so a bad id is a clear error, not a Gather fault."""
        task_ids = np.asarray(task_ids, dtype=np.int64)
        if task_ids.size and (task_ids.min() < 0 or task_ids.max() >= len(self.tasks)):
            raise MoorizeError(f"task id out of range in {task_ids.tolist()}: the model has {len(self.tasks)} "
                               f"task(s) ({', '.join(self.tasks)})")
        names = self.meta["inputs"]
        ids, mask = self.check_ids(input_ids, attention_mask, past_length=0 if not past else past[0].shape[2])
        if task_ids.shape != (ids.shape[0],):
            raise MoorizeError(f"task_ids must have one id per row: got shape {list(task_ids.shape)} for a batch of "
                               f"{ids.shape[0]}")
        values = [ids, mask, task_ids]
        if self.with_past:
            values += past if past is not None else self.empty_past(ids.shape[0])
        try:
            return self.session.run(None, dict(zip(names, values)))
        except _ort_input_errors() as e:  # shapes or types ONNX Runtime refuses: the caller's input
            raise MoorizeError(f"ONNX Runtime refused the inputs: {str(e).splitlines()[0]}") from None

    def check_ids(self, input_ids, attention_mask=None, past_length: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (and mask) as the graph wants them, or one line saying what is wrong with them."""
        try:
            ids = np.asarray(input_ids)
        except (TypeError, ValueError):
            raise MoorizeError("input_ids must be a [batch, length] array of token ids") from None
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise MoorizeError(f"input_ids must be a [batch, length] array of integer token ids, got "
                               f"{ids.dtype} of shape {list(ids.shape)}")
        if ids.shape[0] == 0:
            raise MoorizeError("empty batch: no input to run")
        if ids.shape[1] == 0:
            raise MoorizeError("empty input: the prompt has no tokens")
        if self.vocab_size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.max() if ids.max() >= self.vocab_size else ids.min())
            raise MoorizeError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.max_positions and past_length + ids.shape[1] > self.max_positions:
            raise MoorizeError(f"{past_length + ids.shape[1]} tokens exceed the model's {self.max_positions} "
                               "positions")
        ids = ids.astype(np.int64, copy=False)
        mask = np.ones((ids.shape[0], past_length + ids.shape[1]), dtype=np.int64) if attention_mask is None \
            else np.asarray(attention_mask)
        if mask.shape != (ids.shape[0], past_length + ids.shape[1]) or mask.dtype.kind not in "iub":
            raise MoorizeError(f"attention_mask must be an integer array of shape {[ids.shape[0], past_length + ids.shape[1]]},"
                               f" got {mask.dtype} of shape {list(mask.shape)}")
        if not ((mask == 0) | (mask == 1)).all() or (mask.sum(1) == 0).any():
            raise MoorizeError("attention_mask must hold 0s and 1s, with at least one 1 (a token) in every row")
        return ids, mask.astype(np.int64, copy=False)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        kv = self.meta["kv"]
        shape = (batch, kv["num_kv_heads"], 0, kv["head_dim"])
        return [np.zeros(shape, dtype=self.float_dtype) for _ in range(2 * kv["num_layers"])]

    # ---- text ------------------------------------------------------------------------------------
    def _encode(self, texts: list[str], left_pad: bool):
        if self.tokenizer is None:
            raise MoorizeError(f"{self.directory} has no tokenizer: pass token ids to run()")
        if not texts:
            raise MoorizeError("empty batch: no input text")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise MoorizeError(f"input {i + 1} is {type(text).__name__}, not text")
        tok = self.tokenizer
        tok.padding_side = "left" if left_pad else "right"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        lengths = [len(x) for x in tok(texts)["input_ids"]]
        for i, n in enumerate(lengths):
            if n == 0:
                raise MoorizeError(f"input {i + 1} is empty: it has no tokens")
        limit = self.max_positions
        if limit and max(lengths) > limit:
            if self.kind == "decoder":
                raise MoorizeError(f"input {lengths.index(max(lengths)) + 1} has {max(lengths)} tokens: more than the "
                                   f"model's {limit} positions")
            log.warning("truncated %d of %d input(s) to the encoder's %d positions (as tokenizers do with "
                        "truncation=True)", sum(n > limit for n in lengths), len(texts), limit)
        enc = tok(texts, return_tensors="np", padding=True, truncation=bool(limit), max_length=limit)
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def generate(self, prompts, task=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> list[str]:
        """Continue each prompt (batched, left-padded); returns the new text of each."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        ids, mask = self._encode(prompts, left_pad=True)
        new = self.generate_ids(ids, mask, task, max_new_tokens, do_sample, temperature, top_p, seed)
        eos = set(self.meta.get("eos_token_id") or [])
        texts = []
        for row in new:
            keep = []
            for t in row.tolist():
                if t in eos:
                    break
                keep.append(t)
            texts.append(self.tokenizer.decode(keep, skip_special_tokens=True))
        return texts[0] if single else texts

    def generate_ids(self, input_ids, attention_mask=None, task=None, max_new_tokens: int = 32,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int | None = None) -> np.ndarray:
        """[batch, max_new_tokens] new token ids; rows that met EOS continue with the pad token."""
        if self.kind != "decoder":
            raise MoorizeError("generate() needs a decoder export; this one is an encoder (use classify())")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise MoorizeError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
        if do_sample and not (_finite(temperature) and temperature > 0 and _finite(top_p) and 0 < top_p <= 1):
            raise MoorizeError(f"sampling needs a finite temperature > 0 and 0 < top_p <= 1, got temperature "
                               f"{temperature!r}, top_p {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise MoorizeError(f"seed must be a non-negative integer, got {seed!r}")
        ids, mask = self.check_ids(input_ids, attention_mask)
        if self.max_positions and ids.shape[1] + max_new_tokens > self.max_positions:
            room = self.max_positions - ids.shape[1]
            log.warning("max_new_tokens %d capped to %d: the prompt's %d tokens leave no more of the model's %d "
                        "positions", max_new_tokens, room, ids.shape[1], self.max_positions)
            max_new_tokens = room
            if room < 1:
                raise MoorizeError(f"the prompt's {ids.shape[1]} tokens fill the model's {self.max_positions} "
                                   "positions: nothing left to generate")
        batch = ids.shape[0]
        tids = self.task_ids(task, batch)
        eos = np.array(self.meta.get("eos_token_id") or [], dtype=np.int64)
        pad = self.meta.get("pad_token_id")
        pad = int(pad) if pad is not None else (int(eos[0]) if eos.size else 0)
        rng = np.random.default_rng(seed)
        done = np.zeros(batch, dtype=bool)
        out = np.full((batch, max_new_tokens), pad, dtype=np.int64)
        times = GenerationTimes()
        past, step_ids, seq = None, ids, ids
        for i in range(max_new_tokens):
            t0 = time.perf_counter()
            outputs = self.run(step_ids, mask, tids, past)
            logits = outputs[0][:, -1].astype(np.float32)
            nxt = sample_nucleus(logits, rng, temperature, top_p) if do_sample else logits.argmax(-1)
            nxt = np.where(done, pad, nxt)
            dt = time.perf_counter() - t0
            if i == 0:
                times.prefill = dt
            else:
                times.steps.append(dt)
            times.new_tokens += int((~done).sum())
            out[:, i] = nxt
            done |= np.isin(nxt, eos)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], 1)
            if self.with_past:
                past, step_ids = list(outputs[1:]), nxt[:, None]
            else:  # no cache in the graph: recompute the whole sequence
                seq = np.concatenate([seq, nxt[:, None]], 1)
                step_ids = seq
            if done.all():
                out = out[:, : i + 1]
                break
        self.last_times = times
        return out

    def classify(self, texts, task=None) -> list[str]:
        """The arg-max label of each text under ``task`` (an encoder exported with its task heads)."""
        scores = self.scores(texts, task)
        name = self._task_name(task)
        return [self.labels[name][int(k)] for k in scores.argmax(-1)]

    def scores(self, texts, task=None) -> np.ndarray:
        """[batch, labels of the task] logits of the task heads."""
        if self.kind != "encoder" or not self.labels:
            raise MoorizeError("classify() needs an encoder exported with an adapter that has task heads")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, mask = self._encode(texts, left_pad=False)
        logits = self.run(ids, mask, self.task_ids(task, len(texts)))[0]
        return logits[:, : len(self.labels[self._task_name(task)])]

    def _task_name(self, task) -> str:
        tid = int(self.task_ids(task, 1)[0])
        return next(name for name, i in self.tasks.items() if i == tid)


def model_limits(directory: Path) -> tuple[int | None, int | None]:
    """(position limit, vocabulary size) from the export's config.json; None where it does not say."""
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(cfg, dict):
        return None, None
    cfg = {**cfg.get("text_config", {}), **cfg} if isinstance(cfg.get("text_config"), dict) else cfg

    def positive(*keys):
        for key in keys:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    return positive("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"), positive("vocab_size")


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _ort_input_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception for inputs it refuses (wrong rank, type, shape): the caller's error."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
    except ImportError:
        return ()
    return (InvalidArgument,)


def sample_nucleus(logits: np.ndarray, rng, temperature: float, top_p: float) -> np.ndarray:
    """Nucleus sampling per row: the smallest set of tokens whose probability reaches top_p."""
    z = logits / temperature
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    out = np.empty(p.shape[0], dtype=np.int64)
    for r in range(p.shape[0]):
        order = np.argsort(-p[r])
        cum = np.cumsum(p[r, order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        q = p[r, keep] / p[r, keep].sum()
        out[r] = keep[rng.choice(len(keep), p=q)]
    return out
