"""Generation on a device: rag_runtime fp32/fp16 against transformers fp32/fp16 (eager and SDPA attention).

    python -m benchmarks.device --workload large --device cuda --batch 1 8       # the GPU measurement
    python -m benchmarks.device --workload tiny --questions 4 --min-batches 2   # CPU smoke
    python -m benchmarks.device --workload tiny --sides runtime:cuda:fp32 runtime:cpu:fp32 \\
        transformers:cpu:fp32:eager transformers:cuda:fp32:eager --require-identical     # parity across devices

A side is ``KIND:DEVICE:PRECISION[:FLAG...]``: KIND ``runtime`` (an export of that precision, loaded with
``RagPipeline.load``) or ``transformers`` (``RagTokenForGeneration`` in that dtype), FLAG ``eager`` or
``sdpa`` (a transformers side's attention, set on every sub-model) and ``tf32`` (fp32 on CUDA with TF32
matmuls: onnxruntime's ``use_tf32=1``, torch's ``allow_tf32``; without it both run exact fp32).

Every side is loaded once. For each batch size, every side answers the same supplied contexts (5 passages
per question, fixed passage scores) with the same explicit parameters (4 beams, answers of exactly
``answer_tokens`` tokens), after ``--warmup`` calls each, interleaved, at least ``--questions`` questions and
``--min-batches`` calls per side; the device is synchronized before a clock is read. Retrieval is left out,
so the accelerator machine needs neither faiss nor datasets (its image has neither).

Reported per (batch, side): latency p50/p90/p99 per call, generator encoder and decode time, decode time per
step beside the step's memory floor (the decoder weights it must stream, cross K/V, cache and logits, over
the bandwidth of a device copy measured here), for the runtime the host's share of a step; the providers
and provider options each runtime graph was granted with its node placement (nodes per provider, Memcpy
nodes); each transformers side's attention implementation and TF32 setting; device memory after loading and
after warm-up; token agreement of every pair of sides. Results (``<name>.json`` and ``.md``) are rewritten
after every batch size, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from benchmarks.run import (
    CACHE,
    QUESTIONS,
    RESULTS,
    WORKLOADS,
    _log,
    _pct,
    build_checkpoint,
    is_current,
    write_results,
)
from rag_runtime import Manifest, RagError
from rag_runtime import constants as C

ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 5
BEAMS = 4
KINDS = ("runtime", "transformers")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16")
ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class SideSpec:
    """One side of the comparison (see the module docstring for the ``KIND:DEVICE:PRECISION[:FLAG]`` form)."""

    kind: str
    device: str
    precision: str
    attention: str | None = None
    tf32: bool = False

    @property
    def name(self) -> str:
        return "-".join([self.kind, self.device, self.precision, *([self.attention] if self.attention else []),
                         *(["tf32"] if self.tf32 else [])])


def parse_side(text: str) -> SideSpec:
    parts = text.split(":")
    if len(parts) < 3 or parts[0] not in KINDS or parts[1] not in DEVICES or parts[2] not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"side {text!r}: expected KIND:DEVICE:PRECISION[:FLAG...] with KIND in "
                                         f"{KINDS}, DEVICE in {DEVICES}, PRECISION in {PRECISIONS}")
    attention, tf32 = None, False
    for flag in parts[3:]:
        if flag in ATTENTION and parts[0] == "transformers" and attention is None:
            attention = flag
        elif flag == "tf32" and parts[1:3] == ["cuda", "fp32"]:
            tf32 = True
        else:
            raise argparse.ArgumentTypeError(f"side {text!r}: flag {flag!r} not accepted here; accepted: eager or "
                                             "sdpa (transformers sides), tf32 (cuda fp32 sides)")
    return SideSpec(parts[0], parts[1], parts[2], attention, tf32)


def default_sides(device: str) -> list[SideSpec]:
    return [SideSpec("runtime", device, "fp32"), SideSpec("runtime", device, "fp16"),
            *(SideSpec("transformers", device, p, a) for p in PRECISIONS for a in ATTENTION)]


def prepare(workload: str, precisions: list[str], cache: Path = CACHE, validate: bool = True
            ) -> tuple[Path, dict[str, Path]]:
    """A checkpoint without a knowledge base, and one export per precision, under ``cache`` (built once)."""
    from rag_export import export

    base = cache / f"{workload}-token-bart-contexts"
    t0 = time.perf_counter()
    ckpt = build_checkpoint(base / "checkpoint", workload, "token", "bart", index_type=None)
    _log(f"{workload} checkpoint ready after {time.perf_counter() - t0:.1f}s")
    exports = {}
    for precision in dict.fromkeys(precisions):
        out = base / f"export-{precision}"
        if not is_current(out):
            t0 = time.perf_counter()
            export(str(ckpt), out, force=True, include_index=False, precision=precision, validate=validate)
            _log(f"{workload} {precision} export took {time.perf_counter() - t0:.1f}s")
        exports[precision] = out
    return ckpt, exports


def contexts(pipe, questions: list[str], seed: int = 0, corpus: list[dict] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per question, ``N_DOCS`` passages (of ``corpus``, default the bundled corpus as is) contextualized as
    the retriever does, and passage scores."""
    corpus = corpus or [json.loads(line) for line in
                        (ROOT / "scripts" / "data" / "corpus.jsonl").read_text().splitlines() if line.strip()]
    passages = [[corpus[(i * 7 + j * 13) % len(corpus)] for j in range(N_DOCS)] for i in range(len(questions))]
    ids, mask = pipe.contextualizer.encode(questions, passages)
    scores = np.random.default_rng(seed).normal(0.0, 2.0, (len(questions), N_DOCS)).astype(np.float32)
    return ids.astype(np.int64), mask.astype(np.int64), scores


