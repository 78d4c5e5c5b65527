"""Encoder-decoders (T5, BART, Marian, ...) export as two graphs, an encoder run once per input and a decoder run
every step, which ``moorize run`` and ``MoOREOrtModel.generate`` drive to the same greedy text as PyTorch. Every
family of the support matrix goes through this too (tests/test_support.py); here: the command line, the metadata,
the export options, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from families import BY_NAME
from helpers import char_tokenizer, perturb

import moorize
from moorize.exporters.onnx import export_onnx
from moorize.runtime import MoOREOrtModel

TASKS = ["summary", "translate"]
PROMPTS = ["the cat sat on the mat", "hello"]


def cli(*args, check=True):
    res = subprocess.run([sys.executable, "-m", "moorize", *map(str, args)], capture_output=True, text=True,
                         timeout=600)
    if check:
        assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A tiny T5 with the character tokenizer, converted, its task routers perturbed, exported by the CLI."""
    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(root / "hf")
    char_tokenizer().save_pretrained(root / "hf")
    moorize.convert(root / "hf", root / "f")
    routed = moorize.load(root / "f", tasks=TASKS)
    perturb(routed, scale=0.1, seed=0)
    moorize.save_adapter(routed, root / "ad")
    res = cli("export", root / "f", "--adapter", root / "ad", "--onnx", root / "onnx")
    past = cli("export", root / "f", "--adapter", root / "ad", "--onnx", root / "onnx-past", "--with-past")
    return {"root": root, "routed": routed.eval(), "stdout": res.stdout, "past_stdout": past.stdout}


def pytorch_greedy(routed, tokenizer, prompts, task, new_tokens):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = routed.generate(**enc, task_ids=[task] * len(prompts), max_new_tokens=new_tokens, do_sample=False,
                              num_beams=1)
    return [tokenizer.decode(row[1:], skip_special_tokens=True) for row in out]


def test_the_export_is_two_graphs_its_metadata_lists(t5):
    onnx_dir = t5["root"] / "onnx"
    meta = json.loads((onnx_dir / "moorize_export.json").read_text())
    assert meta["kind"] == "encoder-decoder" and "graph" not in meta and meta["decoder_start_token_id"] == 0
    assert meta["graphs"] == {
        "encoder": {"file": "encoder.onnx", "inputs": ["input_ids", "attention_mask", "task_ids"],
                    "outputs": ["encoder_hidden_states"]},
        "decoder": {"file": "decoder.onnx",
                    "inputs": ["decoder_input_ids", "encoder_hidden_states", "attention_mask", "task_ids"],
                    "outputs": ["logits"]}}
    for f in ("encoder.onnx", "encoder.onnx_data", "decoder.onnx", "decoder.onnx_data", "tokenizer.json"):
        assert (onnx_dir / f).is_file(), f
    assert not list(onnx_dir.glob("trace*")) and not (onnx_dir / "model.onnx").exists()
    # every MoORE layer is a node in one of the two graphs (the command checks the count), each task validated
    layers = len(t5["routed"].moore.layer_paths)
    assert f"encoder-decoder, tasks summary, translate, opset 20, {layers} ai.moorize::MoORELinear nodes" \
        in t5["stdout"]
    assert "encoder_hidden_states" in t5["stdout"] and "logits" in t5["stdout"]


