"""A selector that selects nothing is never accepted silently (``moorize.selectors``).

Every name or pattern a user gives to pick something (layer patterns of ``--targets`` and ``--rank
PATTERN=POLICY``, task names of merge, generate, run and the Python API, a GGUF file, an execution provider,
a shipped checkpoint, an option's choice, eval data's tasks and labels, the benchmarks' part lists) must
match something, each on its own: else the command fails before its long work with one line naming the
selector, its flag, what it could have matched and a close match. And a matching one still works.
Tiny models (the session's ``serving_exports``: a Llama and a BERT with two tasks, math and poem).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import moorize
from moorize import MoorizeError
from moorize.cli import cli
from moorize.conversion.targets import pattern_matches
from moorize.selectors import listing, require_matches, require_name

REPO = Path(__file__).resolve().parent.parent
LLAMA_KINDS = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(res, *phrases: str, code: int = 2) -> str:
    """Exit code, a single ``error:`` line on stderr holding every phrase, no traceback."""
    shown = f"exit {res.exit_code}\n--- stdout ---\n{res.stdout}\n--- stderr ---\n{res.stderr}"
    assert res.exit_code == code, shown
    assert "Traceback" not in res.stdout + res.stderr, shown
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for p in phrases:
        assert p in lines[0], (p, lines[0])
    return lines[0]


def refused(call, *phrases: str) -> str:
    with pytest.raises(MoorizeError) as err:
        call()
    text = str(err.value)
    assert "\n" not in text, text
    for p in phrases:
        assert p in text, (p, text)
    return text


@pytest.fixture(scope="module")
def llama(serving_exports):
    """(HF source, factored dir, task+sample adapter, ONNX export) of the tiny two-task Llama."""
    export = serving_exports["llama"]
    root = export.parent
    return root / "llama-hf", root / "llama-f", root / "llama-ad", export


@pytest.fixture(scope="module")
def task_adapter(llama, tmp_path_factory):
    """A router-mode 'task' adapter (mergeable) of the tiny Llama, tasks math and poem, routers moved."""
    from helpers import perturb

    model = moorize.load(llama[1], tasks=["math", "poem"], router="task")
    perturb(model, scale=0.2)
    return moorize.save_adapter(model, tmp_path_factory.mktemp("task-adapter") / "adapter")


# ---- the helper ------------------------------------------------------------------------------------------------

def test_every_selector_must_match_on_its_own_not_only_their_union():
    assert require_matches("--x", ["b", "a"], ["a", "b", "c"]) == {"b": ["b"], "a": ["a"]}
    text = refused(lambda: require_matches("--x", ["a", "zz"], ["a", "b"]))
    assert text == "unknown name 'zz' (--x); names are: a, b"


def test_a_pattern_names_its_flag_the_candidates_and_a_close_match():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    hits = require_matches("--targets", ["*proj", "q_proj"], names, match=pattern_matches, noun="linear layer")
    assert hits == {"*proj": names, "q_proj": names[:1]}
    text = refused(lambda: require_matches("--targets", ["qproj"], names, match=pattern_matches, noun="linear layer",
                                           shown=["q_proj", "up_proj"]))
    assert text == ("--targets 'qproj' matches no linear layer; linear layers are: q_proj, up_proj; "
                    "did you mean 'q_proj'?")


def test_names_match_exactly_as_written_and_a_case_slip_is_suggested():
    assert require_name("--task", "math", ["math", "poem"], noun="task") == "math"
    refused(lambda: require_name("--task", "Math", ["math", "poem"], noun="task"),
            "unknown task 'Math' (--task); tasks are: math, poem; did you mean 'math'?")
    refused(lambda: require_name("--task", "math.", ["math"], noun="task"), "did you mean 'math'?")
    assert "did you mean" not in refused(lambda: require_name("--task", "zzz", ["math"], noun="task"))
    refused(lambda: require_name("--task", "x", [], noun="task"), "unknown task 'x' (--task); there are no tasks")


def test_a_long_list_of_candidates_is_cut_and_counted():
    assert listing([f"t{i}" for i in range(40)]).endswith("t15, ... (40 in all)")
    assert listing(["a", "b", "a"]) == "a, b"


# ---- convert: --targets, --rank PATTERN=POLICY, --gguf-file ----------------------------------------------------

def test_convert_targets_each_pattern_matches_a_linear_layer(llama, tmp_path):
    """Through the real console entry point: one line, exit 2, nothing written."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "moorize", "convert", str(llama[0]), str(out), "--no-progress",
                          "--targets", "q_proj", "--targets", "qproj"], capture_output=True, text=True, timeout=300)
    res = type("Res", (), {"exit_code": run.returncode, "stdout": run.stdout, "stderr": run.stderr})
    one_line_error(res, f"--targets 'qproj' matches no linear layer; linear layers are: {LLAMA_KINDS}",
                   "did you mean 'q_proj'?")
    assert not out.exists()
    one_line_error(invoke("convert", llama[0], out, "--no-progress", "--targets", "mlp.down_prj"),
                   "did you mean 'mlp.down_proj'?")
    report = moorize.convert(llama[0], out, targets=["q_proj", "mlp.*"])
    kinds = {r.name.rsplit(".", 1)[1] for r in report.layers}
    assert kinds == {"q_proj", "gate_proj", "up_proj", "down_proj"} and len(report.layers) == 8


