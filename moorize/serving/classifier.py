"""Encoder exports: ``/v1/classify`` labels texts with the task's head, one ONNX Runtime run per request.

A request's texts are one batch (right-padded), run in a worker thread so the event
loop keeps answering; a lock keeps one run at a time on the session, whose
tokenizer the runtime reconfigures per call. Scores are the softmax of the task
head's logits over that task's labels.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from ..errors import MoorizeError
from .protocol import ApiError, bad

MAX_TEXTS = 256  # texts per request


class Classifier:
    def __init__(self, model):
        if not model.labels:
            raise MoorizeError(f"{model.directory} is an encoder export without task heads: nothing to classify "
                               "(export it with an adapter that has heads)")
        self.model, self.lock = model, threading.Lock()

    async def classify(self, task: str, texts: list[str]) -> list[dict]:
        if task not in self.model.tasks:
            raise ApiError(404, f"The model '{task}' does not exist; models (tasks) are: "
                                f"{', '.join(self.model.tasks)}", "invalid_request_error", "model", "model_not_found")
        if len(texts) > MAX_TEXTS:
            raise bad(f"at most {MAX_TEXTS} texts per request, got {len(texts)}", "input")
        limit, tok = self.model.max_positions, self.model.tokenizer
        if limit:
            for i, text in enumerate(texts):
                n = len(tok(text)["input_ids"])
                if n > limit:
                    raise bad(f"input {i} has {n} tokens: more than the model's {limit} positions", "input",
                              "context_length_exceeded")
        logits = await asyncio.to_thread(self._scores, task, texts)
        z = logits.astype(np.float64)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        labels = self.model.labels[task]
        return [{"index": i, "label": labels[int(row.argmax())], "score": float(row.max()),
                 "scores": {lab: float(v) for lab, v in zip(labels, row)}} for i, row in enumerate(p)]

    def _scores(self, task: str, texts: list[str]) -> np.ndarray:
        with self.lock:
            return self.model.scores(texts, task)