def _sync(device: str):
    if device != "cuda":
        return lambda: None
    import torch

    return torch.cuda.synchronize


class RuntimeSide:
    """rag_runtime on one export; its timer says what onnxruntime granted every graph."""

    def __init__(self, spec: SideSpec, export_dir: Path):
        from rag_runtime import RagPipeline, StageTimer

        options = {"use_tf32": int(spec.tf32)} if spec.device == "cuda" else None
        self.spec, self.sync = spec, _sync(spec.device)
        self.pipe = RagPipeline.load(export_dir, device=spec.device, timer=StageTimer(), provider_options=options)
        self.info = {"export": str(export_dir), "provider_options_asked": options, "graphs": self.pipe.timer.session_reports,
                     "fp16_drift": _drift_summary(self.pipe.manifest.validation.get("fp16_drift", {}))}

    def run(self, ids, mask, scores, params) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        rows = self.pipe.generate_from_context(ids, mask, scores, **params)
        self.sync()
        return rows, time.perf_counter() - t0

    def reset(self) -> None:
        self.pipe.timer.reset()

    def stages(self, calls: int, steps: int, mean_s: float) -> dict:
        """Per call: generator encoder and decode time (the timer's stages), and the host's share of a step."""
        totals = self.pipe.timer.totals
        decode = totals.get("decode", 0.0) / calls
        # Host time inside the decode loop: beam bookkeeping, processors, bindings (not onnxruntime).
        graphs = (totals.get("onnxruntime/generator_decoder", 0.0) + totals.get("onnxruntime/rag_token_head", 0.0)) / calls
        return {"generator_encode_ms": totals.get("generator_encode", 0.0) / calls * 1e3, "decode_ms": decode * 1e3,
                "host_ms_per_step": (decode - graphs) * 1e3 / steps}


