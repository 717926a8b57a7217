"""Load against a real ``rag-serve`` process on 127.0.0.1: open loop (Poisson) and closed loop, in three
scheduling modes: batching off, request-level batching, and the decode engine.

    python -m benchmarks.serve_load --workload tiny --rates 5 10 20 40 80 --concurrency 1 4 16 --duration 8

Every point is bounded in time (``--duration``) and count (``--max-requests``). Reports throughput,
p50/p90/p99 latency, server queue time, questions decoding together, decoder rows per engine step and 429s,
and the knee: the highest offered rate whose p99 stays under 2x the idle latency (p50 of one request at a
time). ``--mixed`` gives each request its own parameters (beams, passages), which only the engine batches
together. Writes JSON, markdown and a PNG to ``benchmarks/results/serve-<workload>[-mixed].*``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx

from benchmarks.run import QUESTIONS, RESULTS, WORKLOADS, host, prepare, write_results
from rag_testing.serve_process import ServerProcess, metric

MODES = {"batching off": ["--scheduler", "request", "--max-batch-size", "1", "--max-wait-ms", "0"],
         "request-level": ["--scheduler", "request", "--max-batch-size", "8", "--max-wait-ms", "5"],
         "engine": ["--scheduler", "engine", "--max-batch-size", "8"]}
# --mixed: request i takes these parameters in turn (on top of the workload's answer length).
MIXED = [{"num_beams": 4, "n_docs": 5}, {"num_beams": 1, "n_docs": 5}, {"num_beams": 2, "n_docs": 3},
         {"num_beams": 4, "n_docs": 2}]


def _log(msg: str) -> None:
    print(f"[serve-load] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def _one(client: httpx.AsyncClient, i: int, questions: list[str], params: list[dict], out: list) -> None:
    """Request ``i``: question ``i`` and parameter set ``i`` (in turn)."""
    started = time.perf_counter()
    try:
        body = {"question": questions[i % len(questions)], **params[i % len(params)]}
        r = await client.post("/v1/generate", json=body)
        out.append({"status": r.status_code, "latency_ms": (time.perf_counter() - started) * 1000,
                    "queue_ms": float(r.headers.get("x-queue-time", "nan")),
                    "batch": float(r.headers.get("x-batch-size", "0"))})
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
            tasks.append(asyncio.create_task(_one(client, len(tasks), questions, params, out)))
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
                await _one(client, sent[0], questions, params, out)

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


# Engine counters read from /metrics around each point: steps, rows, and where the time goes.
ENGINE_METRICS = {"steps": "rag_decoder_rows_count", "rows": "rag_decoder_rows_sum",
                  "step_s": "rag_step_duration_seconds_sum", "encode_s": "rag_join_encode_duration_seconds_sum",
                  "rescore_s": "rag_rescore_duration_seconds_sum", "joins": "rag_engine_joins_total"}


def _engine_counters(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {k: metric(text, name) for k, name in ENGINE_METRICS.items()}


def _engine_point(before: dict, after: dict, elapsed: float) -> dict:
    d = {k: after[k] - before[k] for k in after}
    busy = d["step_s"] + d["encode_s"] + d["rescore_s"]
    return {"steps": int(d["steps"]), "rows_per_step": d["rows"] / d["steps"] if d["steps"] else 0.0,
            "step_ms": d["step_s"] * 1e3 / d["steps"] if d["steps"] else 0.0,
            "encode_share": d["encode_s"] / busy if busy else 0.0, "busy_share": busy / elapsed if elapsed else 0.0}


def _measure(server, mode: str, label: str, run) -> dict:
    engine = mode == "engine"
    before = _engine_counters(server.url) if engine else None
    out, elapsed = asyncio.run(run)
    point = _summary(out, elapsed)
    if engine:
        point["engine"] = _engine_point(before, _engine_counters(server.url), elapsed)
    _log(f"{mode}: {label} -> {point['throughput_rps']:.2f}/s p50 {point['p50_ms']:.0f} p99 {point['p99_ms']:.0f} ms "
         f"batch {point['mean_batch']:.2f} 429s {point['rejected_429']}"
         + (f" rows/step {point['engine']['rows_per_step']:.1f}" if engine else ""))
    return point


def run_mode(export: Path, mode: str, args, questions: list[str], params: list[dict]) -> dict:
    """Start a server in one scheduling mode and measure idle latency, open-loop rates and closed-loop levels."""
    with ServerProcess(export, *MODES[mode], "--max-queue", str(args.max_queue), threads=args.threads) as server:
        idle = _measure(server, mode, "idle", _closed_loop(server.url, 1, args.duration, args.idle_requests,
                                                         questions, params))
        report = {"idle": idle, "open_loop": [], "closed_loop": []}
        for rate in args.rates:
            run = _open_loop(server.url, rate, args.duration, args.max_requests, questions, params)
            report["open_loop"].append({"rate_rps": rate, **_measure(server, mode, f"open {rate}/s", run)})
        for c in args.concurrency:
            run = _closed_loop(server.url, c, args.duration, args.max_requests, questions, params)
            report["closed_loop"].append({"concurrency": c, **_measure(server, mode, f"closed x{c}", run)})
        limit = 2 * idle["p50_ms"]
        fine = [p["rate_rps"] for p in report["open_loop"]
                if p["p99_ms"] < limit and p["rejected_429"] == 0 and p["other_errors"] == 0]
        report["knee_rps"] = max(fine, default=None)
        report["knee_rule"] = f"highest offered rate with p99 < 2 x idle p50 ({limit:.1f} ms) and no rejections"
    return report


def direct_generate(export: Path, questions: list[str], params: list[dict], threads: int, count: int) -> dict:
    """``RagPipeline.generate`` of one question at a time in this process, no server: what idle latency over
    HTTP is compared with."""
    from rag_runtime import RagPipeline

    pipe = RagPipeline.load(export, threads=threads)
    for i in range(2):
        pipe.generate([questions[i]], **params[i % len(params)])
    lat = []
    for i in range(count):
        t0 = time.perf_counter()
        pipe.generate([questions[i % len(questions)]], **params[i % len(params)])
        lat.append((time.perf_counter() - t0) * 1000)
    return {"requests": count, "p50_ms": _pct(lat, 50), "p90_ms": _pct(lat, 90)}


def markdown(report: dict) -> str:
    h = report["host"]
    lines = [f"# rag-serve load: {report['workload']} workload{' (mixed parameters)' if report['mixed'] else ''}",
             "", f"`{report['command']}`", "",
             f"{h['cpus']} CPUs ({h['machine']}, {h['vector_isa']}, {h['cpu']}; 1-minute load {h['load_avg_1m']:.2f} "
             f"at the start), server `--threads {report['threads']}`, parameters in turn "
             f"`{json.dumps(report['params'])}`, {report['duration_s']} s per point. Direct `generate` in "
             f"process (no server, same threads): p50 {report['direct']['p50_ms']:.1f} ms.", ""]
    for mode, r in report["modes"].items():
        engine = mode == "engine"
        extra = " rows/step | step ms | encode share |" if engine else ""
        idle = r["idle"]["p50_ms"]
        lines += [f"## {mode}: idle p50 {idle:.1f} ms ({idle / report['direct']['p50_ms']:.2f}x direct), knee "
                  f"{r['knee_rps']} req/s", "",
                  "| offered req/s | done req/s | p50 ms | p90 ms | p99 ms | queue p50 ms | questions together | 429 "
                  "| errors |" + extra, "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if engine else "")]
        for p in r["open_loop"]:
            row = (f"| {p['rate_rps']} | {p['throughput_rps']:.2f} | {p['p50_ms']:.0f} | {p['p90_ms']:.0f} | "
                   f"{p['p99_ms']:.0f} | {p['queue_p50_ms']:.0f} | {p['mean_batch']:.2f} | {p['rejected_429']} | "
                   f"{p['other_errors']} |")
            if engine:
                e = p["engine"]
                row += f" {e['rows_per_step']:.1f} | {e['step_ms']:.1f} | {e['encode_share']:.0%} |"
            lines.append(row)
        lines += ["", "| clients (closed loop) | req/s | p50 ms | p99 ms | questions together |" + extra,
                  "|---|---|---|---|---|" + ("---|---|---|" if engine else "")]
        for p in r["closed_loop"]:
            row = (f"| {p['concurrency']} | {p['throughput_rps']:.2f} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} | "
                   f"{p['mean_batch']:.2f} |")
            if engine:
                e = p["engine"]
                row += f" {e['rows_per_step']:.1f} | {e['step_ms']:.1f} | {e['encode_share']:.0%} |"
            lines.append(row)
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
    p.add_argument("--mixed", action="store_true", help="requests take the MIXED parameter sets in turn")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    n = WORKLOADS[args.workload]["answer_tokens"]
    length = {"max_length": n, "min_length": n}
    params = [{**m, **length} for m in MIXED] if args.mixed else [{"num_beams": 4, "n_docs": 5, **length}]
    export = args.export or prepare(args.workload, "token", "bart")[1]
    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()]
    report = {"workload": args.workload, "mixed": args.mixed, "export": str(export), "params": params,
              "threads": args.threads, "duration_s": args.duration,
              "command": "python -m benchmarks.serve_load " + " ".join(argv if argv is not None else sys.argv[1:]),
              "host": host(), "modes": {}}
    report["direct"] = direct_generate(export, questions, params, args.threads, args.idle_requests)
    _log(f"direct generate (in process, threads {args.threads}): p50 {report['direct']['p50_ms']:.1f} ms")
    stem = args.out / f"serve-{args.workload}{'-mixed' if args.mixed else ''}"
    for mode in args.modes:  # results written after each mode: a long run interrupted keeps what it measured
        report["modes"][mode] = run_mode(export, mode, args, questions, params)
        write_results(stem, report, markdown(report))
    plot(report, stem.with_suffix(".png"))
    _log(f"wrote {stem}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
