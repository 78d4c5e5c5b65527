"""Export on tiny models: the MoORE op against MoORELinear, ONNX (custom op, decomposed, with past,
weights reference, float16), TorchScript and .pt2, the ORT runtime, and every bad-input error."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny
from helpers import perturb

import moorize
from moorize.cli import cli
from moorize.errors import MoorizeError
from moorize.exporters import ops
from moorize.exporters.onnx import export_onnx
from moorize.exporters.torchscript import export_pt2, export_torchscript, load_file
from moorize.model.heads import TaskHeads
from moorize.model.layer import MoOREConfig, MoORELinear, RoutingState, layer_trainable
from moorize.runtime import MoOREOrtModel

pytestmark = pytest.mark.versions  # also run at the minimum versions and on the newest torch (.ci/run)

TASKS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Factored tiny llama (rank 8 + residual: every optional op input is used) and bert, with adapters."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for arch in ("llama", "bert"):
        build_tiny(arch).save_pretrained(root / f"{arch}-hf")
        moorize.convert(root / f"{arch}-hf", root / f"{arch}-f", rank=["8"], residual="keep")
        model = moorize.load(root / f"{arch}-f", tasks=TASKS)
        perturb(model, seed=0)
        heads = None
        if arch == "bert":
            heads = TaskHeads(model.config.hidden_size, TASKS, {"a": ["x", "y"], "b": ["p", "q", "r"], "c": ["u", "v"]})
            with torch.no_grad():
                heads.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        moorize.save_adapter(model, root / f"{arch}-ad", heads=heads)
        out[arch] = (root / f"{arch}-f", root / f"{arch}-ad")
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def llama_past(tiny):
    f, ad = tiny["llama"]
    return export_onnx(f, tiny["root"] / "llama-onnx", ad, with_past=True)


# ---- the op --------------------------------------------------------------------------------------

@pytest.mark.parametrize("router,norm", [("task", "none"), ("sample", "none"), ("task+sample", "none"),
                                         ("sample", "rms"), ("task+sample", "rms")])
@pytest.mark.parametrize("residual,bias", [(False, False), (True, True)])
def test_op_matches_moorelinear_and_its_onnx_function(router, norm, residual, bias):
    torch.manual_seed(0)
    m, n, r = 12, 10, 6
    U, _ = torch.linalg.qr(torch.randn(m, r))
    Vh = torch.linalg.qr(torch.randn(n, r))[0].t().contiguous()
    S = torch.rand(r) + 0.5
    R = torch.randn(m, n) * 0.01 if residual else None
    b = torch.randn(m) if bias else None
    cfg = MoOREConfig(router=router, tasks=TASKS, task_dim=4, router_experts=5, householder=4, router_norm=norm)
    state = RoutingState(TASKS)
    layer = MoORELinear(U, S, Vh, R, b, cfg, state).eval()
    with torch.no_grad():
        for p in layer_trainable(layer).values():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 4, n) * torch.tensor([0.1, 1.0, 10.0, 40.0])[:, None]  # tokens of very different sizes
    ids = torch.tensor([2, 0, 1])
    holder = ops.TaskIds()
    holder.ids = ids
    state.task_ids = ids
    with torch.no_grad():
        want = layer.forward_reference(x, ids)
        got_layer = layer(x)
        exp = ops.ExportMoORELinear(layer, holder, torch.float32)
        got_op = exp(x)
        rotating = ops.ExportMoORELinear(layer, holder, torch.float32, fold_rotation=False)(x)
    scale = max(1.0, float(want.abs().max()))  # float32 rounding grows with the outputs (tokens up to 40x)
    assert torch.allclose(got_layer, want, atol=1e-5 * scale)
    assert torch.equal(got_op, got_layer.float()) or torch.allclose(got_op, got_layer, atol=1e-6 * scale)
    assert torch.allclose(rotating, want, atol=1e-5 * scale)

    # the ONNX function body of the matching overload, alone in a model, run by ORT
    inputs = [x, ids, exp.gate_table, exp.U, exp.vh, exp.router_in, exp.router_out, exp.residual, exp.bias,
              exp.router_eps]
    names = [name for name, _ in ops.OP_INPUTS]
    present = {nm for nm, t in zip(names, inputs) if t is not None}
    overload = ops.overload_of(present)
    assert overload == "_".join(p for p, on in (("sample", "sample" in router), ("rms", norm == "rms"),
                                                   ("residual", residual), ("bias", bias)) if on) or overload == "base"
    node = onnx.helper.make_node(ops.OP_NAME, [nm if nm in present else "" for nm in names], ["Y"],
                                 domain=ops.OP_DOMAIN, overload=overload)
    graph = onnx.helper.make_graph(
        [node], "one", [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["B", "S", n]),
                        onnx.helper.make_tensor_value_info("task_ids", onnx.TensorProto.INT64, ["B"])],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["B", "S", m])],
        [onnx.numpy_helper.from_array(t.numpy(), nm) for nm, t in zip(names[2:], inputs[2:]) if t is not None])
    model = onnx.helper.make_model(graph, ir_version=onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", 20)]), opset_imports=[onnx.helper.make_opsetid("", 20),
                                                        onnx.helper.make_opsetid(ops.OP_DOMAIN, ops.OP_VERSION)],
                                   functions=[ops.function_proto(overload, 20)])
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"X": x.numpy(), "task_ids": ids.numpy()})[0]
    assert np.abs(y - want.numpy()).max() < 1e-5 * scale


def test_rms_router_norm_sees_every_token_at_one_scale():
    """router_norm="rms": scaling a token scales the expert inputs but leaves the gate as it was (the router
    sees x / rms(x)); without it the gate's sample term scales with the token."""
    torch.manual_seed(0)
    m, n, r = 8, 16, 8
    U = torch.linalg.qr(torch.randn(m, r))[0]
    Vh = torch.linalg.qr(torch.randn(n, r))[0].t().contiguous()
    S = torch.rand(r) + 0.5
    x = torch.randn(1, 1, n)
    gates = {}
    for norm in ("none", "rms"):
        cfg = MoOREConfig(router="sample", tasks=TASKS, router_experts=4, householder=0, router_norm=norm)
        layer = MoORELinear(U, S, Vh, None, None, cfg, RoutingState(TASKS)).train()
        assert torch.equal(layer(x), layer.forward_reference(x))  # B = 0: exactly the original at the start
        with torch.no_grad():
            layer.router_out.normal_()
            gates[norm] = [layer.gate(x * s) for s in (1.0, 50.0)]
    assert torch.allclose(gates["rms"][0], gates["rms"][1], atol=1e-5)
    assert not torch.allclose(gates["none"][0], gates["none"][1], atol=1e-2)


