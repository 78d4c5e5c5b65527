"""Every family transformers loads: tiny random models of 20 families (decoders, encoders,
encoder-decoders, vision transformers, sparse-MoE decoders) convert at full rank and load with the
original outputs; adapters round-trip; task merges load in transformers with no moorize; the
sparse-MoE experts are factored expert by expert, route each token with its row's task, and export."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import transformers
from families import BY_NAME, FAMILIES
from helpers import perturb
from safetensors.torch import load_file, save_file

import moorize
from moorize.errors import MoorizeError
from moorize.io.factored import FactoredCheckpoint
from moorize.model.layer import MoORELinear, moore_layers

pytestmark = pytest.mark.versions  # also run at the minimum versions and on the newest torch (.ci/run)

TASKS = ["a", "b"]


def output_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Factory: name -> (original model, inputs, source dir, factored dir, report), built once per family."""
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(name):
        if name not in cache:
            fam = BY_NAME[name]
            model = fam.build()
            src, out = root / f"{name}-hf", root / f"{name}-f"
            model.save_pretrained(src)
            report = moorize.convert(src, out)
            cache[name] = (model, fam.example_inputs(model), src, out, report)
        return cache[name]

    return get


def test_the_table_spans_the_kinds_the_issue_names():
    kinds = {f.inputs for f in FAMILIES}
    assert len(FAMILIES) >= 15 and kinds == {"ids", "seq2seq", "pixels"}
    assert sum(f.moe for f in FAMILIES) >= 2


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_full_rank_conversion_loads_with_the_original_outputs(name, converted, tmp_path, caplog):
    model, inputs, src, out, report = converted(name)
    with torch.no_grad():
        ref = output_of(model(**inputs))
        routed = moorize.load(out)
        got = output_of(routed(**inputs))
    assert report.layers and report.worst_rel_error < 1e-5
    assert (got - ref).abs().max().item() <= 1e-4
    assert all(isinstance(m, MoORELinear) for m in moore_layers(routed).values())
    if BY_NAME[name].moe:
        layouts = {r.layout for r in report.layers}
        assert not any(r.name.endswith((".gate", "mlp.gate", "router.classifier")) for r in report.layers), \
            "the token router stays dense"
        if any(".experts." in r.name for r in report.layers if not r.layout.startswith("expert")):  # module each
            n_experts = routed.config.num_experts
            assert len({r.name.split(".experts.")[1].split(".")[0] for r in report.layers if ".experts." in r.name}) \
                == n_experts
            return
        if not any(layout.startswith("expert") for layout in layouts):  # outside the interface (GraniteMoE, 5.3)
            with caplog.at_level(logging.WARNING, logger="moorize"):
                moorize.convert(src, tmp_path / "again")
            assert "outside transformers' experts interface: left dense" in caplog.text, "dense experts, unsaid"
            assert name == "granitemoe", "the experts' 3-D tensors were not factored"
            return
        experts = [r for r in report.layers if r.layout.startswith("expert")]  # "expert_t": stored transposed
        n_experts = getattr(routed.config, "num_local_experts", None) or routed.config.num_experts
        per_tensor: dict[str, int] = {}
        for r in experts:
            per_tensor[r.name.rpartition(".")[0]] = per_tensor.get(r.name.rpartition(".")[0], 0) + 1
        assert set(per_tensor.values()) == {n_experts}


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_adapter_round_trip_and_merge_load_in_plain_transformers(name, converted, tmp_path):
    model, inputs, src, out, _ = converted(name)
    routed = moorize.load(out, tasks=TASKS, router="task")
    perturb(routed, seed=1)
    moorize.save_adapter(routed, tmp_path / "ad")
    rows = inputs[next(iter(inputs))].shape[0]
    with torch.no_grad():
        tuned = output_of(routed(**inputs, task_ids=["b"] * rows))
        again = output_of(moorize.load(out, tmp_path / "ad")(**inputs, task_ids=["b"] * rows))
        base = output_of(model(**inputs))
    assert torch.equal(tuned, again)
    assert (tuned - base).abs().max().item() > 1e-3, "the perturbed routers must change the outputs"
    moorize.merge(out, tmp_path / "ad", "b", tmp_path / "merged")
    for shard in (tmp_path / "merged").glob("*.safetensors"):  # 64-byte aligned where sizes allow it
        head = shard.read_bytes()[:8]
        header = json.loads(shard.read_bytes()[8:8 + int.from_bytes(head, "little")])
        start = 8 + int.from_bytes(head, "little")
        offsets = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
        aligned = [(start + a) % 64 == 0 for a, b in offsets if (b - a) % 64 == 0]
        assert all(aligned), f"{shard.name}: a tensor off 64-byte alignment (grouped expert kernels refuse it)"
    plain = getattr(transformers, BY_NAME[name].model_class)
    with torch.no_grad():
        try:  # the check needs a transformers that reloads the family's own checkpoint faithfully
            drift = (output_of(plain.from_pretrained(src).eval()(**inputs)) - base).abs().max().item()
        except RuntimeError as e:
            drift, why = float("nan"), str(e).splitlines()[0]
        else:
            why = f"its outputs move by {drift:.2g}"
        if not drift <= 1e-4:  # RecurrentGemma and Jamba at transformers 5.3
            pytest.skip(f"transformers {transformers.__version__} does not reload {name}'s own checkpoint "
                        f"({why}): a merged one cannot be checked in it")
        merged = output_of(plain.from_pretrained(tmp_path / "merged").eval()(**inputs))
    assert (merged - tuned).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_tokens_route_with_their_own_rows_task(name, converted):
    """Experts see the batch's tokens flattened and gathered: each must still carry its row's task."""
    _, inputs, _, out, _ = converted(name)
    routed = moorize.load(out, tasks=TASKS, router="task+sample")
    perturb(routed, seed=2)
    with torch.no_grad():
        mixed = routed(**inputs, task_ids=["a", "b"]).logits
        row0 = routed(**{k: v[:1] for k, v in inputs.items()}, task_ids=["a"]).logits
        row1 = routed(**{k: v[1:] for k, v in inputs.items()}, task_ids=["b"]).logits
        both_a = routed(**inputs, task_ids=["a", "a"]).logits
    assert torch.allclose(mixed[0], row0[0], atol=1e-5) and torch.allclose(mixed[1], row1[0], atol=1e-5)
    assert (both_a[1] - mixed[1]).abs().max() > 1e-3, "row 1's task must matter"


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_export_with_past_runs_in_onnx_runtime_as_in_pytorch(name, converted, tmp_path):
    from moorize.exporters.onnx import export_onnx
    from moorize.runtime import MoOREOrtModel

    _, inputs, _, out, _ = converted(name)
    routed = moorize.load(out, tasks=TASKS, router="task+sample")
    perturb(routed, seed=3)
    moorize.save_adapter(routed, tmp_path / "ad")
    report = export_onnx(out, tmp_path / "onnx", tmp_path / "ad", with_past=True)  # validated per task inside
    assert report.moore_nodes == len(moore_layers(routed))
    ort = MoOREOrtModel.from_export(tmp_path / "onnx")
    ids = inputs["input_ids"]
    got = ort.generate_ids(ids.numpy(), task=["a", "b"], max_new_tokens=6)
    with torch.no_grad():
        want = routed.generate(ids, attention_mask=torch.ones_like(ids), task_ids=["a", "b"], max_new_tokens=6,
                               do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    np.testing.assert_array_equal(got, want.numpy())


def test_legacy_stored_names_convert_the_way_transformers_loads_them(converted, tmp_path):
    """A BERT checkpoint with TF-era names (LayerNorm.gamma/beta): transformers renames them on load; so does
    moorize, and the factored checkpoint holds the module names."""
    model, inputs, src, _, _ = converted("bert")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    sd = load_file(src / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in sd.items()}
    assert renamed.keys() != sd.keys()
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    moorize.convert(legacy, tmp_path / "f")
    with FactoredCheckpoint(tmp_path / "f") as ckpt:
        names = set(ckpt.passthrough_names())
    assert not any("gamma" in n or "beta" in n for n in names)
    with torch.no_grad():
        got = moorize.load(tmp_path / "f")(**inputs).last_hidden_state
        ref = model(**inputs).last_hidden_state
    assert (got - ref).abs().max().item() <= 1e-4


def test_vit_blocks_are_found_under_their_module_names(converted):
    """ViT stores encoder.layer.N.attention.attention.query; recent transformers name the modules
    layers.N.attention.q_proj (5.3 keeps the stored names). The layers are found under the installed
    transformers' module names, whichever they are."""
    model, _, src, out, report = converted("vit")
    stored = json.loads((src / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (src / "model.safetensors").read_bytes()[:8], "little")])
    assert any(".attention.attention.query." in k for k in stored)
    projections = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".attention." in n}
    assert len(projections) >= 3 and {r.name.rsplit(".", 1)[-1] for r in report.layers} >= projections