@pytest.mark.versions  # the cache classes an encoder-decoder's forward takes differ across transformers releases
def test_the_export_with_past_passes_both_caches(t5):
    """--with-past: the encoder also gives every decoder layer's cross-attention keys and values, the decoder
    takes them and its own cache and returns the new one; every MoORE layer is in one graph only (the cross
    attention's key and value projections in the encoder's), and the metadata gives the empty cache's shape."""
    onnx_dir = t5["root"] / "onnx-past"
    meta = json.loads((onnx_dir / "moorize_export.json").read_text())
    layers = 2
    cross = [f"{i}.encoder.{kv}" for i in range(layers) for kv in ("key", "value")]
    own = [f"{i}.decoder.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert meta["with_past"] is True and meta["kv"] == {"num_layers": layers, "num_kv_heads": 4, "head_dim": 8}
    assert meta["graphs"]["encoder"]["outputs"] == ["encoder_hidden_states"] + [f"present.{n}" for n in cross]
    assert meta["graphs"]["decoder"]["inputs"] == \
        ["decoder_input_ids", "encoder_hidden_states", "attention_mask", "task_ids"] + \
        [f"past_key_values.{n}" for n in own + cross]
    assert meta["graphs"]["decoder"]["outputs"] == ["logits"] + [f"present.{n}" for n in own]
    total = len(t5["routed"].moore.layer_paths)
    assert f"{total} ai.moorize::MoORELinear nodes" in t5["past_stdout"] and "present" in t5["past_stdout"]
    import onnx

    nodes = {g: sum(n.op_type == "MoORELinear" for n in onnx.load(str(onnx_dir / f"{g}.onnx"),
                                                                    load_external_data=False).graph.node)
             for g in ("encoder", "decoder")}
    # T5: q, k, v, o, wi, wo per encoder block, the cross k, v of each decoder block; the decoder: the rest
    assert nodes == {"encoder": 6 * layers + 2 * layers, "decoder": 8 * layers}


@pytest.mark.versions
@pytest.mark.parametrize("export", ["onnx", "onnx-past"])
def test_moorize_run_writes_what_pytorch_generates(t5, tmp_path, export):
    routed, onnx_dir = t5["routed"], t5["root"] / export
    tok = char_tokenizer()
    rows = [{"text": p, "task": t} for t in TASKS for p in PROMPTS]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = cli("run", onnx_dir, "--input", data, "--max-new-tokens", 8)
    got = [json.loads(line)["output"] for line in res.stdout.splitlines()]
    want = [text for t in TASKS for text in pytorch_greedy(routed, tok, PROMPTS, t, 8)]
    assert got == want
    assert want[:2] != want[2:], "the two tasks should answer differently"
    assert "encoder-decoder" in res.stderr


def test_beam_search_writes_what_pytorch_writes(t5, tmp_path):
    """moorize run and moorize generate --num-beams 3: transformers' beam search, on the export and in PyTorch,
    with a task per row; sampling and beams together are refused in one line."""
    routed, onnx_dir = t5["routed"], t5["root"] / "onnx"
    tok = char_tokenizer()
    rows = [{"text": p, "task": t} for t in TASKS for p in PROMPTS]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--input", data, "--max-new-tokens", 8, "--num-beams", 3]
    got = [json.loads(line)["output"] for line in cli("run", onnx_dir, *args).stdout.splitlines()]
    past = cli("run", t5["root"] / "onnx-past", *args).stdout.splitlines()  # its caches follow the beams
    torch_rows = cli("generate", t5["root"] / "f", "--adapter", t5["root"] / "ad", *args).stdout.splitlines()
    want = []
    for t in TASKS:
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = routed.generate(**enc, task_ids=[t] * len(PROMPTS), max_new_tokens=8, num_beams=3,
                                  do_sample=False)
        want += [tok.decode(row[1:], skip_special_tokens=True) for row in out]
    assert got == want == [json.loads(line)["output"] for line in torch_rows]
    assert [json.loads(line)["output"] for line in past] == want
    assert want != [text for t in TASKS for text in pytorch_greedy(routed, tok, PROMPTS, t, 8)]  # not greedy's
    res = cli("run", onnx_dir, "--prompt", "hi", "--task", "summary", "--num-beams", 2, "--do-sample", check=False)
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: beam search is deterministic: give num_beams > 1 or do_sample, not both"


def test_encode_and_decode_equal_the_routed_model(t5):
    """The two sessions by hand: a padded batch, a task per row, logits against the routed model's."""
    ort = MoOREOrtModel.from_export(t5["root"] / "onnx")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    target = torch.randint(3, 96, (3, 4), generator=g)
    tasks = [1, 0, 1]
    states = ort.encode(ids.numpy(), mask.numpy(), np.array(tasks))
    logits = ort.decode(target.numpy(), states, mask.numpy(), np.array(tasks))
    with torch.no_grad():
        want = t5["routed"](input_ids=ids, attention_mask=mask, decoder_input_ids=target, task_ids=tasks).logits
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(moorize.MoorizeError, match="two graphs"):
        ort.run(ids.numpy(), mask.numpy(), np.array(tasks))
    with pytest.raises(moorize.MoorizeError, match="needs an encoder-decoder exported with --with-past"):
        ort.decode_step(target.numpy(), states, mask.numpy(), np.array(tasks), None, [])
    # with past: the target one token at a time on the caches gives every position's logits
    past_ort = MoOREOrtModel.from_export(t5["root"] / "onnx-past")
    states, cross = past_ort.encode_with_cache(ids.numpy(), mask.numpy(), np.array(tasks))
    cache, steps = None, []
    for i in range(target.shape[1]):
        logits, cache = past_ort.decode_step(target[:, i:i + 1].numpy(), states, mask.numpy(), np.array(tasks),
                                             cache, cross)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), want.numpy(), atol=1e-4, rtol=1e-4)
    assert cache[0].shape == (3, 4, target.shape[1], 8)
    with pytest.raises(moorize.MoorizeError, match="exported with past: its decoder takes its caches"):
        past_ort.decode(target.numpy(), states, mask.numpy(), np.array(tasks))
    with pytest.raises(moorize.MoorizeError, match="take 4 arrays each, got 4 and 3"):
        past_ort.decode_step(target[:, :1].numpy(), states, mask.numpy(), np.array(tasks), None, cross[:3])


