"""Files written by an earlier moorize keep working (tests/fixtures/v0_1, made by make_v0_1.py at 0.1).

A factored checkpoint, an adapter and an ONNX export written before the package was
reorganised load with today's code and give the outputs they gave then.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import moorize
from moorize.cli import cli

V0_1 = Path(__file__).resolve().parent / "fixtures" / "v0_1"
EXPECTED = json.loads((V0_1 / "expected.json").read_text())


@pytest.fixture
def fixtures(tmp_path):
    """A copy, so that nothing a test does can touch the files in the repository."""
    shutil.copytree(V0_1, tmp_path / "v0_1")
    return tmp_path / "v0_1"


def test_factored_checkpoint_and_adapter_give_the_same_logits(fixtures):
    with moorize.FactoredCheckpoint(fixtures / "factored") as ckpt:
        assert len(ckpt.layers) == 14 and all(r.rank == 8 and r.residual for r in ckpt.layers.values())
    model = moorize.load(fixtures / "factored", fixtures / "adapter")
    ids = torch.tensor(EXPECTED["ids"])
    with torch.no_grad():
        for task, want in EXPECTED["logits"].items():
            got = model(ids, task_ids=[task]).logits[0]
            torch.testing.assert_close(got, torch.tensor(want), atol=2e-5, rtol=1e-5)


def test_inspect_reads_the_old_manifest(fixtures):
    res = CliRunner().invoke(cli, ["inspect", str(fixtures / "factored"), "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["layers"]) == 14


def test_onnx_export_generates_the_same_tokens(fixtures):
    from moorize.runtime import MoOREOrtModel

    model = MoOREOrtModel.from_export(fixtures / "onnx")
    ids = np.array(EXPECTED["ids"], dtype=np.int64)
    for task, want in EXPECTED["greedy"].items():
        assert model.generate_ids(ids, task=task, max_new_tokens=6)[0].tolist() == want


def test_old_adapter_reexports_to_the_same_tokens(fixtures, tmp_path):
    """The old adapter (no layout fields) still passes the base check wherever adapters are read."""
    from moorize.exporters.onnx import export_onnx
    from moorize.runtime import MoOREOrtModel

    export_onnx(fixtures / "factored", tmp_path / "re-export", fixtures / "adapter", with_past=True)
    model = MoOREOrtModel.from_export(tmp_path / "re-export")
    ids = np.array(EXPECTED["ids"], dtype=np.int64)
    for task, want in EXPECTED["greedy"].items():
        assert model.generate_ids(ids, task=task, max_new_tokens=6)[0].tolist() == want


def test_every_backend_records_format_and_version(fixtures, tmp_path):
    """ONNX and .pt2 exports carry the same common metadata (exporters/metadata.py), format version included."""
    from moorize.exporters.onnx import export_onnx
    from moorize.exporters.torchscript import export_pt2

    export_onnx(fixtures / "factored", tmp_path / "onnx", fixtures / "adapter", validate_export=False)
    onnx_meta = json.loads((tmp_path / "onnx" / "moorize_export.json").read_text())
    export_pt2(fixtures / "factored", tmp_path / "m.pt2", fixtures / "adapter", validate_export=False)
    extra = {"moorize_export.json": ""}
    torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra)
    pt2_meta = json.loads(extra["moorize_export.json"])
    common = ("format", "format_version", "moorize_version", "kind", "model_type", "tasks", "labels", "inputs",
              "outputs", "with_past")
    assert {k: onnx_meta[k] for k in common} == {k: pt2_meta[k] for k in common}
    assert (onnx_meta["format"], onnx_meta["format_version"]) == ("moorize.export", 1)
    assert (onnx_meta["backend"], pt2_meta["backend"]) == ("onnx", "pt2")