def test_a_moore_layer_answers_what_model_code_reads_of_a_weight_and_refuses_computing_with_it(converted):
    _, _, _, out, _ = converted("t5")
    layer = next(iter(moore_layers(moorize.load(out)).values()))
    w = layer.weight
    assert w.dtype == layer.U.dtype and w.device == layer.U.device
    assert tuple(w.shape) == (layer.out_features, layer.in_features)
    assert w.stride() == (0, 0), "the dense matrix must not be materialised (one zero, expanded)"
    with pytest.raises(MoorizeError, match="weight of a MoORE layer"):
        torch.nn.functional.linear(torch.ones(1, layer.in_features), w)
    with pytest.raises(MoorizeError):
        torch.ones(1, layer.out_features) @ w.T


def test_layers_whose_weight_the_model_code_reads_stay_dense(converted, tmp_path):
    """Mamba's mixer computes with ``self.dt_proj.weight`` (and hands x_proj and out_proj to fused kernels): those
    layers are kept dense, with a warning, and asking for them is one line; its in_proj is factored. T5 reads only
    its projections' dtype, so every one of its projections is factored."""
    _, _, src, _, report = converted("mamba")
    assert {r.name.rsplit(".", 1)[-1] for r in report.layers} == {"in_proj"}
    with pytest.raises(MoorizeError, match="reads directly: it cannot be a MoORE layer"):
        moorize.convert(src, tmp_path / "x", targets=["*.dt_proj"])
    assert not (tmp_path / "x").exists()
    t5 = converted("t5")[4]
    assert {"q", "k", "v", "o", "wi", "wo"} <= {r.name.rsplit(".", 1)[-1] for r in t5.layers}


