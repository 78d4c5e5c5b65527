"""Multi-task data: readers, task tables, tokenisation, collation, batching (issue 4, first slice)."""

from __future__ import annotations

import json

import pytest
import torch

from moorize.errors import MoorizeError
from moorize.training.data import IGNORE_INDEX, TaskTable, collate, encode, length_grouped_batches, read_examples


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


LM = [{"task": "add", "prompt": "2+3=", "response": "5"},
      {"task": "rev", "prompt": "reverse abc", "response": "cba"},
      {"task": "add", "prompt": "10+7=", "response": "17"}]


def test_reads_jsonl_and_csv_and_builds_task_table(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", LM)
    b = tmp_path / "b.csv"
    b.write_text("task,prompt,response\nsort,\"b a\",\"a b\"\nadd,1+1=,2\n")
    ex = read_examples([a, b])
    assert [e.task for e in ex] == ["add", "rev", "add", "sort", "add"]
    assert ex[3].prompt == "b a" and ex[3].where.endswith("b.csv:2")
    table = TaskTable.from_examples(ex)
    assert table.tasks == ["add", "rev", "sort"]


@pytest.mark.parametrize("content, message", [
    ('{"task": "a", "prompt": "x", "response": "y"}\n{"task": "a", "prompt": \n', "x.jsonl:2: invalid JSON"),
    ('{"prompt": "x", "response": "y"}\n', "x.jsonl:1: missing field 'task'"),
    ('{"task": "a", "prompt": "x"}\n', "x.jsonl:1: missing field 'response'"),
    ('{"task": "a", "text": "x"}\n', "x.jsonl:1: missing field 'label'"),
    ('{"task": "a"}\n', "x.jsonl:1: needs either"),
    ('[1, 2]\n', "x.jsonl:1: expected an object"),
    ('\n\n', "has no examples"),
    ('{"task": "a", "prompt": "x", "response": "y"}\n{"task": "b", "text": "t", "label": "1"}\n',
     "x.jsonl:2: mixes classification and language-modelling"),
])
def test_bad_data_names_file_and_line(tmp_path, content, message):
    p = tmp_path / "x.jsonl"
    p.write_text(content)
    with pytest.raises(MoorizeError, match=message):
        read_examples(p)


def test_missing_file_and_csv_errors(tmp_path):
    with pytest.raises(MoorizeError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")
    p = tmp_path / "x.csv"
    p.write_text("task,text,label\nsentiment,good,\n")
    with pytest.raises(MoorizeError, match="x.csv:2: missing field 'label'"):
        read_examples(p)


def test_causal_encoding_masks_the_prompt(tmp_path, tokenizer):
    ex = read_examples(write_jsonl(tmp_path / "a.jsonl", LM))
    table = TaskTable.from_examples(ex)
    items = encode(ex, tokenizer, table, max_length=64)
    for e, item in zip(ex, items):
        labels, ids = item["labels"], item["input_ids"]
        assert len(labels) == len(ids)
        n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
        assert ids[:n_prompt] == tokenizer(e.prompt)["input_ids"]
        assert labels[n_prompt:] == tokenizer(e.response, add_special_tokens=False)["input_ids"]
        assert item["task_id"] == table.tasks.index(e.task)


def test_unknown_task_and_label_outside_head(tmp_path, tokenizer):
    train = read_examples(write_jsonl(tmp_path / "train.jsonl", [
        {"task": "sentiment", "text": "great", "label": "pos"}, {"task": "sentiment", "text": "bad", "label": "neg"},
        {"task": "topic", "text": "goal", "label": "2"}, {"task": "topic", "text": "vote", "label": "10"}]))
    table = TaskTable.from_examples(train)
    assert table.labels == {"sentiment": ["neg", "pos"], "topic": ["2", "10"]}
    items = encode(train, tokenizer, table, max_length=16)
    assert [i["label"] for i in items] == [1, 0, 0, 1]
    bad_task = read_examples(write_jsonl(tmp_path / "eval.jsonl", [{"task": "spam", "text": "x", "label": "1"}]))
    with pytest.raises(MoorizeError, match=r"eval.jsonl:1: unknown task 'spam'; the training data's tasks are: sentiment, topic"):
        encode(bad_task, tokenizer, table, max_length=16)
    bad_label = read_examples(write_jsonl(tmp_path / "eval2.jsonl", [{"task": "sentiment", "text": "x",
                                                                      "label": "neutral"}]))
    with pytest.raises(MoorizeError, match=r"eval2.jsonl:1: unknown label 'neutral'; the 'sentiment' head's labels are: neg, pos"):
        encode(bad_label, tokenizer, table, max_length=16)


def test_truncation_warns_or_refuses(tmp_path, tokenizer, caplog):
    long = [{"task": "t", "prompt": "short", "response": " ".join(["word"] * 40)}]
    ex = read_examples(write_jsonl(tmp_path / "long.jsonl", long))
    table = TaskTable.from_examples(ex)
    with pytest.raises(MoorizeError, match=r"long.jsonl:1: \d+ tokens exceed the maximum of 16"):
        encode(ex, tokenizer, table, max_length=16, truncate=False)
    items = encode(ex, tokenizer, table, max_length=16, truncate=True)
    assert len(items[0]["input_ids"]) == 16 == len(items[0]["labels"])
    assert "truncated 1 of 1" in caplog.text
    prompt_only = read_examples(write_jsonl(tmp_path / "p.jsonl", [{"task": "t", "prompt": " ".join(["w"] * 40),
                                                                    "response": "x"}]))
    with pytest.raises(MoorizeError, match="no response is left"):
        encode(prompt_only, tokenizer, table, max_length=8)


def test_chat_template_required_when_asked(tmp_path, tokenizer):
    ex = read_examples(write_jsonl(tmp_path / "a.jsonl", LM))
    with pytest.raises(MoorizeError, match="no chat template"):
        encode(ex, tokenizer, TaskTable.from_examples(ex), max_length=32, chat_template=True)


def test_collate_pads_and_keeps_tasks():
    items = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "task_id": 1},
             {"input_ids": [8], "labels": [8], "task_id": 0}]
    b = collate(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert torch.equal(b["task_ids"], torch.tensor([1, 0]))
    c = collate([{"input_ids": [1, 2], "label": 3, "task_id": 0}], pad_id=0)
    assert c["label"].tolist() == [3] and "labels" not in c


def test_length_grouped_batches_cover_everything_and_reduce_padding():
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=rng).tolist()
    batches = length_grouped_batches(lengths, batch_size=8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=3)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=4)

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    plain = [list(range(i, min(i + 8, 1000))) for i in range(0, 1000, 8)]
    assert padding(batches) < 0.2 * padding(plain)
