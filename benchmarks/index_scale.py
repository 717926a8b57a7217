"""Knowledge-index scale run: synthetic passages with 768-d clustered embeddings, built with
``rag-index``'s builder for each index type, then measured.

    python -m benchmarks.index_scale --passages 1000000              # the committed 1M run
    python -m benchmarks.index_scale --passages 20000 --name smoke   # minutes, for a quick look

For each index type: build time and peak RSS (each build in its own subprocess, VmHWM), disk size,
queries/s at batch 1 and 64, and recall@5 against exact search (Flat). Embeddings are synthetic (a
mixture of Gaussians, like real dense-retrieval vectors clustered by topic) because no CPU embeds a
million passages with a DPR-base encoder in useful time; everything after the encoder is the real
build path. Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TYPES = ("flat", "hnsw", "ivfpq")
CLUSTERS = 1024
LATENT = 64


class SyntheticEncoder:
    """768-d vectors of low intrinsic dimension, like trained dense-retrieval embeddings: a 64-d latent
    (one of ``CLUSTERS`` topic centres plus spread) mapped linearly to 768-d, plus small isotropic noise.
    The latent is drawn from a stable hash of the passage text."""

    dim = 768
    identity = {"source": "synthetic low-rank mixture of Gaussians", "sha256": "synthetic", "dim": 768}

    def __init__(self):
        rng = np.random.default_rng(1234)
        self.centres = rng.standard_normal((CLUSTERS, LATENT), dtype=np.float32)
        self.mix = rng.standard_normal((LATENT, self.dim), dtype=np.float32) / np.sqrt(LATENT)

    def sample(self, seeds) -> np.ndarray:
        latents = np.empty((len(seeds), LATENT), dtype=np.float32)
        noise = np.empty((len(seeds), self.dim), dtype=np.float32)
        for i, s in enumerate(seeds):
            rng = np.random.default_rng(s)
            latents[i] = self.centres[s % CLUSTERS] + 0.7 * rng.standard_normal(LATENT, dtype=np.float32)
            noise[i] = 0.05 * rng.standard_normal(self.dim, dtype=np.float32)
        return latents @ self.mix + noise

    def embed(self, titles: list[str], texts: list[str]) -> np.ndarray:
        return self.sample([int.from_bytes(t.encode()[-8:].ljust(8, b"\0"), "little") for t in texts])


def queries(n: int) -> np.ndarray:
    return SyntheticEncoder().sample(range(10**12, 10**12 + n))


def write_passages(path: Path, n: int) -> None:
    if path.is_file() and path.with_suffix(".done").is_file():
        return
    words = ["river", "city", "empire", "music", "painter", "war", "treaty", "moon", "ocean", "island", "king",
             "novel", "theory", "planet", "battle", "language", "mountain", "science", "poem", "temple"]
    rng = np.random.default_rng(7)
    with open(path, "w") as f:
        for start in range(0, n, 100_000):
            m = min(n, start + 100_000) - start
            picks = rng.integers(0, len(words), (m, 24))
            for j in range(m):
                i = start + j
                text = " ".join(words[k] for k in picks[j]) + f" #{i:08d}"
                f.write(json.dumps({"id": f"s{i}", "title": f"Topic {i % 5000}", "text": text}) + "\n")
    path.with_suffix(".done").touch()


def _build_one(passages: str, out: str, index_type: str) -> None:
    """Subprocess body: build one index, print its timing and peak RSS as JSON."""
    from rag_runtime.knowledge import BuildOptions, build_index

    t0 = time.perf_counter()
    meta = build_index(passages, out, SyntheticEncoder(), BuildOptions(index_type=index_type, batch_size=1024),
                       force=True)
    seconds = time.perf_counter() - t0
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(line for line in status if line.startswith("VmHWM")).split()[1]
    print(json.dumps({"seconds": seconds, "peak_rss_mib": int(hwm) / 1024, "factory": meta.factory}))


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


SWEEP = {"flat": [{}], "hnsw": [{"ef_search": 128}, {"ef_search": 512}],
         "ivfpq": [{"nprobe": 32}, {"nprobe": 256}]}


def measure(index_dir: Path, qs: np.ndarray, exact: np.ndarray | None, params: dict) -> dict:
    from rag_runtime.knowledge import KnowledgeIndex

    index = KnowledgeIndex(index_dir, **params)
    index.search(qs[:64], 5)  # warm-up (page cache, threads)
    n1 = min(len(qs), 50)
    t0 = time.perf_counter()
    for q in qs[:n1]:
        index.search(q[None], 5)
    qps1 = n1 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    ids = np.concatenate([index.search(qs[i : i + 64], 5)[0] for i in range(0, len(qs), 64)])
    qps64 = len(qs) / (time.perf_counter() - t0)
    files = {name: size for name, size in index.meta.files.items()}
    recall = None if exact is None else float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, exact, strict=True)]))
    return {"qps_batch1": qps1, "qps_batch64": qps64, "recall_at_5": recall, "ids": ids, "files": files}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "index-scale")
    p.add_argument("--name", default=None, help="results file stem (default: index-<N>)")
    p.add_argument("--reuse", nargs="*", default=[], choices=TYPES,
                   help="index types whose earlier build (in --work) is measured again instead of rebuilt")
    p.add_argument("--build-one", nargs=3, metavar=("PASSAGES", "OUT", "TYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_one:
        _build_one(*args.build_one)
        return 0

    work = args.work / str(args.passages)
    work.mkdir(parents=True, exist_ok=True)
    source = work / "passages.jsonl"
    t0 = time.perf_counter()
    write_passages(source, args.passages)
    print(f"passages: {source} ({source.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t0:.0f}s)",
          file=sys.stderr)
    qs = queries(args.queries)
    rows, exact = [], None
    for kind in ["flat"] + [t for t in args.types if t != "flat"]:
        out = work / kind
        print(f"== {kind}", file=sys.stderr, flush=True)
        stats = work / f"{kind}.build.json"
        if kind not in args.reuse or not stats.is_file():
            proc = subprocess.run([sys.executable, "-m", "benchmarks.index_scale", "--build-one", str(source),
                                   str(out), kind], cwd=ROOT, capture_output=True, text=True, env={**os.environ})
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            stats.write_text(proc.stdout.strip().splitlines()[-1])
        build = json.loads(stats.read_text())
        for params in SWEEP[kind]:
            m = measure(out, qs, exact, params)
            if kind == "flat":
                exact = m["ids"]
                m["recall_at_5"] = 1.0
            row = {"type": kind, "factory": build["factory"], "search": params, "build_seconds": build["seconds"],
                   "build_peak_rss_mib": build["peak_rss_mib"], "disk_bytes": _du(out), "files": m["files"],
                   "qps_batch1": m["qps_batch1"], "qps_batch64": m["qps_batch64"], "recall_at_5": m["recall_at_5"]}
            print(json.dumps(row), file=sys.stderr, flush=True)
            if kind in args.types:
                rows.append(row)

    import faiss

    report = {"passages": args.passages, "dim": SyntheticEncoder.dim, "queries": args.queries,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "faiss": faiss.__version__, "faiss_gpus": faiss.get_num_gpus()},
              "command": "python -m benchmarks.index_scale " + " ".join(argv or sys.argv[1:]), "results": rows}
    name = args.name or f"index-{args.passages // 1000}k"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


def to_markdown(report: dict) -> str:
    lines = [f"# Knowledge index at {report['passages']:,} passages, dim {report['dim']}", "",
             f"`{report['command']}` on {report['machine']['cores']} CPU cores, faiss {report['machine']['faiss']} "
             f"({report['machine']['faiss_gpus']} GPUs). Synthetic clustered embeddings; {report['queries']} queries; "
             "recall@5 against exact (Flat) search; QPS counts the exact doc-score step too.", "",
             "| index | factory | search | build s | build peak RSS MiB | disk MiB | faiss file MiB | QPS batch 1 "
             "| QPS batch 64 | recall@5 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        faiss_mib = sum(v for k, v in r["files"].items() if k.endswith(".faiss")) / 2**20
        search = ", ".join(f"{k}={v}" for k, v in r["search"].items()) or "exact"
        lines.append(f"| {r['type']} | `{r['factory']}` | {search} | {r['build_seconds']:.0f} | {r['build_peak_rss_mib']:.0f} | "
                     f"{r['disk_bytes'] / 2**20:.0f} | {faiss_mib:.0f} | {r['qps_batch1']:.1f} | "
                     f"{r['qps_batch64']:.1f} | {r['recall_at_5']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
