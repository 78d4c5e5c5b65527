"""Runtime inputs of an export get one line each, never a raw ONNX Runtime error (class 7).

Empty prompts and batches, token ids outside the vocabulary, arrays of the wrong rank or
type, prompts past a decoder's positions, and bad generation or export options are
refused by ``MoOREOrtModel`` and ``moorize run`` / ``moorize export`` with one line (exit
2). Texts longer than an encoder's positions are truncated with a warning, as tokenizers
do with ``truncation=True``, and give exactly the outputs of the truncated text.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from click.testing import CliRunner
from test_cli_errors import assert_one_line_error
from test_export import tiny, tiny_tokenizer  # noqa: F401  (the module-scoped tiny models and adapters)

from moorize.cli import cli
from moorize.errors import MoorizeError
from moorize.exporters.onnx import export_onnx
from moorize.runtime import MoOREOrtModel


@pytest.fixture(scope="module")
def exports(tiny):  # noqa: F811
    root = tiny["root"]
    out = {}
    for arch, kw in (("llama", {"with_past": True}), ("bert", {})):
        f, ad = tiny[arch]
        dest = root / f"rt-{arch}"
        export_onnx(f, dest, ad, **kw)
        tiny_tokenizer(dest)
        out[arch] = dest
    out["factored"] = tiny["llama"][0]
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def llama(exports):
    return MoOREOrtModel.from_export(exports["llama"])


@pytest.fixture(scope="module")
def bert(exports):
    return MoOREOrtModel.from_export(exports["bert"])


def words(n: int) -> str:
    return " ".join(f"w{i % 80}" for i in range(n))


def one_line(res, *phrases):
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, *phrases)


# ---- the Python API ------------------------------------------------------------------------------

def test_limits_come_from_the_export(llama, bert):
    assert (llama.max_positions, llama.vocab_size) == (64, 96)
    assert (bert.max_positions, bert.vocab_size) == (64, 96)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.generate("", task="a"), "input 1 is empty"),
    (lambda m: m.generate(["hi", ""], task="a"), "input 2 is empty"),
    (lambda m: m.generate([], task="a"), "empty batch"),
    (lambda m: m.generate([3], task="a"), "input 1 is int, not text"),
    (lambda m: m.generate_ids(np.zeros((1, 0), np.int64), task="a"), "empty input: the prompt has no tokens"),
    (lambda m: m.generate_ids(np.zeros((0, 3), np.int64), task="a"), "empty batch"),
    (lambda m: m.generate_ids([[5, 96]], task="a"), "token id 96 is outside the vocabulary (0..95)"),
    (lambda m: m.generate_ids([[5, -1]], task="a"), "token id -1 is outside the vocabulary"),
    (lambda m: m.generate_ids([5, 6], task="a"), "must be a [batch, length] array"),
    (lambda m: m.generate_ids([[0.5, 1.5]], task="a"), "integer token ids"),
    (lambda m: m.generate_ids([[5, 6]], [[1, 1, 1]], task="a"), "attention_mask must be an integer array of shape"),
    (lambda m: m.generate_ids([[5, 6]], [[0, 0]], task="a"), "at least one 1"),
    (lambda m: m.generate_ids([[5, 6]], task="a", max_new_tokens=0), "max_new_tokens must be an integer"),
    (lambda m: m.generate_ids([[5, 6]], task="a", max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (lambda m: m.generate_ids([[5, 6]], task="a", do_sample=True, temperature=float("nan")), "finite temperature"),
    (lambda m: m.generate_ids([[5, 6]], task="a", do_sample=True, top_p=1.5), "0 < top_p <= 1"),
    (lambda m: m.generate_ids([[5, 6]], task="a", seed=-3), "seed must be a non-negative integer"),
    (lambda m: m.generate_ids([list(range(1, 70))], task="a"), "69 tokens exceed the model's 64 positions"),
    (lambda m: m.generate(words(70), task="a"), "has 70 tokens: more than the model's 64 positions"),
    (lambda m: m.generate(words(64), task="a"), "fill the model's 64 positions"),
    (lambda m: m.generate("hi", task="nope"), "unknown task 'nope'"),
    (lambda m: m.run([[5, 6]], [[1, 1]], [0, 1]), "one id per row"),
])
def test_bad_decoder_inputs_are_one_line(llama, call, message):
    with pytest.raises(MoorizeError) as err:
        call(llama)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_generation_stops_at_the_position_limit_with_a_warning(llama, caplog):
    prompt = np.array([list(range(4, 64))])  # 60 tokens: 4 positions left
    with caplog.at_level(logging.WARNING, logger="moorize.runtime.generation"):
        out = llama.generate_ids(prompt, task="a", max_new_tokens=10)
    assert out.shape[1] <= 4
    assert "capped to 4" in caplog.text
    assert (llama.generate_ids(prompt, task="a", max_new_tokens=4) == out).all()


def test_an_encoder_truncates_long_texts_to_its_positions(bert, caplog):
    long, cut = words(100), words(62)  # 62 words + [CLS]-less word-level ids: the first 64 tokens
    with caplog.at_level(logging.WARNING, logger="moorize.runtime.session"):
        got = bert.scores([long], task="a")
    assert "truncated 1 of 1 input(s) to the encoder's 64 positions" in caplog.text
    ids = bert.tokenizer([long])["input_ids"][0][:64]
    assert bert.tokenizer.decode(ids).split()[:62] == cut.split()
    ref = bert.run(np.array([ids]), np.ones((1, 64), np.int64), [0])[0][:, :2]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert bert.classify([long, "hi"], task="a")  # a mixed batch pads and truncates together


def test_bad_encoder_inputs_are_one_line(bert):
    for call, message in ((lambda: bert.classify("", task="a"), "input 1 is empty"),
                          (lambda: bert.classify([], task="a"), "empty batch"),
                          (lambda: bert.scores(["hi"], task="zzz"), "unknown task 'zzz'")):
        with pytest.raises(MoorizeError, match=message):
            call()


# ---- the CLI ---------------------------------------------------------------------------------------

def test_run_cli_inputs(exports):
    llama_dir, bert_dir = exports["llama"], exports["bert"]
    cases = [
        ((llama_dir, "--task", "a", "--prompt", ""), ("input 1 is empty",)),
        ((llama_dir, "--task", "a", "--prompt", words(80)), ("80 tokens", "64 positions")),
        ((llama_dir, "--task", "a", "--prompt", "hi", "--max-new-tokens", "-1"), ("max-new-tokens must be at least 1",)),
        ((llama_dir, "--task", "a", "--prompt", "hi", "--do-sample", "--temperature", "nan"), ("temperature must be a finite number",)),
        ((llama_dir, "--task", "a", "--prompt", "hi", "--do-sample", "--top-p", "0"), ("top-p must be in (0, 1]",)),
        ((llama_dir, "--task", "a", "--prompt", "hi", "--bench", "--bench-runs", "0"), ("bench-runs must be at least 1",)),
        ((llama_dir, "--task", "a", "--prompt", "hi", "--seed", "-1"), ("seed must be at least 0",)),
        ((bert_dir, "--task", "a", "--prompt", ""), ("input 1 is empty",)),
    ]
    for args, phrases in cases:
        one_line(CliRunner().invoke(cli, ["run", *map(str, args)]), *phrases)
    res = CliRunner().invoke(cli, ["run", str(bert_dir), "--task", "a", "--prompt", words(100)])
    assert res.exit_code == 0, res.output  # an encoder truncates (with a warning) rather than failing


@pytest.mark.parametrize("flag,value,says", [("--atol", "nan", "a finite number"), ("--atol", "-1", "at least 0"),
                                            ("--rtol", "inf", "a finite number"), ("--rtol", "-0.5", "at least 0")])
def test_export_tolerances_are_checked_before_exporting(exports, tmp_path, flag, value, says):
    dest = tmp_path / "never"
    res = CliRunner().invoke(cli, ["export", str(exports["factored"]), "--onnx", str(dest), flag, value])
    one_line(res, f"{flag[2:]} must be {says}")
    assert not dest.exists()
    res = CliRunner().invoke(cli, ["export", str(exports["factored"]), "--pt2", str(tmp_path / "x.pt2"), flag, value])
    one_line(res, f"{flag[2:]} must be {says}")
