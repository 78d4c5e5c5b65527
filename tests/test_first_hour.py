"""What a new user meets in the first hour, through the real command line: `moorize --help` by stage,
`moorize env`, `moorize generate` (an adapter in PyTorch, equal to its export in ONNX Runtime), a Hub id as the
source from a pre-filled offline cache, the error for a missing source, and export's stage lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import moorize

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, cwd=None, timeout=600):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "moorize", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def one_line_error(res, *phrases):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for p in phrases:
        assert p in lines[0], (p, lines[0])
    return lines[0]


# ---- help and env ------------------------------------------------------------------------------------------------

def test_help_names_every_command_by_stage_with_whole_descriptions():
    from moorize.cli import cli as group
    from moorize.cli.app import COMMAND_STAGES

    res = cli("--help")
    assert res.returncode == 0
    staged = [n for _, names in COMMAND_STAGES for n in names]
    assert sorted(staged) == sorted(group.commands), "every command belongs to a stage"
    for title, _names in COMMAND_STAGES:
        assert f"{title}:" in res.stdout
    listed = [ln.split()[0] for ln in res.stdout.split("Getting started:", 1)[1].splitlines()
              if ln.startswith("  ") and not ln.startswith("   ")]
    assert listed == staged  # in pipeline order
    assert "..." not in res.stdout.split("Getting started:", 1)[1]  # no description cut short


def test_env_reports_versions_providers_extras_and_shipped_checkpoints():
    res = cli("env")
    assert res.returncode == 0, res.stderr
    keys = [ln.split("  ")[0] for ln in res.stdout.splitlines()]
    for key in ("moorize", "python", "torch", "onnxruntime providers", "transformers", "extras", "shipped smollm2"):
        assert key in keys, (key, res.stdout)
    assert "CPUExecutionProvider" in res.stdout and torch.__version__ in res.stdout
    info = json.loads(cli("env", "--json").stdout)
    assert info["packages"]["transformers"] == transformers.__version__
    assert info["extras"]["serve"] is True  # the test extra installs starlette and uvicorn
    path = Path(cli("env", "--path", "smollm2").stdout.strip())
    assert path.suffix == ".gguf" and path.is_file()
    assert Path(cli("env", "--path", "minilm").stdout.strip(), "model.safetensors").is_file()
    one_line_error(cli("env", "--path", "gpt5"), "unknown shipped checkpoint 'gpt5' (--path)", "smollm2, minilm")


# ---- moorize generate ----------------------------------------------------------------------------------------------

def _rows(res) -> list[dict]:
    assert res.returncode == 0, res.stderr
    return [json.loads(x) for x in res.stdout.splitlines()]


def test_generate_equals_the_export_in_onnx_runtime(serving_exports):
    """Greedy text of an adapter in PyTorch is what its ONNX export gives in ONNX Runtime, for every task."""
    export = serving_exports["llama"]
    factored, adapter = export.parent / "llama-f", export.parent / "llama-ad"
    prompts = ["abc", "hello world"]
    for task in ("math", "poem"):
        args = ["--task", task, "--max-new-tokens", "6"] + [a for p in prompts for a in ("--prompt", p)]
        torch_rows = _rows(cli("generate", factored, "--adapter", adapter, *args))
        ort_rows = _rows(cli("run", export, *args))
        assert [r["input"] for r in torch_rows] == prompts
        assert [r["output"] for r in torch_rows] == [r["output"] for r in ort_rows], task
    # the two tasks are routed differently: not the same text
    a, b = (_rows(cli("generate", factored, "--adapter", adapter, "--task", t, "--prompt", "abc",
                      "--max-new-tokens", "6"))[0]["output"] for t in ("math", "poem"))
    assert a != b


def test_generate_compile_writes_the_eager_text(serving_exports):
    """--compile (the static-cache decode step through torch.compile; aot_eager here: capture without codegen)."""
    export = serving_exports["llama"]
    factored, adapter = export.parent / "llama-f", export.parent / "llama-ad"
    args = ["--adapter", adapter, "--max-new-tokens", "6", "--input", export.parent / "mixed.jsonl"]
    (export.parent / "mixed.jsonl").write_text('{"prompt": "abc", "task": "math"}\n{"prompt": "hello", "task": "poem"}\n')
    res = cli("generate", factored, *args, "--compile", env={"MOORIZE_COMPILE_BACKEND": "aot_eager"})
    assert "PyTorch on cpu, compiled" in res.stderr
    assert _rows(res) == _rows(cli("generate", factored, *args))
    one_line_error(cli("generate", export.parent / "bert-f", "--adapter", export.parent / "bert-ad", "--task", "poem",
                       "--prompt", "x", "--compile"), "--compile compiles text generation")


def test_generate_scores_the_classes_of_a_classifier_adapter(serving_exports):
    export = serving_exports["bert"]
    factored, adapter = export.parent / "bert-f", export.parent / "bert-ad"
    texts = ["great film", "dull"]
    args = ["--task", "poem"] + [a for t in texts for a in ("--prompt", t)]
    rows = _rows(cli("generate", factored, "--adapter", adapter, *args))
    ort_rows = _rows(cli("run", export, *args))
    for row, ort in zip(rows, ort_rows):
        assert set(row["scores"]) == {"poem-0", "poem-1", "poem-2"}  # this task's own labels
        assert abs(sum(row["scores"].values()) - 1) < 1e-4
        assert row["output"] == max(row["scores"], key=row["scores"].get) == ort["output"]


def test_generate_refuses_bad_input_in_one_line(serving_exports, tmp_path):
    export = serving_exports["llama"]
    factored, adapter = export.parent / "llama-f", export.parent / "llama-ad"
    one_line_error(cli("generate", factored, "--adapter", adapter, "--prompt", "x"), "several tasks", "math, poem")
    one_line_error(cli("generate", factored, "--adapter", adapter, "--task", "maths", "--prompt", "x"),
                   "unknown task 'maths'")
    one_line_error(cli("generate", factored, "--adapter", adapter, "--task", "math"), "--prompt", "--input")
    one_line_error(cli("generate", factored, "--task", "math", "--prompt", "x", "--device", "tpu"), "unknown device")
    one_line_error(cli("generate", export.parent / "bert-f", "--prompt", "x"), "does not generate text")


# ---- a Hub id as the source -------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache with one model in it, laid out as huggingface_hub writes it (refs, snapshots)."""
    from helpers import char_tokenizer

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    repo = root / "cache" / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / COMMIT
    model.save_pretrained(snap)
    char_tokenizer().save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return root / "cache", snap, model