def test_refusals_are_one_line_and_write_nothing(t5, tmp_path):
    root = t5["root"]
    cases = {
        "torchscript": (["export", root / "f", "--adapter", root / "ad", "--torchscript", tmp_path / "m.pt"],
                        "export with --onnx only", tmp_path / "m.pt"),
        "serve": (["serve", root / "onnx", "--port", "0"], "is an encoder-decoder", None),
    }
    for name, (args, message, dest) in cases.items():
        res = cli(*args, check=False)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode != 0 and len(errors) == 1 and message in errors[0], (name, res.stderr)
        assert "Traceback" not in res.stderr, name
        assert dest is None or not dest.exists(), name


@pytest.mark.parametrize("family, options", [("bart", dict(decompose=True)),
                                             ("bart", dict(weights="reference", with_past=True)),
                                             ("t5", dict(dtype="float16", with_past=True))],
                         ids=["decompose", "reference-with-past", "float16-with-past"])
def test_every_export_option_holds_for_both_graphs(tmp_path, family, options):
    """Each option, validated per task (with past: both caches too): BART (learned positions, embeddings both
    graphs share); T5 in float16 (BART's float16 layers branch on the values, `if not isfinite(h).all()`, which
    no exporter can trace)."""
    model = BY_NAME[family].build()
    model.save_pretrained(tmp_path / "hf")
    moorize.convert(tmp_path / "hf", tmp_path / "f")
    routed = moorize.load(tmp_path / "f", tasks=TASKS)
    perturb(routed, scale=0.1, seed=2)
    moorize.save_adapter(routed, tmp_path / "ad")
    report = export_onnx(tmp_path / "f", tmp_path / "onnx", tmp_path / "ad", **options)
    assert report.validation.ok and set(report.validation.diffs) == set(TASKS)
    assert set(report.validation.diffs["summary"]) == \
        {"encoder_hidden_states", "logits"} | ({"present"} if options.get("with_past") else set())
    import onnx

    domains = {n.domain for f in ("encoder.onnx", "decoder.onnx")
               for n in onnx.load(str(tmp_path / "onnx" / f), load_external_data=False).graph.node}
    assert ("ai.moorize" in domains) != bool(options.get("decompose"))
    if options.get("weights") == "reference":  # the factors come from the one shard both graphs link to
        assert report.referenced_bytes > 0 and (tmp_path / "onnx" / "model.safetensors").is_file()
        assert report.data_bytes < (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size  # routers only
    if options.get("dtype") != "float16":
        ort = MoOREOrtModel.from_export(tmp_path / "onnx")
        ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
        got = ort.generate_ids(ids.numpy(), task=TASKS, max_new_tokens=4)
        with torch.no_grad():
            want = routed.eval().generate(ids, attention_mask=torch.ones_like(ids), task_ids=TASKS, max_new_tokens=4,
                                          do_sample=False, num_beams=1)[:, 1:]
        np.testing.assert_array_equal(got, want.numpy()[:, :got.shape[1]])


def test_metadata_that_lists_the_wrong_graphs_is_one_error(t5, tmp_path):
    import shutil

    dest = tmp_path / "onnx"
    shutil.copytree(t5["root"] / "onnx", dest)
    meta = json.loads((dest / "moorize_export.json").read_text())
    for graphs, message in (({"decoder": meta["graphs"]["decoder"]}, "has the graphs decoder, encoder"),
                            ({"encoder": "encoder.onnx", "decoder": 3}, "'graphs' must map names")):
        (dest / "moorize_export.json").write_text(json.dumps({**meta, "graphs": graphs}))
        with pytest.raises(moorize.MoorizeError, match=message):
            MoOREOrtModel.from_export(dest)
    (dest / "decoder.onnx").unlink()
    (dest / "moorize_export.json").write_text(json.dumps(meta))
    with pytest.raises(moorize.MoorizeError, match="lacks its graph decoder.onnx"):
        MoOREOrtModel.from_export(dest)