class ReferenceSide:
    """transformers' ``RagTokenForGeneration.generate`` in one dtype, attention implementation and TF32 mode."""

    def __init__(self, spec: SideSpec, ckpt: Path):
        import torch
        from transformers import RagTokenForGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.spec, self.sync, self.torch = spec, _sync(spec.device), torch
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[spec.precision]
        model = RagTokenForGeneration.from_pretrained(ckpt, dtype=dtype)
        if spec.attention:  # from_pretrained's attn_implementation does not reach RAG's sub-models
            model.set_attn_implementation(spec.attention)
        self.model = model.to(spec.device).eval()
        self.encode_s = 0.0
        encoder = model.generator.get_encoder()
        forward = encoder.forward

        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = forward(*args, **kwargs)
            self.sync()
            self.encode_s += time.perf_counter() - t0
            return out

        encoder.forward = timed
        self.info = {"dtype": str(dtype), "device": spec.device, "tf32_matmul": spec.tf32,
                     "attention": {"generator": model.generator.config._attn_implementation,
                                   "question_encoder": model.question_encoder.config._attn_implementation}}
        if spec.attention and self.info["attention"]["generator"] != spec.attention:
            raise RuntimeError(f"transformers kept attention {self.info['attention']} instead of {spec.attention}")

    def run(self, ids, mask, scores, params) -> tuple[np.ndarray, float]:
        torch = self.torch
        t = {k: torch.as_tensor(v, device=self.spec.device) for k, v in (("ids", ids), ("mask", mask))}
        doc_scores = torch.as_tensor(scores, device=self.spec.device).to(self.model.dtype)
        matmul = torch.backends.cuda.matmul
        saved, matmul.allow_tf32 = matmul.allow_tf32, self.spec.tf32
        try:
            self.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.model.generate(context_input_ids=t["ids"], context_attention_mask=t["mask"],
                                          doc_scores=doc_scores, **params)
            self.sync()
            dt = time.perf_counter() - t0
        finally:
            matmul.allow_tf32 = saved
        return out.cpu().numpy(), dt

    def reset(self) -> None:
        self.encode_s = 0.0

    def stages(self, calls: int, steps: int, mean_s: float) -> dict:
        """Per call: the generator encoder's time, and the rest of ``generate`` (mean ``mean_s``) as decode."""
        encode = self.encode_s / calls
        return {"generator_encode_ms": encode * 1e3, "decode_ms": (mean_s - encode) * 1e3, "host_ms_per_step": None}


def _drift_summary(drift: dict) -> dict:
    """The export's fp16 drift against PyTorch fp32, per graph output: max |diff| and the reference magnitude."""
    return {f"{graph}.{output}": {k: f[k] for k in ("max_abs_diff", "max_abs_ref") if k in f}
            for graph, outputs in drift.items() for output, f in outputs.items()}


def memory_mib(device: str) -> float:
    """MiB in use: on CUDA the whole device's (onnxruntime's arena, torch's cache and the contexts alike), on
    the CPU this process's resident set."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20
    rss = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS")]
    return int(rss[0].split()[1]) / 1024 if rss else float("nan")


class _MemoryStep:
    """Memory in use before and after a step, for one side (``used_mib`` after it, ``delta_mib`` of it)."""

    def __init__(self, device: str):
        self.device, self.before = device, memory_mib(device)

    def done(self) -> dict:
        after = memory_mib(self.device)
        return {"used_mib": after, "delta_mib": after - self.before}


def copy_bandwidth(device: str) -> dict:
    """GB/s of a large copy on ``device`` (bytes read + bytes written), best and median of the timed copies."""
    if device != "cuda":
        from benchmarks.floor import bandwidth

        return {"gbps_best": bandwidth(), "method": "numpy copy of 512 MiB, fastest of 7"}
    import torch

    n = 2**30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")  # not zeros: real data
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return {"gbps_best": 2 * n / min(times) / 1e9, "gbps_median": 2 * n / statistics.median(times) / 1e9,
            "method": "torch device-to-device copy of 1 GiB, CUDA events, 10 after 3 warm-up"}


def streamed_weight_bytes(graph: Path) -> int:
    """Bytes of the graph's initializers that a call reads whole: every one except those only gathered from
    (an embedding table read a row per token; a table the LM head also reads is counted)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        if readers.get(init.name, set()) - {"Gather"}:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            total += math.prod(init.dims) * itemsize
    return total


