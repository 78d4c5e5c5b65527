"""onnxruntime-genai runs a ``moorize export --onnx --with-past`` directory as it is (``genai_config.json``),
with ``task_ids`` fed as an extra model input: its greedy tokens equal ``MoOREOrtModel``'s, per task and
for a batch whose rows have different tasks."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime_genai as og
import pytest

from moorize.runtime import MoOREOrtModel


@pytest.fixture(scope="module")
def export(serving_exports):
    return serving_exports["llama"]


def genai_greedy(model, ids: np.ndarray, task_ids: list[int], new: int) -> np.ndarray:
    """[batch, ≤ new] tokens from onnxruntime-genai's own generation loop."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new, do_sample=False, batch_size=ids.shape[0])
    gen = og.Generator(model, params)
    gen.set_model_input("task_ids", np.array(task_ids, dtype=np.int64))
    gen.append_tokens(ids.astype(np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(np.array(gen.get_next_tokens()))
    return np.stack(out, 1)


def until_eos(row, eos) -> list[int]:
    row = [int(t) for t in row]
    return row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]


def test_the_export_carries_a_genai_config(export):
    cfg = json.loads((export / "genai_config.json").read_text())
    meta = json.loads((export / "moorize_export.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["num_hidden_layers"] == meta["kv"]["num_layers"] and dec["head_size"] == meta["kv"]["head_dim"]
    assert cfg["search"]["past_present_share_buffer"] is False
    assert (export / "tokenizer.json").is_file()


@pytest.mark.parametrize("prompt", ["Hello world", "Once upon a time"])
def test_genai_greedy_equals_moore_ort_model_per_task(export, prompt):
    ortm, model = MoOREOrtModel.from_export(export), og.Model(str(export))
    eos = set(ortm.meta["eos_token_id"])
    ids = np.array([ortm.tokenizer(prompt)["input_ids"]])
    outs = {}
    for task, tid in ortm.tasks.items():
        want = until_eos(ortm.generate_ids(ids, None, task, max_new_tokens=40)[0], eos)
        got = until_eos(genai_greedy(model, ids, [tid], 40)[0], eos)
        assert got == want and len(got) > 1, task
        outs[task] = got
    assert outs["math"] != outs["poem"]


def test_genai_batch_with_a_task_per_row(export):
    ortm, model = MoOREOrtModel.from_export(export), og.Model(str(export))
    eos = set(ortm.meta["eos_token_id"])
    ids = np.array([ortm.tokenizer(p)["input_ids"] for p in ("abcdefgh", "zyxwvuts")])  # same length: no padding
    got = genai_greedy(model, ids, [0, 1], 30)
    want = ortm.generate_ids(ids, None, ["math", "poem"], max_new_tokens=30)
    for r in range(2):
        assert until_eos(got[r], eos) == until_eos(want[r], eos)