# ---- ONNX ----------------------------------------------------------------------------------------

def test_onnx_with_past_one_custom_node_per_layer(tiny, llama_past):
    rep, dest = llama_past, tiny["root"] / "llama-onnx"
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == ops.OP_DOMAIN]
    layers = len(moorize.FactoredCheckpoint(tiny["llama"][0]).layers)
    assert rep.moore_nodes == len(nodes) == layers
    assert {(f.domain, f.name) for f in model.functions} == {(ops.OP_DOMAIN, ops.OP_NAME)}
    assert {f.overload for f in model.functions} == {n.overload for n in nodes} == {"sample_rms_residual"}
    onnx.checker.check_model(str(dest / "model.onnx"), full_check=True)
    meta = json.loads((dest / "moorize_export.json").read_text())
    assert meta["tasks"] == {"a": 0, "b": 1, "c": 2} and meta["with_past"] is True
    assert meta["op"] == {"domain": "ai.moorize", "name": "MoORELinear", "version": 1}
    assert meta["kv"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 12}
    assert meta["inputs"][:3] == ["input_ids", "attention_mask", "task_ids"]
    assert meta["outputs"][1:3] == ["present.0.key", "present.0.value"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 12]
    v = rep.validation
    assert set(v.diffs) == set(TASKS) and v.ok
    assert all(set(p) == {"logits", "present"} for p in v.diffs.values())
    assert max(d for p in v.diffs.values() for d in p.values()) < 1e-5


