"""One generation request seen from the event loop: prompt checks, the engine's callbacks, text pieces.

The engine thread calls back with token ids; they cross into the event loop through
``call_soon_threadsafe`` onto the request's own ``asyncio.Queue``, so a request only
ever sees its own tokens. Text is cut by ``TextStream``; a stop string or a
vanished client cancels the row, and the engine drops it before its next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..selectors import closest, listing
from .engine import Engine, GenRequest, QueueFull, ShuttingDown
from .protocol import ApiError, Sampling, bad
from .textstream import TextStream

CHAT_DEFAULT_MAX_TOKENS = 512  # OpenAI's chat default is "what is left of the context"; bounded here
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def shutting_down(message: str | None) -> ApiError:
    """503: the server stopped before this generation finished; another replica (or a retry) will answer."""
    return ApiError(503, f"{message}: retry the request", "server_error", None, "server_shutting_down")


@dataclass
class Piece:
    text: str
    finish_reason: str | None = None  # set on the last piece: "stop" or "length"


class TextGenerator:
    """Turns checked requests into engine rows and their tokens into text pieces."""

    def __init__(self, model, engine: Engine, metrics, options):
        self.model, self.engine, self.metrics = model, engine, metrics
        self.max_prompt_tokens, self.max_batch_tokens = options.max_prompt_tokens, options.max_batch_tokens
        self.tokenizer = model.tokenizer
        # a token covers at most as many characters as its longest vocabulary entry has (byte-level entries
        # spell one character per byte or more): the bound that refuses a huge prompt before tokenizing it
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        self.max_token_chars = max(map(len, vocab), default=0) or None
        # tokenizing is CPU work: off the event loop, one call at a time (a fast tokenizer is shared state)
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="moorize-tokenize")

    async def tokenize(self, fn, *args) -> list[int]:
        """``fn(*args)`` (encode_text, encode_chat) in the tokenizing thread, so other streams keep flowing."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    def prompt_limit(self) -> tuple[int | None, str]:
        """The most tokens a prompt may have and what sets it (the model's positions or --max-prompt-tokens)."""
        limit = self.model.max_positions
        if self.max_prompt_tokens and (not limit or self.max_prompt_tokens < limit):
            return self.max_prompt_tokens, f"This server takes prompts of at most {self.max_prompt_tokens} tokens"
        return limit, f"This model's maximum context length is {limit} tokens"

    def check_chars(self, chars: int, param: str) -> None:
        """A prompt whose characters cannot fit the limit, whatever its tokens: a 400 before tokenizing."""
        limit, why = self.prompt_limit()
        if limit and self.max_token_chars and chars > limit * self.max_token_chars:
            raise bad(f"{why}, and a prompt of {chars} characters has more (a token spans at most "
                      f"{self.max_token_chars} characters)", param, "context_length_exceeded")

    def task_id(self, name: str) -> int:
        if name not in self.model.tasks:
            near = closest(name, self.model.tasks)
            raise ApiError(404, f"The model '{name}' does not exist; models (tasks) are: {listing(self.model.tasks)}"
                                + (f"; did you mean '{near}'?" if near else ""), "invalid_request_error", "model",
                           "model_not_found")
        return self.model.tasks[name]

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad("this model's tokenizer has no chat template: use /v1/completions", "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template refused the conversation (e.g. roles out of order)
            raise bad(f"the chat template cannot render these messages: {str(e).splitlines()[0]}", "messages") \
                from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_ids(self, ids: list[int]) -> None:
        vocab = self.model.vocab_size
        if not ids:
            raise bad("the prompt has no tokens", "prompt")
        if vocab and (min(ids) < 0 or max(ids) >= vocab):
            raise bad(f"token ids must lie in 0..{vocab - 1}", "prompt")

    def budget(self, prompt_len: int, sampling: Sampling, default: int, param: str = "prompt") -> int:
        """max_tokens for this prompt; a prompt (plus an explicit max_tokens) beyond the positions is a 400
        naming ``param``, the field the prompt came in (``prompt`` or ``messages``)."""
        limit = self.model.max_positions
        cap, why = self.prompt_limit()
        if cap != limit and prompt_len > cap:  # --max-prompt-tokens is the tighter bound
            raise bad(f"{why}, but this one has {prompt_len}", param, "context_length_exceeded")
        rooms = []  # (tokens left to generate, what bounds them), the model's positions first
        if limit:
            rooms.append((limit - prompt_len, f"This model's maximum context length is {limit} tokens"))
        if self.max_batch_tokens:  # a row must fit the batch's cache alone, or it could never join
            rooms.append((self.max_batch_tokens - prompt_len,
                          f"This server's batch holds at most {self.max_batch_tokens} cache positions"))
        for left, what in rooms:
            if left < 1:
                raise bad(f"{what}, but the prompt has {prompt_len} tokens (no room to generate)", param,
                          "context_length_exceeded")
        room, bound = min(rooms) if rooms else (None, "")
        if sampling.max_tokens is not None:
            if room is not None and sampling.max_tokens > room:
                raise bad(f"{bound}; the prompt has {prompt_len} and max_tokens asks for {sampling.max_tokens}",
                          "max_tokens", "context_length_exceeded")
            return sampling.max_tokens
        return default if room is None else min(default, room)

    def start(self, task: str, prompt: list[int], sampling: Sampling, max_tokens: int) -> "Generation":
        return Generation(self, task, prompt, sampling, max_tokens)


class Generation:
    """A submitted row: ``pieces()`` yields its text; leaving the iteration early cancels the row."""

    def __init__(self, gen: TextGenerator, task: str, prompt: list[int], sampling: Sampling, max_tokens: int):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = len(prompt)
        self.text = TextStream(gen.tokenizer, sampling.stop)
        put = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)  # noqa: E731
        self.req = GenRequest(task_id=gen.task_id(task), prompt=prompt, max_tokens=max_tokens,
                              on_token=lambda t: put(("token", t)), on_end=lambda r, m: put(("end", (r, m))),
                              temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed, task=task,
                              arrived=time.perf_counter())
        try:
            gen.engine.submit(self.req)
        except QueueFull as e:
            raise ApiError(429, f"{e}: retry later", "rate_limit_error", None, "queue_full") from None
        except ShuttingDown as e:
            raise shutting_down(str(e)) from None
        if gen.metrics is not None:
            gen.metrics.inc("moorize_prompt_tokens_total", len(prompt), model=task)

    @property
    def completion_tokens(self) -> int:
        return self.req.generated

    async def pieces(self) -> AsyncIterator[Piece]:
        try:
            while True:
                kind, value = await self.queue.get()
                if kind == "token":
                    piece = self.text.push(value)
                    if self.text.stopped:
                        self.req.cancel()
                        yield Piece(piece, "stop")
                        return
                    if piece:
                        yield Piece(piece)
                    continue
                reason, message = value
                if reason == "error":
                    raise ApiError(500, f"generation failed: {message}", "server_error")
                if reason == "shutdown":
                    raise shutting_down(message)
                yield Piece(self.text.finish(), "length" if reason == "length" else "stop")
                return
        finally:
            self.req.cancel()  # no-op once ended; frees the row when the client left or a stop string matched
