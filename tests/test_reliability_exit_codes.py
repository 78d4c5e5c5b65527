"""Exit codes mean one thing each (class 9): 2 a user error, 3 a full disk, 130 an interrupt, 141 a reader
that closed the pipe, and 1 only for a real bug.

Numeric options that used to reach the library as NaN, infinity or out of range and end
in "internal error" (exit 1) are refused with one line and exit 2; click's own usage
errors are one line too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from test_cli_errors import _DROP_ENV, assert_no_output, assert_one_line_error, run_cli

import moorize
from moorize.cli import BROKEN_PIPE_EXIT, cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import build_tiny

    root = tmp_path_factory.mktemp("rel-exit")
    src = root / "src"
    build_tiny("llama").save_pretrained(src)
    out = root / "factored"
    moorize.convert(src, out)
    return {"src": src, "factored": out, "root": root}


def test_a_closed_pipe_is_not_a_bug(tiny):
    """`moorize inspect ... | head`: the reader is gone before moorize writes; exit 141, nothing on stderr."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "moorize", "inspect", str(tiny["factored"]), "--layers"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader goes away before moorize has even imported click
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == BROKEN_PIPE_EXIT == 141, err
    assert err == "", err


def test_a_closed_pipe_in_a_shell_pipeline(tiny):
    script = (f"{sys.executable} -m moorize inspect {tiny['factored']} --json | head -c 10 >/dev/null; "
              "echo ${PIPESTATUS[0]}")
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() in ("0", "141"), res  # 0 when the output fit in the pipe before head left
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.parametrize("args,phrases", [
    (["--oversample", "-1"], ("oversample",)),
    (["--power-iters", "-2"], ("power-iters",)),
    (["--seed", "-5", "--rank", "4", "--solver", "randomized"], ("seed",)),
    (["--rank", "energy:nan"], ("energy:nan",)),
    (["--rank", "ratio:inf"], ("ratio:inf",)),
    (["--max-shard-size", "nanGB"], ("nanGB",)),
    (["--max-shard-size", "infGB"], ("infGB",)),
    (["--max-shard-size", "-1MB"], ("-1MB",)),
    (["--batch-size", "0"], ("0",)),
    (["--bogus-flag"], ("--bogus-flag",)),
    (["--residual", "maybe"], ("maybe",)),
])
def test_bad_convert_options_exit_2_in_one_line(tiny, tmp_path, args, phrases):
    out = tmp_path / "out"
    res = run_cli("convert", tiny["src"], out, "--no-progress", *args)
    assert_one_line_error(res.returncode, res.stdout, res.stderr, *phrases)
    assert_no_output(out)


def test_usage_errors_of_every_command_are_one_line(tiny, tmp_path):
    for args in (["inspect"], ["merge", str(tiny["factored"])], ["train", str(tiny["factored"])],
                 ["convert", str(tiny["src"]), str(tmp_path / "o"), "--dtype", "int3"],
                 ["nosuchcommand"]):
        res = CliRunner().invoke(cli, args)
        assert_one_line_error(res.exit_code, res.stdout, res.stderr)


def test_a_real_bug_exits_1_and_debug_shows_the_traceback(tiny, monkeypatch):
    import moorize.conversion.report as report

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(report, "format_table", broken)
    res = CliRunner().invoke(cli, ["inspect", str(tiny["factored"])])
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, "internal error ZeroDivisionError", want_code=1)
    res = CliRunner().invoke(cli, ["--debug", "inspect", str(tiny["factored"])])
    assert res.exit_code == 1 and isinstance(res.exception, ZeroDivisionError)


def test_a_broken_invariant_is_a_bug_not_a_user_error(tiny, monkeypatch):
    """MoorizeBug (an internal invariant) exits 1 asking for a report; it is never printed as the user's error."""
    import moorize.conversion.report as report
    from moorize.errors import MoorizeBug, MoorizeError

    assert not issubclass(MoorizeBug, MoorizeError)

    def broken(*a, **k):
        raise MoorizeBug("shard header exceeds its reserved room")

    monkeypatch.setattr(report, "format_table", broken)
    res = CliRunner().invoke(cli, ["inspect", str(tiny["factored"])])
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, "internal error MoorizeBug",
                          "a bug in moorize: please report it", want_code=1)