def test_generate_with_past_equals_pytorch_per_task_rows(tiny, llama_past):
    """Batched, left-padded, one task per row: ORT greedy tokens == PyTorch generate's."""
    f, ad = tiny["llama"]
    ortm = MoOREOrtModel.from_export(tiny["root"] / "llama-onnx")
    assert ortm.provider == "CPUExecutionProvider"
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    pt = moorize.load(f, ad)
    with torch.no_grad():
        want = pt.generate(ids, attention_mask=mask, task_ids=["c", "a", "b"], max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = ortm.generate_ids(ids.numpy(), mask.numpy(), ["c", "a", "b"], max_new_tokens=12)
    assert got.shape == (3, 12)
    assert np.array_equal(got, want.numpy())
    assert ortm.last_times.prefill > 0 and len(ortm.last_times.steps) == 11
    # tasks route differently: the same prompt under another task continues otherwise somewhere
    other = ortm.generate_ids(ids.numpy(), mask.numpy(), ["a", "a", "a"], max_new_tokens=12)
    assert not np.array_equal(other, got)


@pytest.mark.parametrize("with_past", [True, False])
def test_beam_search_chooses_what_transformers_chooses(tiny, llama_past, tmp_path_factory, with_past):
    """num_beams 3 over a padded batch with a task per row, with and without the cache (which beams reorder):
    the best hypothesis of each row is transformers' generate(num_beams=3)'s, its EOS and length included."""
    f, ad = tiny["llama"]
    directory = tiny["root"] / "llama-onnx"
    if not with_past:
        directory = tmp_path_factory.mktemp("nopast") / "onnx"
        export_onnx(f, directory, ad, validate_export=False)
    ortm = MoOREOrtModel.from_export(directory)
    pt = moorize.load(f, ad)
    ended = 0
    for seed, at in ((3, 1), (4, 4), (5, None)):  # EOS: a token the first beam makes early, late, or none
        ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0

        def beams(eos, ids=ids, mask=mask):
            with torch.no_grad():
                return pt.generate(ids, attention_mask=mask, task_ids=["c", "a", "b"], max_new_tokens=10,
                                   num_beams=3, do_sample=False, eos_token_id=eos, pad_token_id=0)[:, 6:].numpy()
        eos = 95 if at is None else int(beams(95)[0, at])
        want = beams(eos)
        ortm.meta["eos_token_id"] = [eos]
        got = ortm.generate_ids(ids.numpy(), mask.numpy(), ["c", "a", "b"], max_new_tokens=10, num_beams=3)
        assert got.shape == want.shape, (eos, got, want)
        for g, w in zip(got, want):  # after a row's EOS each side pads with its own filler
            n = int(np.argmax(w == eos)) + 1 if (w == eos).any() else len(w)
            ended += n < 10
            assert g[:n].tolist() == w[:n].tolist(), (eos, got, want)
    assert ended >= 2  # hypotheses that finished early were chosen, not only ones cut at the limit


def test_dense_export_generates_like_the_original(tiny, tmp_path):
    """The baseline export (original model, same wrapper and runtime): greedy tokens equal transformers'."""
    from transformers import AutoModelForCausalLM

    from moorize.exporters.onnx import export_dense_onnx

    hf = tiny["root"] / "llama-hf"
    export_dense_onnx(hf, tmp_path / "dense", with_past=True)
    proto = onnx.load(str(tmp_path / "dense" / "model.onnx"), load_external_data=False)
    assert not any(n.domain == ops.OP_DOMAIN for n in proto.graph.node)
    ortm = MoOREOrtModel.from_export(tmp_path / "dense")
    ortm.meta["eos_token_id"] = []  # as transformers with eos_token_id=None: no row stops early
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(5))
    want = AutoModelForCausalLM.from_pretrained(hf).eval().generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, eos_token_id=None,
        pad_token_id=0)[:, ids.shape[1]:]
    assert np.array_equal(ortm.generate_ids(ids.numpy(), None, "dense", max_new_tokens=10), want.numpy())
    with pytest.raises(MoorizeError, match="cannot load"):
        export_dense_onnx(tmp_path, tmp_path / "nothing")