def test_convert_rank_patterns_each_set_some_targets_rank(llama, tmp_path):
    src, out = llama[0], tmp_path / "out"
    one_line_error(invoke("convert", src, out, "--no-progress", "--rank", "8", "--rank", "qproj=4"),
                   f"--rank pattern 'qproj' matches no target layer; target layers are: {LLAMA_KINDS}",
                   "did you mean 'q_proj'?")
    # a linear layer --targets leaves out is no target: the candidates say which are
    one_line_error(invoke("convert", src, out, "--no-progress", "--targets", "mlp.*", "--rank", "o_proj=4"),
                   "--rank pattern 'o_proj' matches no target layer; target layers are: gate_proj, up_proj, down_proj")
    # shadowed: every layer it matches is claimed by a later pattern (the last matching one wins)
    one_line_error(invoke("convert", src, out, "--no-progress", "--rank", "q_proj=4", "--rank", "self_attn.*=8"),
                   "--rank pattern 'q_proj' sets no rank", "model.layers.*.self_attn.q_proj",
                   "later pattern 'self_attn.*'", "give 'q_proj=4' after it")
    one_line_error(invoke("convert", src, out, "--no-progress", "--rank", "8", "--rank", "16"),
                   "--rank '8' and --rank '16' both set the default policy")
    assert not out.exists()
    report = moorize.convert(src, out, rank=["self_attn.*=8", "q_proj=4", "mlp.*=6", "down_proj=full"])
    ranks = {r.name.rsplit(".", 1)[1]: r.rank for r in report.layers}
    assert ranks == {"q_proj": 4, "k_proj": 8, "v_proj": 8, "o_proj": 8, "gate_proj": 6, "up_proj": 6,
                     "down_proj": 48}


def test_convert_gguf_file_names_a_gguf_file_of_the_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model-q4.gguf").write_bytes(b"")
    one_line_error(invoke("convert", src, tmp_path / "out", "--no-progress", "--gguf-file", "model-q5.gguf"),
                   f"unknown GGUF file 'model-q5.gguf' (--gguf-file); GGUF files in {src} are: model-q4.gguf",
                   "did you mean 'model-q4.gguf'?")
    assert not (tmp_path / "out").exists()


# ---- tasks: merge, save_pretrained(merge_task=), the routed model's task ids ----------------------------------

def test_merge_task_names_a_task_of_the_adapter_before_loading(llama, task_adapter, tmp_path):
    factored = llama[1]
    dest = tmp_path / "dense"
    one_line_error(invoke("merge", factored, dest, "--adapter", task_adapter, "--task", "maths"),
                   "unknown task 'maths' (--task); tasks are: math, poem; did you mean 'math'?")
    assert not dest.exists()
    # checked from the adapter's config before the base loads: a base that is not there is not reached
    refused(lambda: moorize.merge(tmp_path / "no-base", task_adapter, "peom", dest), "did you mean 'poem'?")
    res = invoke("merge", factored, dest, "--adapter", task_adapter, "--task", "math")
    assert res.exit_code == 0, res.output
    assert (dest / "config.json").is_file()


def test_the_routed_models_task_names_are_checked_with_their_argument(llama, task_adapter, tmp_path):
    model = moorize.load(llama[1], task_adapter)
    refused(lambda: model.save_pretrained(tmp_path / "d", merge_task="Math"),
            "unknown task 'Math' (merge_task); tasks are: math, poem; did you mean 'math'?")
    assert not (tmp_path / "d").exists()
    refused(lambda: model.set_default_task("peom"), "unknown task 'peom' (task)", "did you mean 'poem'?")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(MoorizeError, match=r"unknown task 'poems' \(task_ids\)"):
        with moorize.use_task(model, ["poems"]):
            pass
    with moorize.use_task(model, ["poem"]), torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# ---- tasks: generate (PyTorch), run (ONNX Runtime) and the runtime's API ---------------------------------------

def test_generate_task_names_a_task_before_the_model_loads(llama, tmp_path):
    _, factored, adapter, _ = llama
    one_line_error(invoke("generate", factored, "--adapter", adapter, "--task", "maths", "--prompt", "x"),
                   "unknown task 'maths' (--task); tasks are: math, poem; did you mean 'math'?")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "x", "task": "poem"}) + "\n" + json.dumps({"prompt": "y", "task": "pome"}))
    one_line_error(invoke("generate", factored, "--adapter", adapter, "--input", rows),
                   f"unknown task 'pome' (in {rows}); tasks are: math, poem; did you mean 'poem'?")
    # no adapter: the one task of fresh routers, 'default'
    one_line_error(invoke("generate", factored, "--task", "math", "--prompt", "x"),
                   "unknown task 'math' (--task); tasks are: default")
    res = invoke("generate", factored, "--adapter", adapter, "--task", "math", "--prompt", "1+1=",
                 "--max-new-tokens", "2")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["input"] == "1+1="


