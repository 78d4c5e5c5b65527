"""Helpers shared by tests (and the benchmarks): one copy each, kept out of the library."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn

from moorize.model.layer import layer_trainable, moore_layers


def perturb(model: nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Give every router and Householder vector non-trivial values (as training would), so every task differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moore_layers(model).values():
            for p in layer_trainable(layer).values():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def randomize_routers(model: nn.Module, seed: int = 0) -> None:
    """Move every router and reflection off its initialisation: a stand-in for a trained adapter in demos,
    tests and benchmarks (task router A ~ N(0, 0.02²), sample router B ~ N(0, 0.002²), Householder vectors
    turned by about a quarter of their entries' scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moore_layers(model).values():
            for name, std in (("task_router", 0.02), ("router_out", 0.002)):
                p = getattr(layer, name, None)
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
            if layer.householder is not None:
                layer.householder.add_(torch.randn(layer.householder.shape, generator=g) * 0.25)


def interrupted_run(factored, data, out, monkeypatch, **train_kw):
    """Train until the first checkpoint is saved (``save_every`` steps), then stop as a Ctrl-C would: the
    run directory is left for ``--resume``. Returns that checkpoint's directory."""
    import pytest

    import moorize
    import moorize.training.loop as loop

    real = loop._save_checkpoint

    def save_then_stop(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        moorize.train(factored, str(data), out, **train_kw)
    monkeypatch.setattr(loop, "_save_checkpoint", real)
    step = train_kw["save_every"]
    return out.parent / f".{out.name}.moorize-partial" / "checkpoints" / f"step-{step:07d}"


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")


def char_tokenizer():
    """A character-level fast tokenizer for tiny models (96 ids: <unk> <s> </s>, newline, ' '..'{'), BOS added,
    with a chat template: text in, text out, no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 124)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_export(root, arch: str, tasks: list[str], with_heads: bool = False, positions: int = 128):
    """A tiny random model (llama or bert) with the character tokenizer, converted, its routers perturbed per
    task, exported to ONNX (decoders with past): the export directory."""
    import transformers

    import moorize
    from moorize.exporters.onnx import export_onnx
    from moorize.model.heads import TaskHeads

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=positions)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, bos_token_id=1,
                                                                       eos_token_id=2, **common))
    else:
        model = transformers.BertModel(transformers.BertConfig(**common))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf, fac, ad = root / f"{arch}-hf", root / f"{arch}-f", root / f"{arch}-ad"
    model.eval().save_pretrained(hf)
    char_tokenizer().save_pretrained(hf)
    moorize.convert(hf, fac)
    routed = moorize.load(fac, tasks=tasks)
    perturb(routed, scale=0.3, seed=0)
    heads = None
    if with_heads:
        labels = {t: [f"{t}-{k}" for k in range(2 + i)] for i, t in enumerate(tasks)}
        heads = TaskHeads(routed.config.hidden_size, tasks, labels)
        with torch.no_grad():
            heads.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    moorize.save_adapter(routed, ad, heads=heads)
    export_onnx(fac, root / f"{arch}-onnx", ad, with_past=arch == "llama")
    return root / f"{arch}-onnx"


class ServerProcess:
    """``python -m moorize serve EXPORT`` on a free 127.0.0.1 port, ready once /health answers; ``stop()`` ends it."""

    def __init__(self, export_dir, *args: str, env: dict | None = None, api_key: str | None = None,
                 timeout: float = 180.0):
        import os
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(export_dir).parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "moorize", "serve", str(export_dir), "--port",
                                      str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url + "/health", headers=headers), timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"server not ready after {timeout} s: {self.output()}") from None
                time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Reply:
    """A raw HTTP answer (status, headers, body): for what the openai client hides or cannot send."""

    def __init__(self, status: int, headers, body: bytes):
        self.status_code, self.headers, self.content = status, headers, body
        self.text = body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, json_body=None, content: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> Reply:
    data = json.dumps(json_body).encode() if json_body is not None else content
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read())


def metric(url: str, name: str, **labels) -> float:
    """One sample of a Prometheus series on the server's /metrics (0 when absent)."""
    text = http("GET", url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name + ("{" + want + "}" if want else "")) + r" (\S+)"
    m = re.search(r"^" + pattern + "$", text, re.M)
    return float(m.group(1)) if m else 0.0