def step_floor(manifest, weight_bytes: int, batch: int, src: float, steps: int, gbps: float) -> dict:
    """The memory floor of one decode step at ``batch`` questions: the decoder's weights, every passage's cross
    K/V (beams share them), the self-attention cache at the mean step, and the logits written and read back."""
    d = manifest.decoder
    kv = np.dtype(d.kv_dtype).itemsize
    rows = batch * N_DOCS * BEAMS
    parts = {"weights": weight_bytes, "cross_kv": 2 * d.layers * batch * N_DOCS * src * d.d_model * kv,
             "cache": 2 * d.layers * rows * (steps - 1) / 2 * d.d_model * kv, "logits": 2 * rows * d.vocab * 4}
    total = sum(parts.values())
    return {"bytes": total, "parts_mb": {k: v / 1e6 for k, v in parts.items()}, "floor_ms": total / (gbps * 1e9) * 1e3}


def _same(a: np.ndarray, b: np.ndarray, pad: int | None) -> bool:
    width = max(len(a), len(b))
    fill = -1 if pad is None else pad
    return np.array_equal(np.pad(a, (0, width - len(a)), constant_values=fill),
                          np.pad(b, (0, width - len(b)), constant_values=fill))


def measure(sides: dict, inputs: list[tuple], params: dict, warmup: int, rounds: int, deadline: float,
            pad: int | None) -> dict:
    """One batch size: warm-up, then every input through every side (rotating order), until ``deadline``.
    A side that fails in its warm-up is left out of this batch size (its error recorded)."""
    errors, first_call = {}, {}
    for w in range(warmup):
        for name in [n for n in sides if n not in errors]:
            memory = _MemoryStep(sides[name].spec.device)
            try:
                sides[name].run(*inputs[w % len(inputs)], params)
            except Exception as e:  # one side's failure (a kernel, an out-of-memory) must not lose the others
                errors[name] = _error(e)
                _log(f"{name} failed in warm-up, left out: {errors[name]}")
            if w == 0:
                first_call[name] = memory.done()
    sides = {n: side for n, side in sides.items() if n not in errors}
    names = list(sides)
    for side in sides.values():
        side.reset()
    latency: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    done, truncated = 0, False
    for r in range(rounds):
        for i, args in enumerate(inputs):
            if time.monotonic() > deadline:
                truncated = True
                break
            shift = (i + r) % len(names)
            for name in names[shift:] + names[:shift]:
                rows, dt = sides[name].run(*args, params)
                latency[name].append(dt)
                if r == 0:
                    outputs[name].append(rows)
            done += 1
    if done == 0:
        return {"calls": 0, "truncated": True, "errors": errors}
    steps = params["max_length"] - 1
    report: dict = {"calls": done, "truncated": truncated, "errors": errors, "sides": {}}
    for name, side in sides.items():
        values = latency[name]
        stages = side.stages(done, steps, statistics.fmean(values))
        report["sides"][name] = {
            "p50_ms": _pct(values, 50) * 1e3, "p90_ms": _pct(values, 90) * 1e3, "p99_ms": _pct(values, 99) * 1e3,
            "mean_ms": statistics.fmean(values) * 1e3, **stages, "decode_step_ms": stages["decode_ms"] / steps,
            "memory_first_call": first_call.get(name),
        }
    report["agreement"] = {}
    for a, b in combinations(names, 2):
        pairs = [(g, w) for got, want in zip(outputs[a], outputs[b], strict=True)
                 for g, w in zip(got, want, strict=True)]
        report["agreement"][f"{a} vs {b}"] = {"identical": sum(_same(g, w, pad) for g, w in pairs),
                                              "compared": len(pairs)}
    for name in names:
        if sides[name].spec.kind == "runtime":
            for ref in (n for n in names if sides[n].spec.kind == "transformers"):
                report["sides"][name][f"speedup_p50_vs_{ref}"] = (report["sides"][ref]["p50_ms"]
                                                                  / report["sides"][name]["p50_ms"])
    return report


