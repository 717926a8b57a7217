"""Load against a real ``rag-serve`` process on 127.0.0.1: open loop (Poisson) and closed loop, batching on/off.

    python -m benchmarks.serve_load --workload tiny --rates 5 10 20 40 80 --concurrency 1 4 16 --duration 8

Every point is bounded in time (``--duration``) and count (``--max-requests``). Reports throughput,
p50/p90/p99 latency, server queue time, batch sizes and 429s, and the knee: the highest offered rate whose
p99 stays under 2x the idle latency (p50 of one request at a time). Writes JSON, markdown and a PNG to
``benchmarks/results/serve-<workload>.*``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import httpx

from benchmarks.run import QUESTIONS, RESULTS, WORKLOADS, prepare, write_results
from benchmarks.serve_process import ServerProcess

MODES = {"batching on": ["--max-batch-size", "8", "--max-wait-ms", "5"],
         "batching off": ["--max-batch-size", "1", "--max-wait-ms", "0"]}


def _log(msg: str) -> None:
    print(f"[serve-load] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def _one(client: httpx.AsyncClient, question: str, params: dict, out: list) -> None:
    started = time.perf_counter()
    try:
        r = await client.post("/v1/generate", json={"question": question, **params})
        out.append({"status": r.status_code, "latency_ms": (time.perf_counter() - started) * 1000,
                    "queue_ms": float(r.headers.get("x-queue-time", "nan")),
                    "batch": int(r.headers.get("x-batch-size", "0"))})
    except httpx.HTTPError as e:
        out.append({"status": type(e).__name__, "latency_ms": (time.perf_counter() - started) * 1000})


async def _open_loop(url: str, rate: float, duration: float, max_requests: int, questions, params) -> tuple:
    """Poisson arrivals at ``rate``/s for ``duration`` s; every request is awaited (or times out) at the end."""
    out, tasks, rng = [], [], random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=512)) as client:
        start = time.perf_counter()
        next_at = start
        while len(tasks) < max_requests:
            next_at += rng.expovariate(rate)
            if next_at - start > duration:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(client, questions[len(tasks) % len(questions)], params, out)))
        await asyncio.gather(*tasks)
        return out, time.perf_counter() - start


async def _closed_loop(url: str, concurrency: int, duration: float, max_requests: int, questions, params) -> tuple:
    """``concurrency`` clients, each sending its next request when the last one is answered."""
    out, sent = [], [0]
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        start = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() - start < duration and sent[0] < max_requests:
                sent[0] += 1
                await _one(client, questions[sent[0] % len(questions)], params, out)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out, time.perf_counter() - start


def _summary(out: list, elapsed: float) -> dict:
    ok = [o for o in out if o["status"] == 200]
    lat = [o["latency_ms"] for o in ok]
    return {"sent": len(out), "ok": len(ok), "rejected_429": sum(o["status"] == 429 for o in out),
            "other_errors": sum(o["status"] not in (200, 429) for o in out),
            "throughput_rps": len(ok) / elapsed if elapsed else 0.0,
            "p50_ms": _pct(lat, 50), "p90_ms": _pct(lat, 90), "p99_ms": _pct(lat, 99),
            "queue_p50_ms": _pct([o["queue_ms"] for o in ok], 50),
            "mean_batch": sum(o["batch"] for o in ok) / len(ok) if ok else 0.0,
            "max_batch": max((o["batch"] for o in ok), default=0)}


def run_mode(export: Path, mode: str, args, questions: list[str], params: dict) -> dict:
    """Start a server in one batching mode and measure idle latency, open-loop rates and closed-loop levels."""
    with ServerProcess(export, *MODES[mode], "--max-queue", str(args.max_queue), threads=args.threads) as server:
        idle_out, idle_s = asyncio.run(_closed_loop(server.url, 1, args.duration, args.idle_requests, questions,
                                                    params))
        idle = _summary(idle_out, idle_s)
        _log(f"{mode}: idle p50 {idle['p50_ms']:.1f} ms")
        report = {"idle": idle, "open_loop": [], "closed_loop": []}
        for rate in args.rates:
            out, elapsed = asyncio.run(_open_loop(server.url, rate, args.duration, args.max_requests, questions,
                                                  params))
            s = {"rate_rps": rate, **_summary(out, elapsed)}
            report["open_loop"].append(s)
            _log(f"{mode}: open {rate}/s -> {s['throughput_rps']:.1f}/s p99 {s['p99_ms']:.0f} ms "
                 f"batch {s['mean_batch']:.1f} 429s {s['rejected_429']}")
        for c in args.concurrency:
            out, elapsed = asyncio.run(_closed_loop(server.url, c, args.duration, args.max_requests, questions,
                                                    params))
            s = {"concurrency": c, **_summary(out, elapsed)}
            report["closed_loop"].append(s)
            _log(f"{mode}: closed x{c} -> {s['throughput_rps']:.1f}/s p99 {s['p99_ms']:.0f} ms")
        limit = 2 * idle["p50_ms"]
        fine = [p["rate_rps"] for p in report["open_loop"]
                if p["p99_ms"] < limit and p["rejected_429"] == 0 and p["other_errors"] == 0]
        report["knee_rps"] = max(fine, default=None)
        report["knee_rule"] = f"highest offered rate with p99 < 2 x idle p50 ({limit:.1f} ms) and no rejections"
    return report


def markdown(report: dict) -> str:
    lines = [f"# rag-serve load: {report['workload']} workload", "",
             f"`{report['command']}`", "",
             f"{report['host']['cpus']} CPUs ({report['host']['machine']}), server `--threads {report['threads']}`, "
             f"params `{json.dumps(report['params'])}`, {report['duration_s']} s per point.", ""]
    for mode, r in report["modes"].items():
        lines += [f"## {mode}: idle p50 {r['idle']['p50_ms']:.1f} ms, knee {r['knee_rps']} req/s", "",
                  "| offered req/s | done req/s | p50 ms | p90 ms | p99 ms | queue p50 ms | mean batch | 429 | errors |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {p['rate_rps']} | {p['throughput_rps']:.1f} | {p['p50_ms']:.0f} | {p['p90_ms']:.0f} | "
                  f"{p['p99_ms']:.0f} | {p['queue_p50_ms']:.0f} | {p['mean_batch']:.2f} | {p['rejected_429']} | "
                  f"{p['other_errors']} |" for p in r["open_loop"]]
        lines += ["", "| clients (closed loop) | req/s | p50 ms | p99 ms | mean batch |", "|---|---|---|---|---|"]
        lines += [f"| {p['concurrency']} | {p['throughput_rps']:.1f} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} | "
                  f"{p['mean_batch']:.2f} |" for p in r["closed_loop"]]
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, r in report["modes"].items():
        rates = [p["rate_rps"] for p in r["open_loop"]]
        ax1.plot(rates, [p["p99_ms"] for p in r["open_loop"]], marker="o", label=f"{mode} p99")
        ax1.axhline(2 * r["idle"]["p50_ms"], linestyle=":", linewidth=1)
        ax2.plot(rates, [p["throughput_rps"] for p in r["open_loop"]], marker="o", label=mode)
    ax1.set(xlabel="offered req/s (Poisson)", ylabel="p99 latency ms", yscale="log", title="p99 (dotted: 2x idle)")
    ax2.set(xlabel="offered req/s (Poisson)", ylabel="answered req/s", title="throughput")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    p.add_argument("--export", type=Path, default=None, help="an existing export (default: build the workload's)")
    p.add_argument("--rates", type=float, nargs="+", default=[5, 10, 20, 40, 80])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per point")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per point at most")
    p.add_argument("--idle-requests", type=int, default=30)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="server onnxruntime threads")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    n = WORKLOADS[args.workload]["answer_tokens"]
    params = {"num_beams": 4, "max_length": n, "min_length": n, "n_docs": 5}
    export = args.export or prepare(args.workload, "token", "bart")[1]
    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()]
    report = {"workload": args.workload, "export": str(export), "params": params, "threads": args.threads,
              "duration_s": args.duration, "command": "python -m benchmarks.serve_load " + " ".join(argv or sys.argv[1:]),
              "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
              "modes": {mode: run_mode(export, mode, args, questions, params) for mode in args.modes}}
    stem = write_results(args.out / f"serve-{args.workload}", report, markdown(report))
    plot(report, stem.with_suffix(".png"))
    _log(f"wrote {stem}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
