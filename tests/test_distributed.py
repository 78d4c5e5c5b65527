"""`torchrun -m moorize convert` splits layers across ranks (gloo, 2 CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moorize import FactoredCheckpoint
from moorize.conversion.pipeline import WorkItem, _assign_ranks


@pytest.mark.slow  # two torchrun ranks and a single-process run
def test_two_ranks_match_single_process(tiny_model_dir, tmp_path):
    _, src = tiny_model_dir("llama")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "moorize", "convert", str(src), str(tmp_path / "dist"), "--no-progress", "--max-shard-size", "40KB"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "moorize", "convert", str(src), str(tmp_path / "single"),
                             "--no-progress"], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]

    manifest = json.loads((tmp_path / "dist" / "moorize.json").read_text())
    assert manifest["summary"]["world_size"] == 2
    shards = sorted(p.name for p in (tmp_path / "dist").glob("model-*.safetensors"))
    assert len(shards) >= 2 and shards[-1].endswith(f"of-{len(shards):05d}.safetensors")
    assert not list(tmp_path.glob(".*moorize-partial"))

    with FactoredCheckpoint(tmp_path / "dist") as a, FactoredCheckpoint(tmp_path / "single") as b:
        assert sorted(a.tensor_names()) == sorted(b.tensor_names())
        assert list(a.layers) == list(b.layers)
        for key in a.tensor_names():
            assert torch.equal(a.tensor(key), b.tensor(key)), key


LEFT_THREADS = """
import os, sys
import moorize
moorize.convert(sys.argv[1], sys.argv[2], max_shard_size="40KB")
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
left = [n for n in names if "gloo" in n]
sys.exit(f"rank {os.environ['RANK']}: threads of the process group still running: {left}" if left else 0)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process's threads from /proc")
def test_no_process_group_thread_outlives_the_conversion(tiny_model_dir, tmp_path):
    """A process group left alive after convert (transformers held references to it when the meta model was built
    under it) kept gloo's threads running into interpreter exit, where they sometimes aborted a rank (SIGABRT)
    after the output was complete."""
    _, src = tiny_model_dir("llama")
    script = tmp_path / "left_threads.py"
    script.write_text(LEFT_THREADS)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(src), str(tmp_path / "out")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "moorize.json").is_file()


def test_rank_assignment_balances_and_covers_everything():
    items = [WorkItem(i, cost=float(c)) for i, c in enumerate([9, 7, 5, 3, 3, 1, 1, 1])]
    parts = _assign_ranks(items, 3)
    assert sorted(it.index for p in parts for it in p) == list(range(8))
    loads = [sum(it.cost for it in p) for p in parts]
    assert max(loads) - min(loads) <= 3
    assert all(p == sorted(p, key=lambda it: it.index) for p in parts)


def test_a_command_ending_with_its_process_group_up_destroys_it_and_skips_finalization(tmp_path, monkeypatch):
    """moorize train under torchrun ends with accelerate's group up: the CLI destroys it and leaves with os._exit
    (the exit code kept), so gloo's threads are not torn down in interpreter finalization."""
    import torch.distributed as dist

    from moorize.cli import app

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    exits = []
    monkeypatch.setattr(app.os, "_exit", lambda code: exits.append((code, dist.is_initialized())))
    try:
        app._leave_process_group(3)
    finally:
        if dist.is_initialized():  # not left behind for the worker's next tests
            dist.destroy_process_group()
    assert exits == [(3, False)]  # destroyed first, then left with its code
    app._leave_process_group(0)  # no group: the normal exit, nothing skipped
    assert exits == [(3, False)]
