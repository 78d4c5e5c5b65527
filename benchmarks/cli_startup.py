"""How long the CLI takes to start, side by side with the interpreter and with importing torch.

    python benchmarks/cli_startup.py [--repeat 7] [--base REV]

Each command runs as a fresh process, round-robin (``_util.interleaved``), so the
machine's drift hits every row alike; the table reports medians and each row's ratio
to ``import torch``. ``--base REV`` adds the same commands from a git worktree of REV
(the CLI as it was), for before/after comparisons.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _util as U

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "v0_1" / "factored"


def commands(pythonpath: str | None) -> dict[str, list[str]]:
    py = [sys.executable, "-c"]
    cli = "import sys; from moorize.cli import main; sys.argv = ['moorize'] + sys.argv[1:]; main()"
    return {"moorize --help": py + [cli, "--help"],
            "moorize inspect FACTORED": py + [cli, "inspect", str(FIXTURE)],
            "moorize train --help": py + [cli, "train", "--help"]}


def run(cmd: list[str], env: dict | None) -> None:
    # from a neutral directory: with `python -c`, the working directory comes first on sys.path
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=tempfile.gettempdir())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--base", default=None, help="a git revision to compare with (its CLI from a worktree)")
    args = ap.parse_args()
    import os

    fns = {"python -c pass": lambda: run([sys.executable, "-c", "pass"], None),
           "python -c 'import torch'": lambda: run([sys.executable, "-c", "import torch"], None)}
    for name, cmd in commands(None).items():
        fns[name] = (lambda c: lambda: run(c, None))(cmd)
    tmp = None
    if args.base:
        tmp = Path(tempfile.mkdtemp()) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", str(tmp), args.base], check=True)
        (tmp / "moorize" / "exporters").symlink_to(tmp / "exporters")  # the package-dir mapping, by hand
        env = {**os.environ, "PYTHONPATH": str(tmp)}
        for name, cmd in commands(str(tmp)).items():
            fns[f"{name} @ {args.base}"] = (lambda c: lambda: run(c, env))(cmd)
    try:
        times = U.interleaved(fns, args.repeat, warmup=1)
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp)], check=False)
    torch_s = statistics.median(times["python -c 'import torch'"])
    rows = [(name, U.fmt_s(statistics.median(t)), f"{statistics.median(t) / torch_s:.2f}") for name, t in times.items()]
    print(U.table(["command (fresh process)", "median", "÷ import torch"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
