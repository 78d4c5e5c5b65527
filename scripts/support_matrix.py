"""Write docs/SUPPORT.md: every family the test suite builds (tests/families.py), run through every stage
(convert, load, one training step, export, export with the KV cache, ONNX Runtime against PyTorch) by
tests/support.py, with counts per stage and the reason of every refusal.

    python scripts/support_matrix.py                 # all families, two worker processes
    python scripts/support_matrix.py --only llama    # some families, printed, docs/SUPPORT.md untouched
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
DEST = REPO / "docs" / "SUPPORT.md"


def _one(name: str) -> tuple[str, dict, float]:
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from families import BY_NAME
    from support import run_family

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cells = run_family(BY_NAME[name], Path(tmp))
    return name, {k: (c.status, c.detail) for k, c in cells.items()}, time.perf_counter() - t0


def matrix(names: list[str], workers: int) -> dict[str, dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = {}
    with ProcessPoolExecutor(workers) as pool:
        for name, cells, seconds in pool.map(_one, names):
            out[name] = cells
            marks = " ".join(f"{k}={v[0]}" for k, v in cells.items())
            print(f"{name:24s} {seconds:6.1f} s  {marks}", flush=True)
    return out


def render(results: dict[str, dict]) -> str:
    from families import BY_NAME
    from support import STAGES, Cell

    kinds = {"seq2seq": "encoder-decoder", "pixels": "vision"}
    lines = ["# Support matrix", "",
             "Made by `python scripts/support_matrix.py`: every family the test suite builds (`tests/families.py`, "
             "tiny random models from transformers' own config classes) through every stage "
             "(`tests/support.py`); `tests/test_support.py` holds each family to its row. ✓: works and its check "
             "holds (convert and load exact within 1e-5 / 1e-4, a training step gives the MoORE parameters a "
             "finite gradient, an export validates against PyTorch for every task, ONNX Runtime's greedy tokens "
             "equal PyTorch's); refused: moorize says why in one line, at the start of the command; n/a: the "
             "stage does not apply; —: not reached.", "",
             "| family | kind | " + " | ".join(STAGES) + " |", "|" + " --- |" * (len(STAGES) + 2)]
    counts = {s: 0 for s in STAGES}
    applicable = {s: 0 for s in STAGES}
    reasons = []
    for name, cells in results.items():
        fam = BY_NAME[name]
        if fam.moe:
            kind = "sparse MoE " + ("encoder-decoder" if fam.inputs == "seq2seq" else "decoder")
        elif fam.inputs != "ids":
            kind = kinds[fam.inputs]
        else:
            kind = "decoder" if cells["with_past"][0] != "n/a" else "encoder"
        marks = []
        for s in STAGES:
            status, detail = cells[s]
            marks.append(Cell(status).mark())
            if status != "n/a":
                applicable[s] += 1
            if status == "ok":
                counts[s] += 1
            if status in ("refused", "error"):
                reasons.append(f"- **{name}**, {s}: {status}: {detail}")
        lines.append(f"| {name} | {kind} | " + " | ".join(marks) + " |")
    lines += ["", "| stage | " + " | ".join(STAGES) + " |", "|" + " --- |" * (len(STAGES) + 1),
              "| works (of the families it applies to) | "
              + " | ".join(f"{counts[s]} / {applicable[s]}" for s in STAGES) + " |", ""]
    if reasons:
        lines += ["## Why a stage is refused", "", *reasons, ""]
    return "\n".join(lines)


def main() -> int:
    from families import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="these families only (printed; the file is not written)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    names = args.only or [f.name for f in FAMILIES]
    results = matrix(names, args.workers)
    if args.only:
        print(render(results))
        return 0
    DEST.write_text(render(results))
    print(f"wrote {DEST.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