def test_an_image_encoder_exports_and_runs_in_onnx_runtime(converted, tmp_path):
    """ViT: (pixel_values, task_ids) in, last_hidden_state out, every task validated against PyTorch; bad pixels
    and a text command are one line each."""
    from click.testing import CliRunner

    from moorize.cli import cli
    from moorize.exporters.onnx import export_onnx
    from moorize.runtime import MoOREOrtModel

    _, inputs, _, out, _ = converted("vit")
    routed = moorize.load(out, tasks=TASKS, router="task+sample")
    perturb(routed, seed=4)
    moorize.save_adapter(routed, tmp_path / "ad")
    report = export_onnx(out, tmp_path / "onnx", tmp_path / "ad")
    assert report.kind == "vision" and report.validation.ok
    ort = MoOREOrtModel.from_export(tmp_path / "onnx")
    pixels = inputs["pixel_values"].numpy()
    got = ort.image_features(pixels, task=["a", "b"])
    with torch.no_grad():
        want = routed(**inputs, task_ids=["a", "b"]).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(ort.image_features(pixels, task="a") - got).max() > 1e-4  # the task matters
    for bad, says in ((pixels[0], "channels, height, width"), (pixels[:, :, :8], "ONNX Runtime refused"),
                      (np.full_like(pixels, np.nan), "finite")):
        with pytest.raises(MoorizeError, match=says):
            ort.image_features(bad, task="a")
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "onnx"), "--task", "a", "--prompt", "hi"])
    assert res.exit_code == 2 and "is an image encoder" in res.output


@pytest.mark.parametrize("name", ["fsmt", "led"])
@pytest.mark.parametrize("seq", [2, 6], ids=["as-long-as-the-batch", "longer"])
def test_sequence_first_layers_route_each_row_with_its_task(name, seq, converted):
    """FSMT's layers and LED's encoder attention take [sequence, batch, features]: found by the load's probe, they
    route dimension 1, so a mixed-task batch gives each row what it gives alone, also where the sequence is as
    long as the batch (where no shape could tell the two apart)."""
    model, _, _, out, _ = converted(name)
    routed = moorize.load(out, tasks=TASKS, router="task+sample")
    perturb(routed, scale=0.2, seed=2)
    layers = [routed.get_submodule(p) for p in routed.moore.layer_paths.values()]
    assert all(x._cache is None and x._prepared is None and not x._merged for x in layers), \
        "the probe's folded weights (a model's size) must not outlive it"
    marked = [p for p in routed.moore.layer_paths.values() if routed.get_submodule(p).row_dim == 1]
    assert marked and all("attn" in p for p in marked) == (name == "led")
    inputs = BY_NAME[name].example_inputs(model, seq=seq + 2)
    with torch.no_grad():
        mixed = routed(**inputs, task_ids=["a", "b"]).logits
        alone = [routed(**{k: v[i:i + 1] for k, v in inputs.items()}, task_ids=[t]).logits for i, t in enumerate("ab")]
        both_a = routed(**inputs, task_ids=["a", "a"]).logits
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-4, rtol=1e-4)  # misrouted rows differ by ~0.7
    assert (both_a[1] - mixed[1]).abs().max() > 1e-3, "row 1's task must matter"
    assert not any(moorize.load(out).get_submodule(p).row_dim for p in marked), "one task: no probe, nothing to route"


def test_experts_kept_as_modules_route_one_task_per_batch(converted, tmp_path):
    """Switch Transformers keeps one module per expert, fed a subset of the tokens: a batch of one task routes
    (each row as it routes alone), mixed rows are refused in one line, and so is a several-task export."""
    model, inputs, _, out, _ = converted("switch_transformers")
    routed = moorize.load(out, tasks=TASKS, router="task")
    perturb(routed, scale=0.2, seed=2)
    with torch.no_grad():
        both_b = routed(**inputs, task_ids=["b", "b"]).logits
        row1 = routed(**{k: v[1:] for k, v in inputs.items()}, task_ids=["b"]).logits
        both_a = routed(**inputs, task_ids=["a", "a"]).logits
        torch.testing.assert_close(both_b[1:], row1, atol=1e-5, rtol=1e-5)
        assert (both_a - both_b).abs().max() > 1e-3
        with pytest.raises(moorize.MoorizeError, match="^switch_transformers: its sparse-MoE experts are modules"):
            routed(**inputs, task_ids=["a", "b"])
    moorize.save_adapter(routed, tmp_path / "ad")
    from moorize.exporters.onnx import export_onnx

    with pytest.raises(moorize.MoorizeError, match="which an export cannot route per task yet"):
        export_onnx(out, tmp_path / "onnx", tmp_path / "ad")
    assert not (tmp_path / "onnx").exists()