def test_decompose_standard_ops_only_same_outputs(tiny, llama_past):
    f, ad = tiny["llama"]
    dest = tiny["root"] / "llama-dec"
    rep = export_onnx(f, dest, ad, decompose=True)
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    assert rep.moore_nodes > 0 and not model.functions
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert all(o.domain in ("", "ai.onnx") for o in model.opset_import)
    assert rep.validation.ok and set(rep.validation.diffs) == set(TASKS)
    a = MoOREOrtModel.from_export(dest)
    b = MoOREOrtModel.from_export(tiny["root"] / "llama-onnx")
    ids = np.arange(3, 12).reshape(1, 9)
    out_a = a.run(ids, np.ones_like(ids), [1])[0]
    out_b = b.run(ids, np.ones_like(ids), [1])[0]
    assert np.abs(out_a - out_b).max() < 1e-5


def test_weights_reference_links_the_shards_without_copying(tiny):
    f, ad = tiny["bert"]
    dest = tiny["root"] / "bert-ref"
    rep = export_onnx(f, dest, ad, weights="reference")
    shard = f / "model.safetensors"
    assert os.stat(dest / "model.safetensors").st_ino == os.stat(shard).st_ino  # the same file, no copy
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    locations = {}
    for t in model.graph.initializer:
        loc = {e.key: e.value for e in t.external_data}.get("location")
        locations.setdefault(loc, 0)
        locations[loc] += int({e.key: e.value for e in t.external_data}.get("length", 0))
    assert locations["model.safetensors"] == rep.referenced_bytes > 0.5 * shard.stat().st_size
    # what is written is the adapter's routers only: the factors and the rest come from the shard
    assert rep.data_bytes == locations.get("model.onnx_data", 0)
    adapter_bytes = (ad / "adapter_model.safetensors").stat().st_size
    assert rep.data_bytes < adapter_bytes
    assert rep.validation.ok
    copy = export_onnx(f, tiny["root"] / "bert-copy", ad)
    a, b = MoOREOrtModel.from_export(dest), MoOREOrtModel.from_export(tiny["root"] / "bert-copy")
    ids = np.arange(5, 20).reshape(3, 5)
    mask = np.ones_like(ids)
    assert np.abs(a.run(ids, mask, [0, 1, 2])[0] - b.run(ids, mask, [0, 1, 2])[0]).max() < 1e-5
    assert copy.referenced_bytes == 0 and not (tiny["root"] / "bert-copy" / "model.safetensors").exists()


def test_classifier_export_matches_heads(tiny):
    f, ad = tiny["bert"]
    dest = tiny["root"] / "bert-copy"
    if not dest.exists():
        export_onnx(f, dest, ad)
    clf = moorize.load_classifier(f, ad)
    m = MoOREOrtModel.from_export(dest)
    assert m.labels == clf.labels and m.kind == "encoder"
    ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = clf(ids, mask, torch.tensor([0, 1, 2]))
    got = m.run(ids.numpy(), mask.numpy(), [0, 1, 2])[0]
    assert np.abs(got - want.numpy()).max() < 1e-5
    assert got[0, 2] == pytest.approx(-1e4)  # task a has two labels: the third slot is padding
    with pytest.raises(moorize.MoorizeError, match="--with-past is for models that generate text; this model is an "
                                                   "encoder"):
        export_onnx(f, tiny["root"] / "bert-past", ad, with_past=True)
    assert not (tiny["root"] / "bert-past").exists()