def test_convert_takes_a_hub_id_from_the_offline_cache(hub_cache, tmp_path):
    cache, snap, model = hub_cache
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    res = cli("convert", "tiny-org/tiny-llama", tmp_path / "out", "--no-progress", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ckpt = moorize.FactoredCheckpoint(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj"
    torch.testing.assert_close(ckpt.reconstruct(name), model.state_dict()[name + ".weight"], atol=1e-5, rtol=1e-5)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()  # the tokenizer came along
    # a revision by commit, and the same conversion
    res = cli("convert", "tiny-org/tiny-llama", tmp_path / "by-commit", "--revision", COMMIT, "--no-progress",
              env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(snap)) == sorted(os.listdir(snap))  # the cache is read, never written


def test_hub_and_missing_sources_fail_in_one_line_naming_what_would_work(hub_cache, tmp_path):
    cache, _, _ = hub_cache
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    one_line_error(cli("convert", "tiny-org/absent-model", tmp_path / "o1", env=env, cwd=tmp_path),
                   "tiny-org/absent-model", "not in the Hugging Face cache", "HF_HUB_OFFLINE")
    one_line_error(cli("convert", "tiny-org/tiny-llama", tmp_path / "o2", "--revision", "f" * 40, env=env,
                       cwd=tmp_path), "tiny-org/tiny-llama at revision " + "f" * 40)
    missing = one_line_error(cli("convert", "SmolLM2-135M-Instruct/", tmp_path / "o3", cwd=tmp_path),
                             "SmolLM2-135M-Instruct does not exist", "Hub id", "moorize env --path smollm2")
    assert "Traceback" not in missing
    src = tmp_path / "src"
    src.mkdir()
    one_line_error(cli("convert", src, tmp_path / "o4", "--revision", "main", cwd=tmp_path),
                   "--revision is for a Hub id")
    for name in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / name).exists()


# ---- export's stage lines ----------------------------------------------------------------------------------------

def test_export_prints_its_stages_and_no_third_party_notices(serving_exports, tmp_path):
    export = serving_exports["llama"]
    res = cli("export", export.parent / "llama-f", "--adapter", export.parent / "llama-ad", "--onnx",
              tmp_path / "onnx")
    assert res.returncode == 0, res.stderr
    stages = [ln for ln in res.stderr.splitlines() if ln.startswith("export: ")]
    assert [s.split(" (")[0] for s in stages] == [
        "export: loaded " + str(export.parent / "llama-f"), "export: tracing model.onnx",
        "export: converting the traced program to ONNX", "export: traced model.onnx", "export: written",
        "export: validating against PyTorch", "export: validated"], stages
    others = [ln for ln in res.stderr.splitlines() if not ln.startswith("export: ")]
    assert not others, others  # torchvision notices, FutureWarnings: none reach the user


# ---- moorize data check ------------------------------------------------------------------------------------------

def test_data_check_summarises_the_shipped_dataset_without_problems():
    res = cli("data", "check", ROOT / "examples" / "data" / "tasks.jsonl", "--strict")
    assert res.returncode == 0, res.stderr
    assert "320 examples, prompt/response (language modelling), 2 task(s)" in res.stdout
    rows = {ln.split()[0]: ln.split()[1] for ln in res.stdout.splitlines()[2:4]}
    assert rows == {"addition": "160", "sentiment": "160"}
    assert res.stdout.rstrip().endswith("problems: none")
    info = json.loads(cli("data", "check", ROOT / "examples" / "data" / "tasks-eval.jsonl", "--json").stdout)
    assert info["examples"] == 32 and [t["examples"] for t in info["tasks"]] == [16, 16] and info["problems"] == []


def test_data_check_names_what_would_spoil_training(tmp_path, serving_exports):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [
        {"task": "a", "prompt": "Q: 1\n", "response": "x"}, {"task": "a", "prompt": "Q: 1\n", "response": "y"},
        {"task": "a", "prompt": "Q: 1\n", "response": "y"}] + [{"task": "b", "prompt": f"p{i}", "response": "r"}
                                                            for i in range(8)]))
    res = cli("data", "check", bad)
    assert res.returncode == 0  # problems are reported, not fatal, unless --strict
    for phrase in ("task 'a' has only 3 example(s)", "task 'a': 1 duplicate example(s) (" + f"{bad}:3)",
                   "task 'a': 1 input(s) with different answers", "task 'a': 3 prompt(s) end in whitespace"):
        assert phrase in res.stdout, (phrase, res.stdout)
    assert "task 'b'" not in res.stdout
    assert cli("data", "check", bad, "--strict").returncode == 1
    # lengths in a checkpoint's tokens (the character tokenizer: one token a character, BOS first, EOS last)
    tok = cli("data", "check", bad, "--tokenizer", serving_exports["llama"].parent / "llama-f", "--max-length", "6")
    assert tok.returncode == 0, tok.stderr
    assert "prompt tokens min/median/max" in tok.stdout
    assert "task 'a': 3 example(s) over --max-length 6 tokens" in tok.stdout, tok.stdout
    assert "task 'b'" not in tok.stdout.split("problems", 1)[1]
    # classification: a task with one label cannot be learned
    cls = tmp_path / "cls.csv"
    cls.write_text("task,text,label\n" + "".join(f"s,t{i},pos\n" for i in range(9)))
    assert "task 's' has a single label (pos)" in cli("data", "check", cls).stdout


def test_data_check_fails_on_what_train_fails_on_in_one_line(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"task": "a", "prompt": "x", "response": "y"}\n{"task": "a", "prompt": "x"\n')
    one_line_error(cli("data", "check", broken), f"{broken}:2")
    one_line_error(cli("data", "check", tmp_path / "absent.jsonl"), "absent.jsonl does not exist")
    one_line_error(cli("data", "check", broken, "--tokenizer", tmp_path / "nowhere"), "not a directory")
