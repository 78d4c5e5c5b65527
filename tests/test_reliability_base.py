"""Reliability: an adapter runs only on the factored base it was trained on, and saving a routed model
never produces a checkpoint that loads as garbage.

(a) ``base_layout_fingerprint`` / ``base_layout`` in adapter_config.json: the same source converted
    with the residual dropped, another rank, another factor dtype or other targets is refused with
    one line naming the first differing layer; a reconversion with the same settings, and adapters
    written before the field existed, still load.
(b) ``model.save_pretrained(d)`` on a routed model writes the adapter: ``moorize.load(base, d)``
    reproduces the outputs, and transformers' ``from_pretrained(d)`` fails instead of building the
    targets with random weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import build_tiny, tree_digest
from helpers import perturb as _perturb

import moorize
from moorize import MoorizeError
from moorize.model.adapter import CONFIG_NAME, WEIGHTS_NAME

TASKS = ["alpha", "beta"]
NEW_KEYS = ("base_layout_fingerprint", "base_layout", "base_path")


@pytest.fixture
def bases(tmp_path):
    """One tiny llama source converted five ways: name -> factored directory (+ "src": the source)."""
    build_tiny("llama").save_pretrained(tmp_path / "src")
    ways = {
        "keep": dict(rank="12", residual="keep"),
        "keep_again": dict(rank="12", residual="keep", solver="svd"),  # same layout, other solver
        "drop": dict(rank="12", residual="drop"),
        "rank16": dict(rank="16", residual="keep"),
        "half": dict(rank="12", residual="keep", dtype="float16"),
        "mlp_only": dict(rank="12", residual="keep", targets=["mlp.*"]),
    }
    out = {"src": tmp_path / "src"}
    for name, kw in ways.items():
        moorize.convert(tmp_path / "src", tmp_path / name, **kw)
        out[name] = tmp_path / name
    return out


def _ids(batch=2, seq=7, seed=0):
    return torch.randint(3, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, task_ids):
    with torch.no_grad():
        return model(input_ids=ids, task_ids=task_ids).logits


def _trained(base, router="task+sample"):
    model = moorize.load(base, router=router, tasks=TASKS, householder=4, router_experts=16)
    _perturb(model, scale=0.2)
    return model


@pytest.fixture
def adapter(bases, tmp_path):
    """(model, adapter dir) trained on the rank-12, residual-kept conversion."""
    model = _trained(bases["keep"])
    moorize.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ---- (a) the base check covers the factored layout -----------------------------------------------

def test_layout_fingerprint_tells_conversions_apart(bases):
    fps = {k: moorize.FactoredCheckpoint(v).layout_fingerprint for k, v in bases.items() if k != "src"}
    assert fps["keep"] == fps["keep_again"]  # a reconversion with the same settings is the same base
    assert len({fps[k] for k in ("keep", "drop", "rank16", "half", "mlp_only")}) == 5
    sources = {moorize.FactoredCheckpoint(v).fingerprint for k, v in bases.items() if k != "src"}
    assert len(sources) == 1  # what the old check compared: identical for all of them


def test_adapter_records_the_layout(bases, adapter):
    _, ad = adapter
    cfg = json.loads((ad / CONFIG_NAME).read_text())
    ckpt = moorize.FactoredCheckpoint(bases["keep"])
    assert cfg["base_fingerprint"] == ckpt.fingerprint
    assert cfg["base_layout_fingerprint"] == ckpt.layout_fingerprint
    assert cfg["base_layout"] == ckpt.factor_layout
    assert cfg["base_layout"]["model.layers.0.mlp.up_proj"] == {"shape": [80, 48], "rank": 12, "residual": True,
                                                                 "dtype": "float32"}
    assert Path(cfg["base_path"]) == bases["keep"].absolute()
    text = (ad / CONFIG_NAME).read_text()
    assert '"model.layers.0.mlp.up_proj": {"shape": [80, 48]' in text  # one line per layer


def test_residual_dropped_is_refused_naming_layer_and_field(bases, adapter):
    _, ad = adapter
    with pytest.raises(MoorizeError) as e:
        moorize.load(bases["drop"], ad)
    msg = _one_line(e)
    assert f"adapter {ad} was trained on a base with rank 12 and the residual kept for model.layers.0." in msg
    assert "; this base has rank 12 and no residual" in msg


def test_other_rank_is_refused(bases, adapter):
    _, ad = adapter
    with pytest.raises(MoorizeError) as e:
        moorize.load(bases["rank16"], ad)
    assert "a base with rank 12 for model.layers.0." in _one_line(e) and "this base has rank 16" in str(e.value)


def test_other_factor_dtype_is_refused(bases, adapter):
    _, ad = adapter
    with pytest.raises(MoorizeError) as e:
        moorize.load(bases["half"], ad)
    msg = _one_line(e)
    assert "rank 12 and float32 factors" in msg and "this base has rank 12 and float16 factors" in msg


def test_other_targets_are_refused(bases, adapter):
    _, ad = adapter
    with pytest.raises(MoorizeError) as e:
        moorize.load(bases["mlp_only"], ad)
    assert "other --targets" in _one_line(e) and "self_attn" in str(e.value)


def test_matching_base_loads_with_identical_outputs(bases, adapter):
    model, ad = adapter
    ids, tasks = _ids(), torch.tensor([0, 1])
    ref = _logits(model, ids, tasks)
    for name in ("keep", "keep_again"):  # the same base, and a reconversion of it with the same settings
        again = moorize.load(bases[name], ad)
        assert torch.equal(_logits(again, ids, tasks), ref) if name == "keep" else \
            (_logits(again, ids, tasks) - ref).abs().max().item() < 1e-4


def test_adapter_without_the_new_fields_still_loads_on_its_base(bases, adapter, tmp_path):
    model, ad = adapter
    old = tmp_path / "old-adapter"
    shutil.copytree(ad, old)
    cfg = json.loads((old / CONFIG_NAME).read_text())
    for k in NEW_KEYS:
        del cfg[k]
    (old / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    ids, tasks = _ids(), torch.tensor([1, 0])
    assert torch.equal(_logits(moorize.load(bases["keep"], old), ids, tasks), _logits(model, ids, tasks))
    # the source check is still there for old adapters
    build_tiny("llama", seed=5).save_pretrained(tmp_path / "other-src")
    moorize.convert(tmp_path / "other-src", tmp_path / "other", rank="12")
    with pytest.raises(MoorizeError, match="different base checkpoint"):
        moorize.load(tmp_path / "other", old)


def test_adapter_written_before_router_norm_existed_keeps_its_function(bases, tmp_path):
    """Adapters from before ``router_norm`` lack the field; their router saw x as it came, so they load with
    router_norm "none" (today's default is "rms") and give the logits they gave then. Settings that are not an
    object, of an unknown name or of the wrong type are one line."""
    model = moorize.load(bases["keep"], tasks=TASKS, householder=4, router_experts=16, router_norm="none")
    _perturb(model, scale=0.2)
    old = tmp_path / "pre-norm"
    moorize.save_adapter(model, old)
    cfg = json.loads((old / CONFIG_NAME).read_text())
    del cfg["moore"]["router_norm"]
    (old / CONFIG_NAME).write_text(json.dumps(cfg))
    back = moorize.load(bases["keep"], old)
    assert back.moore.config.router_norm == "none" and moorize.MoOREConfig().router_norm == "rms"
    ids, tasks = _ids(), torch.tensor([1, 0])
    assert torch.equal(_logits(back, ids, tasks), _logits(model, ids, tasks))
    for moore, match in ((["task"], "not a JSON object"), ({**cfg["moore"], "gate": 2}, r"unknown MoORE setting\(s\) gate"),
                         ({**cfg["moore"], "householder": "4"}, "malformed MoORE settings")):
        (old / CONFIG_NAME).write_text(json.dumps({**cfg, "moore": moore}))
        with pytest.raises(MoorizeError, match=match) as e:
            moorize.load(bases["keep"], old)
        _one_line(e)


def test_fingerprint_alone_still_refuses_and_bad_layout_is_one_line(bases, adapter, tmp_path):
    _, ad = adapter
    only_fp = tmp_path / "only-fp"
    shutil.copytree(ad, only_fp)
    cfg = json.loads((only_fp / CONFIG_NAME).read_text())
    del cfg["base_layout"]
    (only_fp / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(MoorizeError, match="another conversion of this source") as e:
        moorize.load(bases["drop"], only_fp)
    _one_line(e)
    moorize.load(bases["keep"], only_fp)  # still fine on its own base

    broken = tmp_path / "broken"
    shutil.copytree(ad, broken)
    cfg = json.loads((broken / CONFIG_NAME).read_text())
    cfg["base_layout"]["model.layers.0.mlp.up_proj"] = {"rank": "twelve"}
    (broken / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(MoorizeError, match="malformed base_layout entry for 'model.layers.0.mlp.up_proj'"):
        moorize.load(bases["drop"], broken)


def test_merge_and_export_loading_refuse_the_mismatch(bases, tmp_path):
    model = _trained(bases["keep"], router="task")
    moorize.save_adapter(model, tmp_path / "task-adapter")
    with pytest.raises(MoorizeError, match="no residual"):
        moorize.merge(bases["drop"], tmp_path / "task-adapter", "beta", tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    from moorize.exporters.graphs import load_routed
    with pytest.raises(MoorizeError, match="rank 16"):
        load_routed(bases["rank16"], tmp_path / "task-adapter")
    # the command line: exit 2, one line, nothing written
    run = subprocess.run([sys.executable, "-m", "moorize", "merge", str(bases["half"]), str(tmp_path / "dense"),
                          "--adapter", str(tmp_path / "task-adapter"), "--task", "beta"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and "float16 factors" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "dense").exists()
    # and on the matching base the merge works and is exact
    dest = moorize.merge(bases["keep"], tmp_path / "task-adapter", "beta", tmp_path / "dense")
    dense = transformers.AutoModelForCausalLM.from_pretrained(dest).eval()
    ids = _ids()
    with torch.no_grad():
        assert (dense(ids).logits - _logits(model, ids, [1, 1])).abs().max().item() < 1e-5


# ---- (b) save_pretrained on a routed model --------------------------------------------------------

def test_save_pretrained_writes_the_adapter_and_round_trips(bases, tmp_path):
    model = _trained(bases["keep"])
    ids, tasks = _ids(), torch.tensor([0, 1])
    ref = _logits(model, ids, tasks)
    d = tmp_path / "saved" / "nested"
    model.save_pretrained(d)
    assert sorted(p.name for p in d.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "config.json"]
    again = moorize.load(bases["keep"], d)
    assert torch.equal(_logits(again, ids, tasks), ref)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(again.generate(ids, task_ids=["beta", "alpha"], **kw),
                       model.generate(ids, task_ids=["beta", "alpha"], **kw))
    # the same files as save_adapter
    moorize.save_adapter(model, tmp_path / "via-save-adapter")
    assert (d / WEIGHTS_NAME).read_bytes() == (tmp_path / "via-save-adapter" / WEIGHTS_NAME).read_bytes()
    assert json.loads((d / CONFIG_NAME).read_text()) == \
        json.loads((tmp_path / "via-save-adapter" / CONFIG_NAME).read_text())
    # moorize.load(ADAPTER) alone says what it is
    with pytest.raises(MoorizeError, match=r"is a moorize adapter, not a factored checkpoint: load it with "
                                           r"moorize.load\(FACTORED_BASE") as e:
        moorize.load(d)
    assert str(bases["keep"].absolute()) in _one_line(e)
    # saving again into the same directory replaces the adapter and keeps other files (a tokenizer)
    (d / "tokenizer.json").write_text("{}")
    _perturb(model, seed=7)
    model.save_pretrained(d)
    assert (d / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in d.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "config.json", "tokenizer.json"]
    assert torch.equal(_logits(moorize.load(bases["keep"], d), ids, tasks), _logits(model, ids, tasks))


@pytest.mark.parametrize("peft_installed", [True, False])
def test_transformers_from_pretrained_does_not_load_random_weights(bases, tmp_path, monkeypatch, peft_installed):
    if peft_installed:
        pytest.importorskip("peft")  # transformers then treats adapter_config.json as a PEFT adapter
    else:
        import transformers.integrations.peft as integration
        import transformers.models.auto.auto_factory as auto_factory

        monkeypatch.setattr(auto_factory, "is_peft_available", lambda: False)
        monkeypatch.setattr(integration, "is_peft_available", lambda: False)
    model = _trained(bases["keep"])
    d = tmp_path / "saved"
    model.save_pretrained(d)
    ids = _ids()
    ref = _logits(model, ids, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="moorize-adapter .*moorize.load"):
        transformers.AutoModelForCausalLM.from_pretrained(d)
    with pytest.raises(ValueError, match="moorize-adapter"):
        transformers.AutoModel.from_pretrained(d)
    with pytest.raises(ValueError, match="moorize-adapter"):
        transformers.AutoConfig.from_pretrained(d)
    # the concrete class does not read the model type: it must still fail, or give the same logits
    try:
        loaded = transformers.LlamaForCausalLM.from_pretrained(d)
    except (OSError, ValueError, KeyError):
        pass  # refused (today: no weights file in the directory); only a silent random model is wrong
    else:
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, ref, atol=1e-4)


def test_push_to_hub_uploads_the_adapter(bases, tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    model = _trained(bases["keep"])
    uploaded = {}

    class Api:
        def create_repo(self, repo_id, **kw):
            return type("Repo", (), {"repo_id": repo_id})()

    class Card:
        def save(self, path):
            Path(path).write_text("card")

    monkeypatch.setattr(hub, "hf_api", lambda: Api())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: Card())

    def upload(working_dir, repo_id, **kw):
        shutil.copytree(working_dir, tmp_path / "uploaded")
        uploaded["repo"] = repo_id

    model._upload_modified_files = upload
    model.push_to_hub("me/routed")
    assert uploaded["repo"] == "me/routed"
    up = tmp_path / "uploaded"
    assert sorted(p.name for p in up.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME, "config.json"]
    ids, tasks = _ids(), torch.tensor([1, 0])
    assert torch.equal(_logits(moorize.load(bases["keep"], up), ids, tasks), _logits(model, ids, tasks))


def test_save_pretrained_merge_task_writes_an_exact_dense_checkpoint(bases, tmp_path):
    model = _trained(bases["keep"], router="task")
    ids = _ids()
    dest = model.save_pretrained(tmp_path / "dense", merge_task="beta")
    assert not (dest / "moorize.json").exists() and not (dest / CONFIG_NAME).exists()
    dense = transformers.AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        assert (dense(ids).logits - _logits(model, ids, ["beta", "beta"])).abs().max().item() < 1e-5
    with pytest.raises(MoorizeError, match="not empty"):
        model.save_pretrained(tmp_path / "dense", merge_task="alpha")
    with pytest.raises(MoorizeError, match="unknown task 'gamma'"):
        model.save_pretrained(tmp_path / "dense2", merge_task="gamma")
    sampled = _trained(bases["keep"])
    with pytest.raises(MoorizeError, match="sample router"):
        sampled.save_pretrained(tmp_path / "dense3", merge_task="alpha")
    assert not (tmp_path / "dense2").exists() and not (tmp_path / "dense3").exists()


def test_save_pretrained_refusals_are_one_line_and_touch_nothing(bases, tmp_path):
    model = _trained(bases["keep"])
    before = {k: tree_digest(bases[k]) for k in ("keep", "src")}
    for d, what in ((bases["keep"], "is the factored checkpoint"), (bases["keep"] / "sub", "inside the factored"),
                    (bases["src"], "holds a model"), (bases["drop"], "holds a model")):
        with pytest.raises(MoorizeError, match=what) as e:
            model.save_pretrained(d)
        _one_line(e)
    assert {k: tree_digest(bases[k]) for k in ("keep", "src")} == before
    assert not (bases["keep"] / "sub").exists()
    for kw, what in ((dict(push_to_hub=True), "push_to_hub"), (dict(state_dict={}), "state_dict"),
                     (dict(variant="fp16"), "variant"), (dict(shiny=True), "shiny")):
        with pytest.raises(MoorizeError, match=what) as e:
            model.save_pretrained(tmp_path / "x", **kw)
        _one_line(e)
    assert not (tmp_path / "x").exists()
    model.save_pretrained(tmp_path / "y", is_main_process=False)  # another rank: writes nothing
    assert not (tmp_path / "y").exists()
    model.save_pretrained(tmp_path / "z", max_shard_size="5GB", safe_serialization=True)  # accepted, harmless
    assert (tmp_path / "z" / CONFIG_NAME).is_file()
    assert not [p for p in (tmp_path / "z").iterdir() if p.name.startswith(".")]  # no partial left behind