def parity_pairs(specs: list[SideSpec]) -> list[str]:
    """The pairs that must answer identically: runtime and transformers fp32 (without TF32) on one device."""
    exact = [s for s in specs if s.precision == "fp32" and not s.tf32]
    return [f"{a.name} vs {b.name}" for a, b in combinations(exact, 2)
            if {a.kind, b.kind} == set(KINDS) and a.device == b.device]


def _cpu_isa() -> str:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    wanted = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "avx_vnni")]
    return " ".join(wanted) or "unknown"


def device_info(devices: set[str]) -> dict:
    import onnxruntime
    import torch
    import transformers

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    info = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "onnxruntime_build": getattr(onnxruntime, "get_build_info", lambda: "")(),
            "onnxruntime_providers": onnxruntime.get_available_providers(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {model}", "cpu_isa": _cpu_isa(),
            "faiss": "not used (supplied contexts, no retrieval)"}
    if "cuda" in devices:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_mib": props.total_memory / 2**20,
                 "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown (nvidia-smi unavailable)"
    return info


def _fmt(v, spec: str = ".1f") -> str:
    return "" if v is None else format(v, spec)


def _mem(m: dict | None) -> str:
    return "" if m is None else f"{m['delta_mib']:+.0f} ({m['used_mib']:.0f}) MiB"


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def markdown(report: dict) -> str:
    versions = {k: v for k, v in report["versions"].items() if k not in ("machine", "cpu_isa")}
    lines = [f"# {report['name']}", "", f"Command: `{report['command']}`", "",
             f"Device: {report['device']}; machine {report['versions']['machine']}, vector ISA "
             f"{report['versions']['cpu_isa']}", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
             "",
             f"Workload: {report['workload']}", "",
             f"Copy bandwidth: {report['bandwidth']['gbps_best']:.0f} GB/s ({report['bandwidth']['method']}); "
             "floor/step = the decoder's streamed weights + cross K/V + mean cache + logits over it.", "",
             "## Sides", "", f"Memory: {report['memory_note']}", "",
             "| side | granted / set up | load s | memory of the load |", "| --- | --- | ---: | --- |"]
    for name, side in report["sides"].items():
        if "error" in side:
            lines.append(f"| {name} | failed to load: {side['error']} | | |")
            continue
        if "graphs" in side:
            cells = []
            for graph, g in side["graphs"].items():
                first = g["providers"][0]
                tf32 = g["provider_options"].get(first, {}).get("use_tf32")
                placement = g.get("placement")
                where = (f", nodes {placement['nodes']}, Memcpy {placement['memcpy_nodes']}"
                         + (f", on CPU: {' '.join(placement['cpu_op_types'])}" if placement["cpu_op_types"] else "")
                         if placement else "")
                cells.append(f"{graph}: {first}{'' if tf32 is None else f' use_tf32={tf32}'}{where}")
            granted = "; ".join(cells)
        else:
            granted = f"{side['dtype']} on {side['device']}, attention {side['attention']}, TF32 {side['tf32_matmul']}"
        lines.append(f"| {name} | {granted} | {side['load_s']:.1f} | {_mem(side['memory_load'])} |")
    for run in report["runs"]:
        lines += ["", f"## batch {run['batch']} ({run['calls']} timed calls per side"
                  + (", cut short by the deadline" if run.get("truncated") else "") + ")", ""]
        if not run["calls"]:
            continue
        lines += [f"Left out (failed in warm-up): {run['errors']}", ""] if run.get("errors") else []
        lines += ["| side | p50 ms | p90 ms | p99 ms | encoder ms | decode ms | step ms | floor/step ms | host ms/step "
                  "| memory of the first call | speedup p50 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for name, s in run["sides"].items():
            speed = ", ".join(f"{v:.2f}x vs {k.removeprefix('speedup_p50_vs_')}" for k, v in s.items()
                              if k.startswith("speedup"))
            lines.append(f"| {name} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | "
                         f"{s['generator_encode_ms']:.1f} | {s['decode_ms']:.1f} | {s['decode_step_ms']:.2f} | "
                         f"{_fmt(s.get('step_floor_ms'), '.3f')} | {_fmt(s['host_ms_per_step'], '.2f')} | "
                         f"{_mem(s['memory_first_call'])} | {speed} |")
        lines += ["", "| agreement | identical answers |", "| --- | --- |"]
        lines += [f"| {k} | {v['identical']}/{v['compared']} |" for k, v in run["agreement"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="device of the default sides")
    p.add_argument("--sides", type=parse_side, nargs="+", default=None,
                   help="KIND:DEVICE:PRECISION[:FLAG...] (default: runtime fp32, fp16 and transformers fp32, fp16 "
                        "x eager, sdpa on --device)")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--questions", type=int, default=32, help="at least this many timed questions per batch size")
    p.add_argument("--min-batches", type=int, default=8, help="at least this many timed calls per batch size")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per side and batch size")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no timed call after this many seconds, each batch size getting an equal share of "
                        "the time left (what was measured is written)")
    p.add_argument("--cache", type=Path, default=CACHE, help="where checkpoints and exports are built")
    p.add_argument("--no-validate", action="store_true", help="export without validating against PyTorch")
    p.add_argument("--prepare-only", action="store_true", help="build the checkpoint and exports, then stop")
    p.add_argument("--exports", nargs="*", choices=PRECISIONS, default=None,
                   help="with --prepare-only: the exports to build (none: the checkpoint alone; default: the "
                        "runtime sides' precisions)")
    p.add_argument("--name", default=None, help="results file stem")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--require-identical", action="store_true",
                   help="exit 1 unless runtime and transformers fp32 (no TF32) answer identically on each device")
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    deadline = started + args.deadline_s if args.deadline_s else math.inf
    specs = args.sides or default_sides(args.device)
    if len({s.name for s in specs}) != len(specs) or not any(s.kind == "runtime" for s in specs):
        p.error("--sides must be distinct and include a runtime side")
    devices = {s.device for s in specs}
    precisions = [s.precision for s in specs if s.kind == "runtime"]
    if args.exports is not None:
        if not args.prepare_only:
            p.error("--exports goes with --prepare-only")
        precisions = args.exports
    ckpt, exports = prepare(args.workload, precisions, args.cache, validate=not args.no_validate)
    if args.prepare_only:
        return 0
    if "cuda" in devices:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, stated: sides set it per call
    bandwidth = copy_bandwidth("cuda" if "cuda" in devices else "cpu")
    sides: dict = {}
    side_info: dict = {}
    for spec in specs:
        t0, memory = time.perf_counter(), _MemoryStep(spec.device)
        try:
            sides[spec.name] = (RuntimeSide(spec, exports[spec.precision]) if spec.kind == "runtime"
                                else ReferenceSide(spec, ckpt))
        except Exception as e:  # RagError or a library's own: the other sides still get measured
            if isinstance(e, RagError) and spec.kind == "runtime" and spec.device == "cuda":
                raise  # the GPU runtime is the point of the run: stop at once, with the one-line reason
            side_info[spec.name] = {"error": _error(e)}
            _log(f"{spec.name} failed to load, left out: {side_info[spec.name]['error']}")
            continue
        side_info[spec.name] = {**sides[spec.name].info, "load_s": time.perf_counter() - t0, "memory_load": memory.done()}
        _log(f"loaded {spec.name} in {side_info[spec.name]['load_s']:.1f}s")
    runtime_sides = [s for s in sides.values() if isinstance(s, RuntimeSide)]
    if not runtime_sides:
        p.error("no runtime side loaded")
    manifest = runtime_sides[0].pipe.manifest
    manifests = {prec: Manifest.load(path, verify=False) for prec, path in exports.items()}
    weights = {prec: streamed_weight_bytes(path / manifests[prec].graph(C.GENERATOR_DECODER).file)
               for prec, path in exports.items()}
    n = WORKLOADS[args.workload]["answer_tokens"] + 1
    params = dict(n_docs=N_DOCS, num_beams=BEAMS, num_return_sequences=1, max_length=n, min_length=n,
                  no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=True)
    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()]
    info = device_info(devices)
    name = args.name or f"device-{args.workload}-{'-'.join(sorted(devices))}"
    report = {
        "name": name,
        "command": "python -m benchmarks.device " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": (f"{info['gpu']} (driver {info['driver']}, CUDA {info['cuda']}, {info['gpu_memory_mib']:.0f} MiB)"
                   if "gpu" in info else "CPU"),
        "versions": info, "bandwidth": bandwidth, "params": params, "sides": side_info,
        "memory_note": ("MiB in use on the whole GPU (torch.cuda.mem_get_info): growth of the step (in use after it)"
                        if "cuda" in devices else "this process's RSS: growth of the step (RSS after it)"),
        "workload": f"{args.workload} dims, rag-token bart, {N_DOCS} passages per question, params {params}",
        "runs": [],
    }
    failed = []
    for k, batch in enumerate(args.batch):
        # Each batch size left gets an equal share of the time left, so a slow first one cannot starve the rest.
        share = (deadline - time.monotonic()) / (len(args.batch) - k)
        if share <= 0:
            report["runs"].append({"batch": batch, "calls": 0, "truncated": True})
            write_results(args.out / name, report, markdown(report))
            continue
        report.setdefault("load_average", []).append(os.getloadavg()[0])
        calls = max(args.min_batches, math.ceil(args.questions / batch))
        qs = [questions[i % len(questions)] for i in range(calls * batch)]
        inputs = [contexts(runtime_sides[0].pipe, qs[i : i + batch], seed=i) for i in range(0, len(qs), batch)]
        run = {"batch": batch, **measure(sides, inputs, params, args.warmup, args.rounds, time.monotonic() + share,
                                         manifest.rag.generator_pad_token_id)}
        src = statistics.fmean(ids.shape[1] for ids, _, _ in inputs)
        floors = {prec: step_floor(manifests[prec], w, batch, src, n - 1, bandwidth["gbps_best"])
                  for prec, w in weights.items()}
        run["step_floor"] = floors
        for side_name, s in run.get("sides", {}).items():
            floor = floors.get(sides[side_name].spec.precision)
            s["step_floor_ms"] = floor["floor_ms"] if floor else None
            _log(f"batch {batch} {side_name}: p50 {s['p50_ms']:.1f} ms, step {s['decode_step_ms']:.2f} ms "
                 f"(floor {_fmt(s['step_floor_ms'], '.3f')} ms)")
        for pair in parity_pairs(specs):
            v = run.get("agreement", {}).get(pair)
            if v is None or v["identical"] != v["compared"] or not v["compared"]:
                failed.append(f"batch {batch} {pair}: " + (f"{v['identical']}/{v['compared']}" if v else "not compared"))
        report["runs"].append(run)
        write_results(args.out / name, report, markdown(report))
        _log(f"batch {batch}: {run['calls']} calls written to {args.out / name}.json")
    print(markdown(report))
    if args.require_identical and failed:
        _log("fp32 answers differ: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
