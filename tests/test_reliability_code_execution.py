"""Nothing moorize reads executes code (class 1 of the reliability issue).

Every payload here would, if unpickled or imported, create a marker file; each test
asserts the marker never appears. Training checkpoints hold no pickles at all (tensors
in safetensors, the rest in JSON); a run directory with planted pickle files is refused
or its pickles ignored; pickled source weights are only read with ``weights_only=True``;
a checkpoint whose config asks for remote code is not imported.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from helpers import interrupted_run as stop_after_first_checkpoint
from test_train import FAST, factored_tiny, toy_causal, write_jsonl

import moorize

REPO = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: the classic pickle code-execution gadget."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"torch": Payload(marker)}))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return factored_tiny(tmp_path_factory.mktemp("rel-code-llama"), "llama")


def interrupted_run(tiny_llama, tmp_path, monkeypatch) -> tuple[str, Path, Path]:
    """A run stopped right after its checkpoint at step 2: (data, output, that checkpoint)."""
    data = write_jsonl(tmp_path / "train.jsonl", toy_causal(8))
    out = tmp_path / "out"
    return data, out, stop_after_first_checkpoint(tiny_llama, data, out, monkeypatch, max_steps=4, save_every=2,
                                                  **FAST)


def test_training_checkpoints_hold_no_pickles(tiny_llama, tmp_path, monkeypatch):
    _, _, ckpt = interrupted_run(tiny_llama, tmp_path, monkeypatch)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["optimizer.json", "optimizer.safetensors", "rng-0.json", "rng-0.safetensors",
                     "scheduler.json", "state.json", "trainable.safetensors"]
    for p in ckpt.iterdir():
        head = p.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x02" and not p.read_bytes().startswith(b"PK"), p.name


def test_a_pickle_payload_planted_in_a_run_is_never_loaded(tiny_llama, tmp_path, monkeypatch):
    """Old-style pickle files dropped next to a real checkpoint are ignored: resume reads only its own files."""
    data, out, ckpt = interrupted_run(tiny_llama, tmp_path, monkeypatch)
    marker = tmp_path / "PWNED"
    for name in ("rng-0.pt", "optimizer.pt", "scheduler.pt"):
        write_payload(ckpt / name, marker)
    report = moorize.train(tiny_llama, data, out, max_steps=4, save_every=2, resume=True, **FAST)
    assert report.resumed_from == 2 and (out / "adapter_config.json").is_file()
    assert not marker.exists()


def test_an_old_style_pickled_checkpoint_is_refused(tiny_llama, tmp_path, monkeypatch):
    """A checkpoint made of pickles only (as moorize wrote before): one line, and the payload does not run."""
    data, out, ckpt = interrupted_run(tiny_llama, tmp_path, monkeypatch)
    marker = tmp_path / "PWNED"
    for p in ckpt.iterdir():
        if p.name != "state.json":
            p.unlink()
    for name in ("rng-0.pt", "optimizer.pt", "scheduler.pt"):
        write_payload(ckpt / name, marker)
    torch.save({}, ckpt / "trainable.pt")
    with pytest.raises(moorize.MoorizeError, match="pickle files, which moorize no longer loads"):
        moorize.train(tiny_llama, data, out, max_steps=4, save_every=2, resume=True, **FAST)
    assert not marker.exists()


def test_corrupt_checkpoint_json_is_one_line(tiny_llama, tmp_path, monkeypatch):
    data, out, ckpt = interrupted_run(tiny_llama, tmp_path, monkeypatch)
    (ckpt / "rng-0.json").write_text('{"python": [3, "not a state", null]}')
    with pytest.raises(moorize.MoorizeError, match="bad random-number state"):
        moorize.train(tiny_llama, data, out, max_steps=4, save_every=2, resume=True, **FAST)
    (ckpt / "rng-0.json").write_text("{ not json")
    with pytest.raises(moorize.MoorizeError, match="not valid JSON"):
        moorize.train(tiny_llama, data, out, max_steps=4, save_every=2, resume=True, **FAST)


def test_pickled_source_weights_are_read_with_weights_only(tmp_path, tiny_model_dir):
    """--allow-pickle reads pytorch_model.bin with weights_only=True: a payload is refused, never run."""
    _, src = tiny_model_dir("llama")
    for p in src.glob("*.safetensors"):
        p.unlink()
    marker = tmp_path / "PWNED"
    state = {"model.embed_tokens.weight": torch.zeros(2, 2), "evil": Payload(marker)}
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(state))
    with pytest.raises(moorize.MoorizeError):
        moorize.convert(src, tmp_path / "out", allow_pickle=True)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_remote_code_in_a_config_is_not_imported(tmp_path, tiny_model_dir):
    """A config with auto_map naming a Python file in the checkpoint: moorize never runs it."""
    _, src = tiny_model_dir("llama")
    marker = tmp_path / "PWNED"
    (src / "evil_config.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                        "from transformers import LlamaConfig as EvilConfig\n")
    cfg = __import__("json").loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (src / "config.json").write_text(__import__("json").dumps(cfg))
    try:
        moorize.convert(src, tmp_path / "out")
    except moorize.MoorizeError:
        pass  # refusing is fine; running the file is not
    assert not marker.exists()


def test_no_unsafe_deserialisation_anywhere_in_the_package():
    """Every torch.load in moorize and its exporters passes weights_only=True; no pickle.load(s) at all."""
    offenders = []
    for path in list((REPO / "moorize").rglob("*.py")) + list((REPO / "exporters").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith(("pickle.load", "pickle.loads", "marshal.loads", "dill.load")):
                offenders.append(f"{path.name}:{node.lineno} {name}")
            if name == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if any(k.arg == "trust_remote_code" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                offenders.append(f"{path.name}:{node.lineno} trust_remote_code")
    assert offenders == []
