"""Small helpers shared by the benchmark scripts: timing, a child's peak memory,
machine description and Markdown tables.

Only the standard library is imported at module level (psutil and torch lazily), so
this file doubles as the tiny launcher that measures a child process's memory:

    python benchmarks/_util.py measure-rss RESULT.json STDOUT STDERR -- CMD ...

Why a launcher: on Linux, exec() copies the RSS high-water mark of the *old* address
space into the new process's ``ru_maxrss``, and Python's subprocess spawns with vfork,
whose old address space is the parent's. A child started directly from a benchmark
that holds gigabytes would therefore report at least the benchmark's own peak. The
launcher is a fresh, small interpreter, so ``ru_maxrss`` of the process it starts
(read with ``os.wait4``) is that process's own peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

# ---- timing ------------------------------------------------------------------------------------


def best_of(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """(fastest wall-clock seconds, that run's result) over ``repeat`` calls of ``fn``."""
    best_t, best_r = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        r = fn()
        dt = time.perf_counter() - t0
        if dt < best_t:
            best_t, best_r = dt, r
    return best_t, best_r


def interleaved(fns: dict, repeat: int, warmup: int) -> dict[str, list[float]]:
    """Wall-clock seconds of ``repeat`` calls of each function, called round-robin after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


# ---- formatting --------------------------------------------------------------------------------


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 100:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s"


def fmt_bytes(n: float | None) -> str:
    """Decimal units (1 GB = 10^9 bytes), as ``moorize --max-shard-size`` reads them."""
    if n is None:
        return "–"
    for unit, mult in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= mult:
            return f"{n / mult:.2f} {unit}"
    return f"{int(n)} B"


def fmt_x(ratio: float | None) -> str:
    """A speed-up or size ratio: 2.31x."""
    if ratio is None or ratio != ratio:
        return "–"
    return f"{ratio:.2f}x"


def fmt_pct(frac: float | None) -> str:
    return "–" if frac is None else f"{100 * frac:.1f} %"


def fmt_err(x: float | None) -> str:
    return "–" if x is None else f"{x:.2e}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-Markdown table, padded so it also reads well as plain text.

    ``align`` has one letter per column, ``l`` or ``r``; default: first column left, rest right.
    """
    align = align or ("l" + "r" * (len(headers) - 1))
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    widths = [max(w, 3) for w in widths]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(r, widths, align)) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def heading(text: str, level: int = 2) -> None:
    print(f"\n{'#' * level} {text}\n", flush=True)


def note(text: str) -> None:
    print(text, flush=True)


# ---- files -------------------------------------------------------------------------------------