def test_float16_export(tiny):
    f, ad = tiny["llama"]
    rep = export_onnx(f, tiny["root"] / "llama-fp16", ad, dtype="float16", with_past=True)
    model = onnx.load(str(tiny["root"] / "llama-fp16" / "model.onnx"), load_external_data=False)
    kinds = {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert kinds == {onnx.TensorProto.FLOAT16}
    assert rep.validation.ok and rep.validation.dtype == "float16"
    m = MoOREOrtModel.from_export(tiny["root"] / "llama-fp16")
    assert m.float_dtype == np.float16
    assert m.generate_ids(np.array([[5, 6, 7]]), task="b", max_new_tokens=3).shape[1] <= 3


def test_published_router_adapter_round_trips_and_exports(tiny):
    """router_norm="none" (the published router, seeing x as it comes; the fixture has the default "rms") is
    saved with the adapter, reloads, and exports to ONNX (float32 and float16) and TorchScript with every task
    validated against PyTorch."""
    f, _ = tiny["llama"]
    root = tiny["root"]
    model = moorize.load(f, tasks=TASKS, router_norm="none")
    perturb(model, seed=3)
    moorize.save_adapter(model, root / "published-ad")
    assert json.loads((root / "published-ad" / "adapter_config.json").read_text())["moore"]["router_norm"] == "none"
    back = moorize.load(f, root / "published-ad")
    assert back.moore.config.router_norm == "none"
    ids = torch.tensor([[4, 5, 6, 3], [7, 8, 9, 3]])
    with torch.no_grad():
        want = model(ids, task_ids=torch.tensor([0, 2])).logits
        assert torch.equal(back(ids, task_ids=torch.tensor([0, 2])).logits, want)
        back.moore.config.router_norm = "rms"  # the same trained weights, the router seeing x / rms(x)
        normed = back(ids, task_ids=torch.tensor([0, 2])).logits
    assert (normed - want).abs().max() > 1e-3  # the norm changes the function once B is trained
    for dtype in ("float32", "float16"):
        rep = export_onnx(f, root / f"published-{dtype}", root / "published-ad", dtype=dtype)
        assert rep.validation.ok
        graph = onnx.load(str(root / f"published-{dtype}" / "model.onnx"), load_external_data=False)
        assert {n.overload for n in graph.graph.node if n.domain == ops.OP_DOMAIN} == {"sample_residual"}
    ort_model = MoOREOrtModel.from_export(root / "published-float32")
    got = ort_model.run(ids.numpy(), None, ort_model.task_ids(["a", "c"], 2))[0]
    assert np.abs(got - want.numpy()).max() < 1e-4
    assert export_torchscript(f, root / "published.pt", root / "published-ad").validation.ok


@pytest.mark.parametrize("backend", ["torchscript", "pt2"])
def test_torchscript_and_pt2_validated(tiny, backend):
    f, ad = tiny["llama"]
    dest = tiny["root"] / ("llama.pt" if backend == "torchscript" else "llama.pt2")
    fn = export_torchscript if backend == "torchscript" else export_pt2
    rep = fn(f, dest, ad, with_past=True)
    assert dest.is_file() and rep.validation.ok and set(rep.validation.diffs) == set(TASKS)
    assert set(rep.validation.diffs["a"]) == {"logits", "present"}
    module = load_file(dest, backend, with_past=True)
    kv = [torch.zeros(2, 2, 0, 12) for _ in range(4)]
    ids = torch.tensor([[4, 5, 6, 3], [7, 8, 9, 3]])  # a .pt2 with a cache wants >= 4 positions (tracer's range)
    out = module(ids, torch.ones_like(ids), torch.tensor([0, 2]), *kv)
    pt = moorize.load(f, ad)
    with torch.no_grad():
        want = pt(ids, task_ids=torch.tensor([0, 2])).logits
    assert torch.allclose(out[0], want, atol=1e-5)


def test_validation_failure_leaves_nothing(tiny):
    f, ad = tiny["llama"]
    dest = tiny["root"] / "never"
    with pytest.raises(MoorizeError, match="validation failed.*nothing was written"):
        export_onnx(f, dest, ad, atol=0.0, rtol=1e-12)
    assert not dest.exists() and not any(p.name.startswith(".never") for p in dest.parent.iterdir())


# ---- CLI and bad input ---------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_export(tiny):
    f, ad = tiny["bert"]
    res = invoke("export", f, "--adapter", ad, "--onnx", tiny["root"] / "bert-cli", "--decompose")
    assert res.exit_code == 0, res.output
    assert "standard ops only" in res.output and "task c: logits" in res.output


def tiny_tokenizer(directory):
    """A word-level tokenizer whose ids fit the tiny models' 96-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(80)] + ["hi", "yo"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                            unk_token="<unk>").save_pretrained(directory)


def test_run_generates_and_benches(tiny, llama_past):
    """moorize run on an export that has a tokenizer: prints JSON lines and the bench figures."""
    dest = tiny["root"] / "llama-onnx"
    tiny_tokenizer(dest)
    inp = tiny["root"] / "in.jsonl"
    inp.write_text('{"prompt": "hi w3", "task": "a"}\n{"prompt": "yo"}\n')
    res = invoke("run", dest, "--task", "c", "--input", inp, "--max-new-tokens", "4", "--bench", "--bench-runs", "2")
    assert res.exit_code == 0, res.output
    lines = [json.loads(ln) for ln in res.output.splitlines() if ln.startswith("{")]
    assert [ln["input"] for ln in lines] == ["hi w3", "yo"]
    assert "tokens/s" in res.output and "p90" in res.output
    bad = tiny["root"] / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    res = invoke("run", dest, "--task", "a", "--input", bad)
    assert res.exit_code == 2 and "bad.jsonl:2: invalid JSON" in res.output


def test_bad_inputs_are_one_line_errors(tiny, llama_past):
    f, ad = tiny["llama"]
    root = tiny["root"]
    cases = [
        (("run", root / "llama-onnx", "--task", "nope", "--prompt", "x"), "unknown task 'nope' (--task); tasks are: a, b, c"),
        (("export", f, "--onnx", root / "o1", "--opset", "17"), "opset 17 is too old"),
        (("export", f, "--adapter", root / "missing-ad", "--onnx", root / "o2"), "adapter directory"),
        (("export", f, "--onnx", root / "o3", "--weights", "reference", "--dtype", "float16"), "needs --dtype float32"),
        (("export", f), "nothing to export"),
        (("export", f, "--onnx", root / "llama-onnx"), "not empty; pass --overwrite"),
        (("run", root / "nowhere", "--task", "a", "--prompt", "x"), "does not exist"),
    ]
    broken = root / "broken-ad"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    cases.append((("export", f, "--adapter", broken, "--onnx", root / "o4"), "missing adapter_model.safetensors"))
    blocker = root / "a-file"
    blocker.write_text("")
    cases.append((("export", f, "--onnx", blocker / "sub"), "cannot write"))
    for args, message in cases:
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 2
    assert not any((root / n).exists() for n in ("o1", "o2", "o3", "o4"))
    # a task id out of range at run time: the runtime says so; the bare graph refuses it as well
    m = MoOREOrtModel.from_export(root / "llama-onnx")
    ids = np.array([[5, 6]])
    with pytest.raises(MoorizeError, match="task id out of range in \\[3\\]: the model has 3 task"):
        m.run(ids, np.ones_like(ids), [3])
    with pytest.raises(MoorizeError, match="task id 7 out of range"):
        m.generate_ids(ids, task=7)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "task_ids": np.array([3])}
    feeds.update({n: np.zeros((1, 2, 0, 12), np.float32) for n in m.meta["inputs"][3:]})
    with pytest.raises(Exception, match="out of bounds|invalid|Gather"):
        m.session.run(None, feeds)


def test_help_lists_export_and_run():
    res = invoke("--help")
    assert "export" in res.output and "run " in res.output
    assert "deprecated" in invoke("export", "--help").output


def test_the_kv_layout_of_a_nested_text_config():
    """A vision-language config nests its decoder's (text_config): the cache geometry is the decoder's."""
    import transformers

    from moorize.exporters.graphs import kv_layout

    text = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    nested = transformers.LlavaConfig(text_config=text.to_dict())
    assert kv_layout(nested) == kv_layout(text) == {"num_layers": 3, "num_kv_heads": 2, "head_dim": 8}
