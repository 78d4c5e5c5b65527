"""``MoOREOrtModel``: an exported routed model in one ONNX Runtime session, for ``moorize run`` and the server.

One InferenceSession serves every task of the model, since the task is a graph input (an
encoder-decoder has two: its encoder's and its decoder's). Everything
comes from the export directory (``moorize_export.json``, tokenizer, graph and its weights). Every
input is checked here, so a bad one is one line, not an ONNX Runtime fault.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import MoorizeError
from ..selectors import require_name
from .format import META_FILE, read_export_meta
from .generation import GenerationTimes, generate_ids
from .limits import model_limits
from .providers import checked_providers, default_providers

log = logging.getLogger(__name__)


class MoOREOrtModel:
    """An exported routed model in an ONNX Runtime session."""

    def __init__(self, directory: Path, meta: dict, session, tokenizer, encoder_session=None):
        """``session`` runs the graph (an encoder-decoder's decoder); ``encoder_session`` an encoder-decoder's
        encoder."""
        self.directory, self.meta, self.session, self.tokenizer = directory, meta, session, tokenizer
        self.encoder_session = encoder_session
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
        graphs = meta.get("graphs") or {"model": {"file": meta.get("graph", "model.onnx")}}
        if not isinstance(graphs, dict) or not all(isinstance(g, dict) and isinstance(g.get("file"), str)
                                                   for g in graphs.values()):
            raise MoorizeError(f"{directory / META_FILE}: 'graphs' must map names to {{\"file\": ...}}")
        providers = checked_providers(providers) if providers else default_providers()
        sessions = {}
        for stem, spec in graphs.items():
            graph = directory / spec["file"]
            if not graph.is_file():
                raise MoorizeError(f"{directory} lacks its graph {graph.name}")
            try:
                sessions[stem] = ort.InferenceSession(str(graph), sess_options=session_options, providers=providers)
            except Exception as e:  # a missing weights file, an unknown provider, ...
                raise MoorizeError(f"ONNX Runtime cannot load {graph}: {str(e).splitlines()[0]}") from None
        main = sessions.get("model") or sessions.get("decoder")
        wanted = {"encoder", "decoder"} if meta.get("kind") == "encoder-decoder" else {"model"}
        if set(sessions) != wanted:
            raise MoorizeError(f"{directory / META_FILE}: a {meta.get('kind')} export has the graphs "
                               f"{', '.join(sorted(wanted))}, this one lists {', '.join(sorted(sessions))}")
        tokenizer = None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception:
            log.info("no tokenizer in %s: pass token ids", directory)
        return cls(directory, meta, main, tokenizer, sessions.get("encoder"))

    @property
    def generates(self) -> bool:
        """Whether the export writes text (a decoder or an encoder-decoder), rather than classifying."""
        return self.kind in ("decoder", "encoder-decoder")

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
        return self.tasks[require_name("task", task, self.tasks, noun="task")]

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
        if self.kind == "encoder-decoder":
            raise MoorizeError("an encoder-decoder export runs in two graphs: use encode() and decode(), or "
                               "generate()")
        ids, mask = self.check_ids(input_ids, attention_mask, past_length=0 if not past else past[0].shape[2])
        values = [ids, mask, self._checked_task_ids(task_ids, ids.shape[0])]
        if self.with_past:
            values += past if past is not None else self.empty_past(ids.shape[0])
        return self._session_run(self.session, dict(zip(self.meta["inputs"], values)))

    def encode(self, input_ids, attention_mask, task_ids) -> np.ndarray:
        """An encoder-decoder's encoder: [batch, length, hidden] states of the (right-padded) input."""
        return self.encode_with_cache(input_ids, attention_mask, task_ids)[0]

    def encode_with_cache(self, input_ids, attention_mask, task_ids) -> tuple[np.ndarray, list[np.ndarray]]:
        """The encoder's states and, from an export with past, every decoder layer's cross-attention keys and
        values (``decode_step`` takes them; none without past)."""
        self._need_seq2seq("encode()")
        ids, mask = self.check_ids(input_ids, attention_mask)
        values = {"input_ids": ids, "attention_mask": mask, "task_ids": self._checked_task_ids(task_ids, len(ids))}
        states, *cross = self._session_run(self.encoder_session, values)
        return states, cross

    def decode(self, decoder_input_ids, encoder_hidden_states, attention_mask, task_ids) -> np.ndarray:
        """An encoder-decoder's decoder: [batch, target length, vocab] logits of the target so far, given the
        encoder's states and its input's mask (an export without past; one with past decodes by ``decode_step``)."""
        if self.with_past:
            raise MoorizeError("this encoder-decoder was exported with past: its decoder takes its caches, use "
                               "decode_step() (or generate())")
        return self._session_run(self.session, self._decoder_feed(decoder_input_ids, encoder_hidden_states,
                                                                  attention_mask, task_ids))[0]

    def decode_step(self, decoder_input_ids, encoder_hidden_states, attention_mask, task_ids,
                    past: list[np.ndarray] | None, cross: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step of an encoder-decoder exported with past: [batch, new tokens, vocab] logits of the new target
        tokens after the self-attention cache ``past`` (None: the first step), given the encoder's states, mask and
        cross-attention cache (``encode_with_cache``); and the self-attention cache with the new tokens."""
        if not self.with_past:
            raise MoorizeError("decode_step() needs an encoder-decoder exported with --with-past; this one "
                               "recomputes its target each step: use decode()")
        feed = self._decoder_feed(decoder_input_ids, encoder_hidden_states, attention_mask, task_ids)
        layers = self.meta["kv"]["num_layers"]
        past = past if past is not None else self.empty_past(len(feed["decoder_input_ids"]))
        if len(past) != 2 * layers or len(cross) != 2 * layers:
            raise MoorizeError(f"decode_step(): the decoder has {layers} layers, so past and cross take "
                               f"{2 * layers} arrays each, got {len(past)} and {len(cross)}")
        names = self.meta["graphs"]["decoder"]["inputs"][4:]
        feed.update(zip(names, [*past, *cross]))
        logits, *present = self._session_run(self.session, feed)
        return logits, present

    def _decoder_feed(self, decoder_input_ids, encoder_hidden_states, attention_mask, task_ids) -> dict:
        """The decoder's first four inputs, checked against each other."""
        self._need_seq2seq("decode()")
        states = np.asarray(encoder_hidden_states, dtype=self.float_dtype)
        ids, _ = self.check_ids(decoder_input_ids)
        enc_mask = np.asarray(attention_mask)
        if states.ndim != 3 or enc_mask.shape != states.shape[:2] or len(ids) != len(states):
            raise MoorizeError(f"decode(): encoder_hidden_states [batch, length, hidden] and attention_mask [batch, "
                               f"length] must match the decoder's batch of {len(ids)}, got {list(states.shape)} and "
                               f"{list(enc_mask.shape)}")
        return {"decoder_input_ids": ids, "encoder_hidden_states": states,
                "attention_mask": enc_mask.astype(np.int64, copy=False),
                "task_ids": self._checked_task_ids(task_ids, len(ids))}

    def _need_seq2seq(self, what: str) -> None:
        if self.kind != "encoder-decoder":
            raise MoorizeError(f"{what} is for encoder-decoder exports; this one is a {self.kind} (use run())")

    def _checked_task_ids(self, task_ids, batch: int) -> np.ndarray:
        task_ids = np.asarray(task_ids, dtype=np.int64)
        if task_ids.size and (task_ids.min() < 0 or task_ids.max() >= len(self.tasks)):
            raise MoorizeError(f"task id out of range in {task_ids.tolist()}: the model has {len(self.tasks)} "
                               f"task(s) ({', '.join(self.tasks)})")
        if task_ids.shape != (batch,):
            raise MoorizeError(f"task_ids must have one id per row: got shape {list(task_ids.shape)} for a batch of "
                               f"{batch}")
        return task_ids

    @staticmethod
    def _session_run(session, values: dict) -> list[np.ndarray]:
        try:
            return session.run(None, values)
        except ort_input_errors() as e:  # shapes or types ONNX Runtime refuses: the caller's input
            raise MoorizeError(f"ONNX Runtime refused the inputs: {str(e).splitlines()[0]}") from None

    def image_features(self, pixel_values, task=None) -> np.ndarray:
        """[batch, tokens, hidden] of an image-encoder export (kind 'vision') for ``pixel_values`` [batch, channels,
        height, width] at the size the model was made for; ``task`` one name or id, or one per image."""
        if self.kind != "vision":
            raise MoorizeError(f"image_features() needs an image-encoder export; this one is a {self.kind}")
        try:
            px = np.asarray(pixel_values, dtype=self.float_dtype)
        except (TypeError, ValueError):
            raise MoorizeError("pixel_values must be a [batch, channels, height, width] array of numbers") from None
        if px.ndim != 4 or px.shape[0] == 0 or not np.isfinite(px).all():
            raise MoorizeError(f"pixel_values must be a non-empty [batch, channels, height, width] array of finite "
                               f"numbers, got shape {list(px.shape)}")
        values = {"pixel_values": px, "task_ids": self.task_ids(task, px.shape[0])}
        try:
            return self.session.run(None, values)[0]
        except ort_input_errors() as e:  # another image size or channel count than the graph's
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
        key = (batch, kv["num_kv_heads"], 0, kv["head_dim"])
        value = (*key[:3], kv.get("value_head_dim", kv["head_dim"]))  # multi-latent attention: values differ
        return [np.zeros(shape, dtype=self.float_dtype) for _ in range(kv["num_layers"]) for shape in (key, value)]

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
            if self.kind != "encoder":  # a generation's input is never cut
                raise MoorizeError(f"input {lengths.index(max(lengths)) + 1} has {max(lengths)} tokens: more than the "
                                   f"model's {limit} positions")
            log.warning("truncated %d of %d input(s) to the encoder's %d positions (as tokenizers do with "
                        "truncation=True)", sum(n > limit for n in lengths), len(texts), limit)
        enc = tok(texts, return_tensors="np", padding=True, truncation=bool(limit), max_length=limit)
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def generate(self, prompts, task=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 num_beams: int = 1) -> list[str]:
        """Continue each prompt (a decoder: batched, left-padded), or answer it (an encoder-decoder: its output
        text); returns the new text of each."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        ids, mask = self._encode(prompts, left_pad=self.kind == "decoder")
        new = self.generate_ids(ids, mask, task, max_new_tokens, do_sample, temperature, top_p, seed, num_beams)
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
                     seed: int | None = None, num_beams: int = 1) -> np.ndarray:
        """[batch, max_new_tokens] new token ids; rows that met EOS continue with the pad token; ``num_beams`` > 1:
        beam search, as transformers' generate (``generation.generate_ids``)."""
        return generate_ids(self, input_ids, attention_mask, task, max_new_tokens, do_sample, temperature, top_p,
                            seed, num_beams)

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


def ort_input_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception for inputs it refuses (wrong rank, type, shape): the caller's error."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
    except ImportError:
        return ()
    return (InvalidArgument,)