def dir_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def rmtree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---- machine -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_rows() -> list[tuple[str, str]]:
    """(item, value) rows describing the machine and the numeric libraries."""
    import numpy as np
    import torch

    rows: list[tuple[str, str]] = [("CPU", _cpu_model())]
    logical = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = logical
    physical = None
    mem = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem = psutil.virtual_memory().total
    except ImportError:
        pass
    rows.append(("cores", f"{usable} usable, {logical} logical" + (f", {physical} physical" if physical else "")))
    if mem:
        rows.append(("memory", fmt_bytes(mem)))
    rows.append(("OS", f"{platform.system()} {platform.release()}"))
    rows.append(("Python", platform.python_version()))
    rows.append(("torch", f"{torch.__version__}, {torch.get_num_threads()} intra-op threads"
                 + (", MKL" if torch.backends.mkl.is_available() else "")))
    if torch.cuda.is_available():
        rows.append(("GPU", f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"))
    blas = "?"
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]
    except Exception:
        pass
    threads = ""
    try:
        from threadpoolctl import threadpool_info

        n = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
        if n:
            threads = f", {max(n)} BLAS threads"
    except Exception:
        pass
    rows.append(("numpy", f"{np.__version__} ({blas}{threads})"))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if os.environ.get(var):
            rows.append((var, os.environ[var]))
    try:
        load = os.getloadavg()
        rows.append(("load average", f"{load[0]:.2f} (1 min) when started"))
    except OSError:
        pass
    return rows


# ---- peak memory of a child process ------------------------------------------------------------


@dataclass
class ChildRun:
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    peak_rss: int | None  # ru_maxrss from wait4 (the kernel's exact high-water mark), bytes
    vm_hwm: int | None  # last VmHWM read from /proc/PID/status while it ran, bytes
    polled_rss: int | None  # max over polls of the RSS of the process and its children, bytes
    polls: int


def _read_vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _measure_main(argv: list[str]) -> int:
    """The launcher: run CMD, poll its memory, reap it with wait4, write RESULT.json."""
    result_path, out_path, err_path, sep, *cmd = argv
    assert sep == "--" and cmd, "usage: measure-rss RESULT.json STDOUT STDERR -- CMD ..."
    poll_s = float(os.environ.get("BENCH_POLL_S", "0.05"))
    try:
        import psutil
    except ImportError:
        psutil = None
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        ps = psutil.Process(proc.pid) if psutil else None
        polled = hwm = None
        polls = 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            polls += 1
            h = _read_vm_hwm(proc.pid)
            if h is not None:
                hwm = max(hwm or 0, h)
            if ps is not None:
                try:
                    rss = ps.memory_info().rss
                    for c in ps.children(recursive=True):
                        try:
                            rss += c.memory_info().rss
                        except psutil.Error:
                            pass
                    polled = max(polled or 0, rss)
                except psutil.Error:
                    pass
            time.sleep(poll_s)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    maxrss = ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux, bytes on macOS
    Path(result_path).write_text(json.dumps({
        "returncode": proc.returncode, "seconds": seconds, "peak_rss": maxrss, "vm_hwm": hwm,
        "polled_rss": polled, "polls": polls}))
    return 0


def measure_child(cmd: Sequence[str], workdir: str | os.PathLike, env: dict | None = None) -> ChildRun:
    """Run ``cmd`` through the launcher; its output and peak memory come back as a ChildRun."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    res, out, err = work / "measure.json", work / "child.stdout", work / "child.stderr"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "measure-rss", str(res), str(out), str(err),
                    "--", *map(str, cmd)], check=True, env=env)
    d = json.loads(res.read_text())
    run = ChildRun(d["returncode"], d["seconds"], out.read_text(errors="replace"), err.read_text(errors="replace"),
                   d["peak_rss"], d["vm_hwm"], d["polled_rss"], d["polls"])
    for p in (res, out, err):
        p.unlink(missing_ok=True)
    return run


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "measure-rss":
        sys.exit(_measure_main(sys.argv[2:]))
    sys.exit(__doc__)


def git_rev() -> str:
    """Short commit of the repository, marked when the working tree has uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def benchmark_parser(doc: str, quick_help: str, threads: int | None = 2) -> argparse.ArgumentParser:
    """The options every run_benchmark script takes: --quick, --out-dir, --keep and (unless
    ``threads`` is None) --threads; a script adds its own after."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out-dir", type=Path, default=None, help="where to put generated data (default: temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads, help=f"torch.set_num_threads (default {threads})")
    return ap


def require_choices(ap: argparse.ArgumentParser, flag: str, names: list[str], known, noun: str) -> list[str]:
    """``names`` when each is one of ``known`` (moorize's selector rule: every name given picks something),
    else the parser's usage error naming the first unknown one, the choices and a close match."""
    from moorize.errors import MoorizeError
    from moorize.selectors import require_matches

    try:
        require_matches(flag, names, known, noun=noun)
    except MoorizeError as e:
        ap.error(str(e))
    return names


def run_benchmark(title: str, prefix: str, args, parts: Sequence[Callable[[Path], Any]], footer: str = "") -> int:
    """The frame every benchmark shares: a fresh work dir under --out-dir, a header naming the
    commit and the machine, the parts in order (a part returning False marks a failure), and
    the work dir removed at the end unless --keep. Returns the exit code."""
    import datetime as dt
    import tempfile

    import moorize

    base = Path(args.out_dir) if args.out_dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    print(f"# {title}{' (--quick)' if args.quick else ''}\n")
    print(f"moorize {moorize.__version__} at {git_rev()}, {now}; data in {work}\n")
    print(table(["Machine", ""], machine_rows(), align="ll"), flush=True)
    ok = True
    t0 = time.perf_counter()
    try:
        for part in parts:
            ok &= part(work) is not False
    finally:
        if args.keep:
            print(f"\nGenerated data kept in {work}")
        else:
            rmtree(work)
    print(f"\nBenchmark finished in {fmt_s(time.perf_counter() - t0)}.{footer}")
    return 0 if ok else 1


def quiet_torch(threads: int) -> None:
    """Benchmarks print tables, not progress bars or transformers' advice; torch uses ``threads`` threads."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)


def randomize_routers(model, seed: int = 0) -> None:
    """The tests' stand-in for a trained adapter (tests/helpers.py): benchmarks route exactly as tests do."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from helpers import randomize_routers as randomize

    randomize(model, seed)
