"""README's walkthrough, run as a user would: every command in order, verbatim, on the shipped SmolLM2 and the
shipped data, with its output compared with the lines the README shows.

The commands run through bash in a fresh directory that holds the repository's ``examples/`` (so the README's
relative paths work), with this environment's ``moorize`` first on PATH. Numbers and ids in output lines are
compared as wildcards (times, losses and ids change between runs); the words and the order are compared exactly.
The answers are compared across the three ways of running the adapter: PyTorch (``generate``), ONNX Runtime
(``run``) and the server must agree. No third-party notice or warning may reach the user.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- walkthrough:begin -->", "<!-- walkthrough:end -->"
GAP = "…"
# what a user must never see from a walkthrough command: Python warnings, torch's C++-style notices, tracebacks
NOISE = re.compile(r"\w*Warning\b|^[WE]\d{4} \d\d:|torchvision|Traceback \(most recent call last\)|it/s\]")


def walkthrough_steps(readme: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for every `$ ` line of the console blocks between the markers."""
    section = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
    return steps


def normalised(line: str) -> str:
    """A line with ids, hashes and numbers as wildcards and runs of spaces as one."""
    line = re.sub(r"\b[0-9a-f]{8,}\b", "<id>", line)
    line = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", line)
    return " ".join(line.split())


def missing_lines(expected: list[str], output: str) -> list[str]:
    """The expected lines (gaps skipped) that do not appear, in order, among the output's lines."""
    got = [normalised(x) for x in output.splitlines()]
    at, missing = 0, []
    for want in (normalised(x) for x in expected if x.strip() != GAP):
        try:
            at = got.index(want, at) + 1
        except ValueError:
            missing.append(want)
    return missing


def test_the_walkthrough_parses_into_every_stage():
    """The section holds the stages the README promises, in pipeline order, each with output to compare."""
    steps = walkthrough_steps((ROOT / "README.md").read_text())
    firsts = [cmd.split()[1] if cmd.startswith("moorize") else cmd.split()[0] for cmd, _ in steps]
    assert firsts == ["convert", "inspect", "data", "train", "generate", "export", "run", "serve",
                      "curl"]
    assert all(any(x.strip() and x.strip() != GAP for x in out) for _, out in steps)


def test_missing_lines_compares_words_exactly_and_numbers_loosely():
    out = "a\nwrote adapter: 30 steps in 12.5 s\nb\n"
    assert missing_lines(["…", "wrote adapter: 31 steps in 1.0 s"], out) == []
    assert missing_lines(["wrote adapters: 30 steps"], out) == ["wrote adapters: # steps"]
    assert missing_lines(["b", "wrote adapter: 30 steps in 12.5 s"], out) != []  # order counts


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="120")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _wait_for(proc: subprocess.Popen, log: Path, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if re.search(pattern, text) or proc.poll() is not None:
            return text
        time.sleep(0.5)
    return log.read_text(errors="replace")


def test_readme_walkthrough_runs_verbatim(tmp_path):
    steps = walkthrough_steps((ROOT / "README.md").read_text())
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env, outputs, background = _env(), [], []
    try:
        for cmd, expected in steps:
            if cmd.endswith("&"):  # a server: started, read once it says where it listens, stopped at the end
                log = tmp_path / f"background-{len(background)}.log"
                proc = subprocess.Popen(["bash", "-c", "exec " + cmd[:-1]], cwd=tmp_path, env=env,
                                        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
                background.append(proc)
                out = _wait_for(proc, log, r"serving .* on http://", 300)
                assert proc.poll() is None, f"{cmd!r} exited {proc.returncode}:\n{out}"
            else:
                done = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=1500)
                out = done.stdout
                assert done.returncode == 0, f"{cmd!r} exited {done.returncode}:\n{out[-3000:]}"
            noise = [x for x in out.splitlines() if NOISE.search(x)]
            assert not noise, f"{cmd!r} showed the user noise: {noise[:5]}"
            assert not missing_lines(expected, out), \
                f"{cmd!r}: README lines not in the output: {missing_lines(expected, out)}\n--- output:\n{out[-3000:]}"
            outputs.append((cmd, out))
            with (tmp_path / "outputs.txt").open("a") as f:  # the real output, to refresh the README from
                f.write(f"$ {cmd}\n{out}\n")
    finally:
        for proc in background:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
    for proc in background:  # Ctrl-C is a clean stop
        assert proc.returncode == 0, proc.returncode

    answers = {}
    for cmd, out in outputs:
        name = cmd.split()[1] if cmd.startswith("moorize") else cmd.split()[0]
        rows = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        if name in ("generate", "run"):
            answers[name] = [r["output"] for r in rows]
        elif name == "curl":
            answers[name] = [c["text"] for r in rows for c in r["choices"]]
    # the same greedy answer from PyTorch, ONNX Runtime and the server
    assert answers["generate"] == answers["run"] == answers["curl"], answers


def test_readme_quickstart_runs_verbatim(tmp_path):
    """README's `moorize quickstart`: the four stages, the spectra plot, exactness, and an honest total time."""
    import re as _re

    readme = (ROOT / "README.md").read_text()
    assert "```bash\nmoorize quickstart\n```" in readme
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", "moorize quickstart"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1200)
    waited = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:]
    out = done.stdout
    for stage in ("[1/4] converting", "[2/4] singular-value spectra", "[3/4] greedy generation", "[4/4] routed MoORE"):
        assert stage in out, (stage, out[-2000:])
    assert "DIFFERENT" not in out and "greedy generation identical for every prompt and task" in out
    assert (tmp_path / "moorize-quickstart" / "smollm2-spectra.png").stat().st_size > 10_000
    said = float(_re.search(r"done in (\d+) s", out).group(1))
    assert 0.8 * waited - 15 <= said <= waited + 1, (said, waited)  # the whole run, not its last stage
    noise = [x for x in out.splitlines() if NOISE.search(x)]
    assert not noise, noise[:5]
