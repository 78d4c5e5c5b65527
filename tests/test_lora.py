"""The MoORE → LoRA bridge: each task of a ``task``-router model as a PEFT LoRA adapter on the source model.

What is checked is what a user relies on: every layer's error within the bound and its rank the smallest that
meets it (recomputed here from the files, against the source's weights and the routed model's task
matrices), the real PEFT loading each task (one adapter, several named ones switched with ``set_adapter``,
mixed batches with ``adapter_names=``) within the reported logit error of the routed model, the deltas taken
against the source even after a truncated conversion, and every refusal a single line with nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny
from helpers import randomize_routers
from test_cli_errors import assert_no_output, assert_one_line_error

import moorize
from moorize.cli import cli
from moorize.io.factored import FactoredCheckpoint, as_stored
from moorize.io.safetensors import read_tensors
from moorize.lora import peft_format
from moorize.lora.bound import prompt_ids
from moorize.lora.delta import choose_rank

peft = pytest.importorskip("peft", reason="the LoRA bridge is checked with the real PEFT (moorize[test])")
TASKS = ["math", "poem"]


def routed_with_adapter(root: Path, arch: str = "llama", router: str = "task", **convert_kw):
    """A tiny source, its conversion and a trained-looking adapter (routers moved off their initialisation)."""
    src, factored, adapter = root / "src", root / "factored", root / "adapter"
    build_tiny(arch).save_pretrained(src)
    moorize.convert(src, factored, **convert_kw)
    model = moorize.load(factored, router=router, tasks=TASKS)
    randomize_routers(model)
    moorize.save_adapter(model, adapter)
    return src, factored, adapter


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-llama")
    src, factored, adapter = routed_with_adapter(root)
    report = moorize.export_lora(factored, adapter, root / "lora")
    return src, factored, adapter, root / "lora", report


def source_model(src: Path, arch: str = "llama"):
    import transformers

    cls = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(src, dtype=torch.float32).eval()


def outputs(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def test_every_layer_meets_the_bound_with_the_smallest_rank(llama):
    src, factored, adapter, dest, report = llama
    routed = moorize.load(factored, adapter)
    source = read_tensors(src / "model.safetensors")
    with FactoredCheckpoint(factored) as ckpt:
        layouts = {n: r.layout for n, r in ckpt.layers.items()}
    for task_id, task in enumerate(TASKS):
        cfg = json.loads((dest / task / "adapter_config.json").read_text())
        meta = json.loads((dest / task / "moorize_lora.json").read_text())
        weights = read_tensors(dest / task / "adapter_model.safetensors")
        assert meta["task"] == task and meta["delta_base"] == "source" and meta["base_model"] == str(src)
        assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(src)
        assert cfg["lora_alpha"] == cfg["r"] == meta["rank"] and cfg["alpha_pattern"] == cfg["rank_pattern"]
        assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                 "v_proj"]
        assert set(weights) == {k for m in meta["layers"] for k in peft_format.tensor_keys(m)}
        for name, layer in moorize.moore_layers(routed).items():
            module = routed.moore.layer_paths[name]
            entry = meta["layers"][module]
            W_t = layer.merged_weight(task_id)
            W = as_stored(source[f"{name}.weight"], layouts[name]).double()
            a_key, b_key = peft_format.tensor_keys(module)
            A, B = weights[a_key].double(), weights[b_key].double()
            assert A.shape[0] == B.shape[1] == entry["rank"] == cfg["rank_pattern"].get(module, cfg["r"])
            norm = torch.linalg.matrix_norm(W_t).item()
            error = torch.linalg.matrix_norm(W_t - W - B @ A).item() / norm
            assert error == pytest.approx(entry["rel_error"], rel=1e-3, abs=1e-9)
            assert error <= 1e-3
            # one rank fewer would not do: the delta's own spectrum says so
            s = torch.linalg.svdvals(W_t - W)
            if entry["rank"] > 1:
                assert s[entry["rank"] - 1:].square().sum().sqrt().item() / norm > 1e-3
            assert entry["rank"] == choose_rank(s, norm, bound=1e-3)
    assert report.tasks[0].directory == dest / TASKS[0] and all(t.logits["max_abs"] > 0 for t in report.tasks)


def test_peft_loads_every_task_within_the_reported_bound(llama):
    src, factored, adapter, dest, report = llama
    routed = moorize.load(factored, adapter)
    prompts = prompt_ids(factored, routed.config)
    model = peft.PeftModel.from_pretrained(source_model(src), dest / TASKS[0], adapter_name=TASKS[0])
    model.load_adapter(dest / TASKS[1], adapter_name=TASKS[1])
    bound = {t.task: t.logits["max_abs"] for t in report.tasks}
    with torch.no_grad():
        for task in TASKS:
            model.set_adapter(task)
            for ids in prompts:
                diff = (model(ids).logits - routed(ids, task_ids=[task]).logits).abs().max().item()
                assert diff <= bound[task] * 1.01 + 1e-6, (task, diff, bound[task])
        # one batch, each row its own task, as a multi-LoRA server batches them
        ids = torch.cat([prompts[0], prompts[0]])
        mixed = model(ids, adapter_names=TASKS).logits
        want = routed(ids, task_ids=TASKS).logits
        assert (mixed - want).abs().max().item() <= max(bound.values()) * 1.01 + 1e-6
        with model.disable_adapter():  # and without an adapter it is the source model
            assert torch.allclose(model(ids).logits, source_model(src)(ids).logits, atol=1e-6)


def test_a_fixed_rank_everywhere(llama, tmp_path):
    src, factored, adapter, _, _ = llama
    report = moorize.export_lora(factored, adapter, tmp_path / "r4", rank=4, validate=False)
    cfg = json.loads((tmp_path / "r4" / "math" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and cfg["rank_pattern"] == {}
    assert all(e["rank"] == 4 for t in report.tasks for e in t.layers.values())
    assert all(t.logits is None for t in report.tasks)
    worse = max(t.worst[1] for t in report.tasks)
    assert worse > 1e-3  # rank 4 cannot hold these deltas: the report says how far off it is
    peft.PeftModel.from_pretrained(source_model(src), tmp_path / "r4" / "math")  # shapes as PEFT builds them


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_conv1d_and_encoder_models_load_in_peft(arch, tmp_path):
    """GPT-2 stores its layers transposed (Conv1D: fan_in_fan_out), BERT's `dense` names more modules than are
    targets (full paths are written); both load in PEFT and compute the routed model."""
    src, factored, adapter = routed_with_adapter(tmp_path, arch)
    report = moorize.export_lora(factored, adapter, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "poem" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    if arch == "bert":
        assert all(m.startswith("encoder.layer.") for m in cfg["target_modules"])
    model = peft.PeftModel.from_pretrained(source_model(src, arch), tmp_path / "lora" / "poem")
    routed = moorize.load(factored, adapter)
    bound = report.tasks[1].logits["max_abs"]
    with torch.no_grad():
        for ids in prompt_ids(factored, routed.config):
            diff = (outputs(model(input_ids=ids)) - outputs(routed(ids, task_ids=["poem"]))).abs().max().item()
            assert diff <= bound * 1.01 + 1e-6


def test_after_a_truncated_conversion_the_delta_carries_what_truncation_dropped(tmp_path):
    """Against the source, not the factored base: source + LoRA is the (truncated) routed model."""
    src, factored, adapter = routed_with_adapter(tmp_path, rank="8", residual="drop")
    report = moorize.export_lora(factored, adapter, tmp_path / "lora", max_error=1e-2)
    assert all(t.worst[1] <= 1e-2 for t in report.tasks)
    routed = moorize.load(factored, adapter)
    model = peft.PeftModel.from_pretrained(source_model(src), tmp_path / "lora" / "math")
    ids = prompt_ids(factored, routed.config)[0]
    with torch.no_grad():
        want = routed(ids, task_ids=["math"]).logits
        assert (model(ids).logits - want).abs().max().item() <= report.tasks[0].logits["max_abs"] * 1.01 + 1e-6
        # the truncation itself is far larger than that: the source alone is not the routed model
        with model.disable_adapter():
            assert (model(ids).logits - want).abs().max().item() > 10 * report.tasks[0].logits["max_abs"]


def test_a_moved_source_is_named_or_stood_in_for_by_exact_factors(tmp_path):
    src, factored, adapter = routed_with_adapter(tmp_path)
    moved = tmp_path / "moved-src"
    src.rename(moved)
    # full-rank float32 factors are within far less than the bound of the source: they stand in
    report = moorize.export_lora(factored, adapter, tmp_path / "a", validate=False)
    assert report.delta_base == "factors"
    again = moorize.export_lora(factored, adapter, tmp_path / "b", source=moved, validate=False)
    assert again.delta_base == "source" and again.source == str(moved)
    for t, u in zip(report.tasks, again.tasks):
        assert {m: e["rank"] for m, e in t.layers.items()} == {m: e["rank"] for m, e in u.layers.items()}
    other = tmp_path / "other"
    build_tiny("llama", seed=5).save_pretrained(other)
    with pytest.raises(moorize.MoorizeError, match="is not the checkpoint .* was converted from"):
        moorize.export_lora(factored, adapter, tmp_path / "c", source=other)
    assert not (tmp_path / "c").exists()


def test_truncated_factors_cannot_stand_in_for_a_missing_source(tmp_path):
    src, factored, adapter = routed_with_adapter(tmp_path, rank="8", residual="drop")
    shutil.rmtree(src)
    with pytest.raises(moorize.MoorizeError, match="is not there.*pass --source PATH"):
        moorize.export_lora(factored, adapter, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


# ---- the command line: the table, and one-line refusals with nothing written ---------------------------


def test_the_command_writes_and_prints_the_table(llama, tmp_path):
    _, factored, adapter, _, _ = llama
    res = CliRunner().invoke(cli, ["export", str(factored), "--adapter", str(adapter), "--lora", str(tmp_path / "l"),
                                   "--max-error", "0.01", "--no-validate"])
    assert res.exit_code == 0, res.output
    assert "2 PEFT LoRA adapter(s), max error 0.01" in res.stdout and "vLLM: serve with --enable-lora" in res.stdout
    assert "q_proj" in res.stdout and "not measured (--no-validate)" in res.stdout
    assert sorted(p.name for p in (tmp_path / "l").iterdir()) == TASKS
    res = CliRunner().invoke(cli, ["export", str(factored), "--adapter", str(adapter), "--lora", str(tmp_path / "l")])
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, "--overwrite")
    assert sorted(p.name for p in (tmp_path / "l").iterdir()) == TASKS  # the earlier export is untouched


@pytest.mark.parametrize("case", ["sample-router", "no-adapter", "missing-adapter", "rank-zero", "rank-too-large",
                                  "rank-and-error", "error-out-of-range", "lora-option-alone", "graph-option"])
def test_refusals_are_one_line_and_write_nothing(case, llama, tmp_path):
    _, factored, adapter, _, _ = llama
    dest = tmp_path / "lora"
    args = ["export", str(factored), "--adapter", str(adapter), "--lora", str(dest)]
    phrases = {
        "sample-router": ("router mode 'task+sample'", "--router task"),
        "no-adapter": ("needs the trained adapter",),
        "missing-adapter": ("does not exist",),
        "rank-zero": ("rank must be at least 1", "LoraOptions.rank"),
        "rank-too-large": ("--rank 100000 exceeds the full rank",),
        "rank-and-error": ("--rank and --max-error exclude each other",),
        "error-out-of-range": ("max-error must be in (0, 1)",),
        "lora-option-alone": ("apply to --lora only",),
        "graph-option": ("--with-past applies to --onnx",),
    }[case]
    if case == "sample-router":
        sample = tmp_path / "sample-adapter"
        moorize.save_adapter(moorize.load(factored, router="task+sample", tasks=TASKS), sample)
        args[3] = str(sample)
    elif case == "no-adapter":
        args[2:4] = []
    elif case == "missing-adapter":
        args[3] = str(tmp_path / "nowhere")
    else:
        args += {"rank-zero": ["--rank", "0"], "rank-too-large": ["--rank", "100000"],
                 "rank-and-error": ["--rank", "4", "--max-error", "0.01"], "error-out-of-range": ["--max-error", "1"],
                 "lora-option-alone": [], "graph-option": ["--with-past"]}[case]
        if case == "lora-option-alone":
            args = ["export", str(factored), "--adapter", str(adapter), "--onnx", str(dest), "--rank", "4"]
    res = CliRunner().invoke(cli, args)
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, *phrases)
    assert_no_output(dest)


def test_a_failure_midway_leaves_nothing(llama, tmp_path, monkeypatch):
    _, factored, adapter, _, _ = llama
    import moorize.lora.export as lora_export

    calls = []
    real = lora_export.factor_deltas

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(lora_export, "factor_deltas", failing)
    res = CliRunner().invoke(cli, ["export", str(factored), "--adapter", str(adapter), "--lora", str(tmp_path / "l")])
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, "no space left", want_code=3)
    assert len(calls) == 5
    assert_no_output(tmp_path / "l")


# ---- the real checkpoint --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_trained_on_two_tasks_runs_in_peft_as_merge_computes_it(smollm2_full, smollm2_dir, tmp_path):
    """SmolLM2 at full rank, router 'task' trained briefly on two tasks, exported at the default bound: PEFT on the
    source model gives each task's logits within the reported bound of `moorize merge`, and the same greedy text."""
    import transformers

    factored, _ = smollm2_full
    rows = []
    for i in range(16):
        a, b = i % 7 + 2, i % 5 + 3
        rows.append({"task": "math", "prompt": f"What is {a} plus {b}?", "response": f" {a + b}."})
        rows.append({"task": "poem", "prompt": f"Write a line about {a} stars.", "response": f" {a} stars shine."})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    moorize.train(factored, data, tmp_path / "adapter", router="task", max_steps=4, batch_size=4, lr=1e-3, warmup=1,
                  seed=0, progress=False)
    report = moorize.export_lora(factored, tmp_path / "adapter", tmp_path / "lora")
    assert [t.task for t in report.tasks] == TASKS and report.delta_base == "source"
    assert all(t.worst[1] <= 1e-3 * 1.01 for t in report.tasks)  # the bound, up to the factors' float32 rounding
    tok = transformers.AutoTokenizer.from_pretrained(factored)
    source = source_model(smollm2_dir)
    model = peft.PeftModel.from_pretrained(source, tmp_path / "lora" / "math", adapter_name="math")
    model.load_adapter(tmp_path / "lora" / "poem", adapter_name="poem")
    prompts = prompt_ids(factored, source.config)
    for t in report.tasks:
        moorize.merge(factored, tmp_path / "adapter", t.task, tmp_path / f"merged-{t.task}")
        merged = source_model(tmp_path / f"merged-{t.task}")
        model.set_adapter(t.task)
        with torch.no_grad():
            for ids in prompts:
                diff = (model(ids).logits - merged(ids).logits).abs().max().item()
                assert diff <= t.logits["max_abs"] * 1.01 + 1e-5, (t.task, diff, t.logits)
            for text in ("What is 3 plus 4?", "The capital of France is"):
                ids = tok(text, return_tensors="pt")["input_ids"]
                want = merged.generate(ids, max_new_tokens=12, do_sample=False)
                assert torch.equal(model.generate(input_ids=ids, max_new_tokens=12, do_sample=False), want), t.task
        del merged