def test_run_task_and_provider_name_what_the_export_and_onnxruntime_have(llama):
    export = llama[3]
    one_line_error(invoke("run", export, "--task", "maths", "--prompt", "x"),
                   "unknown task 'maths' (--task); tasks are: math, poem; did you mean 'math'?")
    one_line_error(invoke("run", export, "--task", "math", "--prompt", "x", "--provider", "CPUExecutionProvidr"),
                   "unknown execution provider 'CPUExecutionProvidr' (--provider); execution providers in this "
                   "onnxruntime", "did you mean 'CPUExecutionProvider'?")
    res = invoke("run", export, "--task", "poem", "--prompt", "x", "--max-new-tokens", "2", "--provider",
                 "CPUExecutionProvider")
    assert res.exit_code == 0, res.output
    from moorize.runtime.session import MoOREOrtModel

    model = MoOREOrtModel.from_export(export, providers=["CPUExecutionProvider"])
    refused(lambda: model.task_ids("Poem", 1), "unknown task 'Poem' (task); tasks are: math, poem",
            "did you mean 'poem'?")
    assert model.task_ids("poem", 2).tolist() == [1, 1]


# ---- the rest: shipped checkpoints, choices, heads, factored layers, eval data, scripts --------------------------

def test_env_path_names_a_shipped_checkpoint():
    one_line_error(invoke("env", "--path", "smolm2"),
                   "unknown shipped checkpoint 'smolm2' (--path); shipped checkpoints are: smollm2, minilm; "
                   "did you mean 'smollm2'?")


def test_an_options_choice_is_one_of_its_choices_with_a_close_match():
    from moorize.conversion.options import ConvertOptions
    from moorize.model.config import MoOREConfig

    # routers registered by other tests of the same process may follow the built-in three
    refused(lambda: MoOREConfig(router="tsk"), "unknown router mode 'tsk' (--router, MoOREConfig.router); router "
            "modes are: task, sample, task+sample", "did you mean 'task'?")
    refused(lambda: ConvertOptions(solver="gramm"),
            "unknown --solver value 'gramm' (ConvertOptions.solver); --solver values are: auto, gram, svd, "
            "randomized; did you mean 'gram'?")
    refused(lambda: moorize.TrainOptions(pooling="man"), "unknown --pooling value 'man'", "did you mean 'mean'?")
    assert MoOREConfig(router="task").router == "task"


def test_task_heads_label_only_their_tasks():
    refused(lambda: moorize.TaskHeads(8, ["a"], {"a": ["x", "y"], "b": ["z"]}),
            "unknown task 'b' (labels); tasks are: a")
    assert moorize.TaskHeads(8, ["a"], {"a": ["x", "y"]}).labels == {"a": ["x", "y"]}


def test_a_factored_layer_is_named_as_the_checkpoint_names_it(llama):
    with moorize.FactoredCheckpoint(llama[1]) as ckpt:
        refused(lambda: ckpt.factors("model.layers.0.self_attn.qproj"),
                "unknown factored layer 'model.layers.0.self_attn.qproj' (name)",
                "did you mean 'model.layers.0.self_attn.q_proj'?")
        assert ckpt.factors("model.layers.0.self_attn.q_proj")[0].shape[0] == 48


def test_eval_data_names_the_training_datas_tasks_and_labels():
    from moorize.training.data import Example, TaskTable

    table = TaskTable(["sentiment", "topic"], {"sentiment": ["neg", "pos"]})
    row = dict(prompt=None, response=None, text="x")
    refused(lambda: table.task_id(Example(task="sentimnt", where="eval.jsonl:3", label="pos", **row)),
            "eval.jsonl:3: unknown task 'sentimnt'; the training data's tasks are: sentiment, topic; "
            "did you mean 'sentiment'?")
    refused(lambda: table.label_id(Example(task="sentiment", where="eval.jsonl:4", label="Pos", **row)),
            "eval.jsonl:4: unknown label 'Pos'; the 'sentiment' head's labels are: neg, pos; did you mean 'pos'?")
    assert table.label_id(Example(task="sentiment", where="eval.jsonl:5", label="pos", **row)) == 1


@pytest.mark.parametrize("script, args, phrase", [
    ("benchmarks/gpu.py", ["--parts", "convert,trian"], "unknown part 'trian' (--parts); parts are: convert, train, "
                                                         "decode; did you mean 'train'?"),
    ("benchmarks/scale.py", ["--models", "smollm"], "unknown model 'smollm' (--models); models are: smollm2, 1.1b; "
                                                    "did you mean 'smollm2'?"),
    ("examples/frontier.py", ["--methods", "lora,pisa"], "unknown method 'pisa' (--methods)"),
], ids=["gpu-parts", "scale-models", "frontier-methods"])
def test_the_scripts_lists_of_names_follow_the_same_rule(script, args, phrase):
    run = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert phrase in run.stderr.strip().splitlines()[-1], run.stderr
