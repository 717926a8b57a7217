"""How far each runtime stage is from what this machine allows: GEMM throughput at the workload's shapes
and memory bandwidth, measured here, against the runtime's own stage times.

    python -m benchmarks.floor --workload base --questions 4                    # RAG-Token, 4 beams, 20 tokens
    python -m benchmarks.floor --workload base --kind sequence --questions 4    # RAG-Sequence (thorough)

(a) onnxruntime MatMul throughput (GFLOP/s) at every GEMM shape the stages run, each a single-op ONNX
graph with a constant weight (as in the exported graphs), input and output bound once, fastest of repeated
runs, ``--threads`` intra-op threads; (b) memory bandwidth: a large numpy copy (bytes read + written).
A stage's floor is the larger of its compute time at those rates (attention products at the stage's
slowest GEMM rate, the RAG-Token head's exponentials at onnxruntime's Exp rate) and its bytes (weights and
cross K/V read once) over the bandwidth. The runtime answers the same supplied contexts as
``benchmarks.peers`` (``generate_from_context``, 5 contexts, 4 beams, fixed length) with a
:class:`~rag_runtime.StageTimer`; a second, profiled pass gives the LM head's kernel time, which the
decoder call is split by. ``--kind sequence`` runs thorough RAG-Sequence decoding on the same contexts
instead: beam search per passage (the host takes the log-softmax), then every candidate teacher-forced
against every passage (rescoring); each decoder call is attributed to its phase. Writes
``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.device import N_DOCS, contexts
from benchmarks.peers import load_avg, prepare, workload_passages
from benchmarks.run import QUESTIONS, RESULTS, WORKLOADS, _log, machine_line, write_results
from benchmarks.run import prepare as prepare_export

BEAMS = 4
F32 = 4


def single_op(op: str, shape: tuple[int, int], weight: np.ndarray | None, threads: int):
    """An onnxruntime session of one op on a float32 input of ``shape`` (and a constant weight), with its
    input and output bound once (as the runtime's arena reuses its buffers: a fresh multi-MB output per run
    would add page faults the kernel does not have in the exported graphs). Returns (session, binding)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(weight, "w")] if weight is not None else []
    out = [shape[0], weight.shape[1]] if weight is not None else list(shape)
    graph = helper.make_graph([helper.make_node(op, ["a"] + (["w"] if inits else []), ["y"])], op,
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    io.bind_ortvalue_input("a", ort.OrtValue.ortvalue_from_numpy(
        np.random.default_rng(1).standard_normal(shape, dtype=np.float32)))
    io.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(np.zeros(out, dtype=np.float32)))
    return sess, io


def _single_op_seconds(op: str, shape: tuple[int, int], weight: np.ndarray | None, threads: int,
                       seconds: float = 0.5) -> float:
    """Seconds of :func:`single_op`: the fastest of repeated runs, since other work on the machine only ever
    slows a run down (a floor wants the capability)."""
    sess, io = single_op(op, shape, weight, threads)
    for _ in range(3):
        sess.run_with_iobinding(io)
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_rate(m: int, k: int, n: int, threads: int) -> float:
    """GFLOP/s of onnxruntime MatMul [m, k] x [k, n] (constant weight)."""
    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    return 2.0 * m * k * n / _single_op_seconds("MatMul", (m, k), weight, threads) / 1e9


def exp_rate(rows: int, vocab: int, threads: int) -> float:
    """Giga-elements/s of onnxruntime Exp over [rows, vocab] (the RAG-Token head's softmax work)."""
    return rows * vocab / _single_op_seconds("Exp", (rows, vocab), None, threads) / 1e9


def bandwidth(mib: int = 512, repeats: int = 7) -> float:
    """GB/s of a numpy copy of ``mib`` MiB (bytes read + bytes written), the fastest of ``repeats``."""
    src = np.ones(mib * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / min(times) / 1e9


def encode_work(dims: dict, width: int) -> dict:
    """One generator encoder call over ``N_DOCS`` contexts of ``width`` tokens (cross K/V projections included)."""
    d, ffn, layers = dims["d_model"], dims["ffn"], dims["layers"]
    t = N_DOCS * width
    weights = layers * (4 * d * d + 2 * d * ffn) + 2 * layers * d * d
    return {"gemms": [(t, d, d, 4 * layers + 2 * layers), (t, d, ffn, layers), (t, ffn, d, layers)],
            "extra_flops": layers * N_DOCS * 2 * 2 * width * width * d, "bytes": (weights + 4 * layers * t * d) * F32}


def stage_work(dims: dict, src: int, rows: int, kind: str = "token") -> dict[str, dict]:
    """Per stage: GEMM shapes (m, k, n, count), extra (attention) FLOPs and bytes that must stream.

    ``src`` is the padded context width, ``rows`` the decoder rows (contexts x beams). After the decoder,
    RAG-Token runs its head, RAG-Sequence its per-passage beam step."""
    d, ffn, layers, vocab = dims["d_model"], dims["ffn"], dims["layers"], dims["vocab"]
    dec_w = layers * (6 * d * d + 2 * d * ffn)  # self q/k/v/o, cross q/o, FFN
    cross_kv = 2 * layers * N_DOCS * src * d  # cross K and V the decoder reads each step
    return {
        "generator encode": encode_work(dims, src),
        "decoder layers (one step)": {
            "gemms": [(rows, d, d, 6 * layers), (rows, d, ffn, layers), (rows, ffn, d, layers)],
            "extra_flops": layers * rows * 2 * 2 * src * d, "bytes": (dec_w + cross_kv) * F32},
        "LM head (one step)": {"gemms": [(rows, d, vocab, 1)], "extra_flops": 0, "bytes": d * vocab * F32},
        # The least either head must do: read the logits once and take one exponential per element (the
        # softmax); RAG-Token also a logarithm per (beam, token) of the marginal, counted at Exp's rate.
        **({"RAG-Token head (one step)": {"gemms": [], "extra_flops": 0, "bytes": rows * vocab * F32,
                                          "exps": rows * vocab + BEAMS * vocab}} if kind == "token" else
           {"beam step (one step)": {"gemms": [], "extra_flops": 0, "bytes": rows * vocab * F32,
                                     "exps": rows * vocab}}),
    }


def rescore_work(dims: dict, src: int, rows: int, length: int) -> dict:
    """One passage's rescoring call: ``rows`` (candidates x length) teacher-forced tokens through the
    decoder layers and the LM head against one passage's cross K/V, then the scorer's log-softmax."""
    d, ffn, layers, vocab = dims["d_model"], dims["ffn"], dims["layers"], dims["vocab"]
    attention = layers * rows * 2 * 2 * (length + src) * d  # self (causal, bounded by length) + cross
    return {"gemms": [(rows, d, d, 6 * layers), (rows, d, ffn, layers), (rows, ffn, d, layers), (rows, d, vocab, 1)],
            "extra_flops": attention, "exps": rows * vocab,
            "bytes": (layers * (6 * d * d + 2 * d * ffn) + d * vocab + 2 * layers * src * d) * F32}


def _compute_bound(work: dict) -> str:
    return " + ".join(name for name, present in (("GEMM", work["gemms"]), ("exp", work.get("exps"))) if present)


def floors(work: dict[str, dict], rates: dict[tuple, float], gbps: float, exps_per_s: float) -> dict[str, dict]:
    """Each stage's floor (ms): the larger of its compute time (GEMMs at the measured rates, exponentials
    at onnxruntime's Exp rate) and its bytes over the bandwidth."""
    out = {}
    for stage, w in work.items():
        gemm_s = sum(2.0 * m * k * n * c / (rates[(m, k, n)] * 1e9) for m, k, n, c in w["gemms"])
        if w["extra_flops"]:
            slowest = min(rates[(m, k, n)] for m, k, n, _ in w["gemms"])
            gemm_s += w["extra_flops"] / (slowest * 1e9)
        gemm_s += w.get("exps", 0) / (exps_per_s * 1e9)
        bytes_s = w["bytes"] / (gbps * 1e9)
        out[stage] = {"compute_ms": gemm_s * 1e3, "bytes_ms": bytes_s * 1e3, "floor_ms": max(gemm_s, bytes_s) * 1e3,
                      "bound": _compute_bound(w) if gemm_s >= bytes_s else "memory", "gflop": sum(
                          2.0 * m * k * n * c for m, k, n, c in w["gemms"]) / 1e9 + w["extra_flops"] / 1e9,
                      "mbytes": w["bytes"] / 1e6}
    return out


def measure_runtime(export_dir: Path, inputs: list[tuple], params: dict, threads: int, rounds: int,
                    widths: list[int]) -> dict:
    """The runtime's stage times on the inputs, from its ``StageTimer``: per question, per decode step
    (decoder and head calls within the ``decode`` stage) and per rescoring call (RAG-Sequence).
    ``widths``: the encoder input width of each encode of a question (RAG-Sequence encodes twice)."""
    from rag_runtime import RagPipeline, StageTimer

    timer = StageTimer()
    pipe = RagPipeline.load(export_dir, threads=threads, timer=timer)
    pipe.generate_from_context(*inputs[0], **params)  # warm-up
    timer.reset()
    lat = []
    for _ in range(rounds):
        for args in inputs:
            t0 = time.perf_counter()
            pipe.generate_from_context(*args, **params)
            lat.append(time.perf_counter() - t0)
    tot, calls, values, n = timer.totals, timer.counts, timer.values, len(lat)
    steps = calls["decode/onnxruntime/generator_decoder"]
    measured = {
        "question_p50_ms": float(np.median(lat)) * 1e3, "questions": n, "decode_steps_per_question": steps / n,
        "generator_encode_ms": tot["generator_encode"] * 1e3 / n,
        "encoder_graph_ms": tot["onnxruntime/generator_encoder"] * 1e3 / n,
        "decoder_call_ms": tot["decode/onnxruntime/generator_decoder"] * 1e3 / steps,
        "decode_ms": (tot["decode"] + tot["rescore"]) * 1e3 / n,
        # Per encoder call of a question: RAG-Sequence encodes twice, masked for rescoring and, as the
        # reference does, unmasked at max_combined_length for generation.
        "encoder_widths": widths,
    }
    if pipe.kind == "token":
        head = "decode/onnxruntime/rag_token_head"
        return {**measured, "head_call_ms": tot[head] * 1e3 / calls[head]}
    rescoring = calls["rescore/onnxruntime/generator_decoder"]
    host = tot["decode"] - tot["decode/onnxruntime/generator_decoder"]
    step = "decode/onnxruntime/beam_step"  # absent from exports made before the beam step graph
    if calls.get(step):
        measured["beam_step_call_ms"] = tot[step] * 1e3 / calls[step]
    passages = params["n_docs"]
    return {**measured, "host_per_step_ms": host * 1e3 / steps, "rescore_ms": tot["rescore"] * 1e3 / n,
            "rescore_calls_per_question": rescoring / n, "rescore_call_ms": tot["rescore"] * 1e3 / rescoring,
            "rescore_rows_mean": values["rescore/positions"] / rescoring,
            "candidate_length_mean": values["rescore/positions"] / (values["rescore/candidates"] * passages)}


def lm_head_kernel(export_dir: Path, inputs: list[tuple], params: dict, threads: int, vocab: int) -> dict:
    """From onnxruntime's per-node profile of the decoder: the LM head's kernel time per decoder call (the
    MatMul/Gemm nodes whose output ends in ``vocab``). Profiling adds a cost per node that roughly doubles a
    call of some 150 small nodes, so only the big kernel's own time is taken from it, not its share."""
    import tempfile

    from rag_runtime import RagPipeline

    with tempfile.TemporaryDirectory(prefix="floor-profile-") as tmp:
        pipe = RagPipeline.load(export_dir, threads=threads, profile=tmp)
        for args in inputs:
            pipe.generate_from_context(*args, **params)
        trace_events = json.loads(pipe.end_profiling()["generator_decoder"].read_text())
    events = [e for e in trace_events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    calls = sum(e.get("cat") == "Session" and e["name"] == "model_run" for e in trace_events)

    def is_head(e) -> bool:
        shapes = e["args"].get("output_type_shape") or [{}]
        dims = next(iter(shapes[0].values()), [])
        return e["args"].get("op_name") in ("MatMul", "Gemm", "FusedMatMul") and bool(dims) and dims[-1] == vocab

    head = sum(e["dur"] for e in events if is_head(e))
    return {"lm_head_profiled_ms": head / 1e3 / calls, "profiled_calls": calls,
            "lm_head_ops": sorted({e["args"].get("op_name") for e in events if is_head(e)})}


def _token_rows(measured: dict, fl: dict, lm_head_ms: float) -> list[tuple[str, float, float, str]]:
    """(stage, measured ms, floor ms, bound) for the RAG-Token table."""
    steps = measured["decode_steps_per_question"]
    dec, lm, head = fl["decoder layers (one step)"], fl["LM head (one step)"], fl["RAG-Token head (one step)"]
    call = measured["decoder_call_ms"]
    question_floor = fl["generator encode"]["floor_ms"] + steps * (dec["floor_ms"] + lm["floor_ms"] + head["floor_ms"])
    return [
        ("generator encode (encoder graph, per question)", measured["encoder_graph_ms"],
         fl["generator encode"]["floor_ms"], fl["generator encode"]["bound"]),
        ("decoder call (one step: layers + LM head)", call, dec["floor_ms"] + lm["floor_ms"], "sum of the two below"),
        ("  decoder layers (one step: call - LM head)", call - lm_head_ms, dec["floor_ms"], dec["bound"]),
        ("  LM head (one step, profiled kernel)", lm_head_ms, lm["floor_ms"], lm["bound"]),
        ("RAG-Token head (one step)", measured["head_call_ms"], head["floor_ms"], head["bound"]),
        (f"question p50 (encode + {steps:.0f} steps, host included)", measured["question_p50_ms"], question_floor,
         "sum of the stages"),
    ]


def _sequence_rows(measured: dict, fl: dict) -> list[tuple[str, float, float, str]]:
    """(stage, measured ms, floor ms, bound) for the RAG-Sequence table."""
    steps, calls = measured["decode_steps_per_question"], measured["rescore_calls_per_question"]
    dec, lm = fl["decoder layers (one step)"], fl["LM head (one step)"]
    host, rescore = fl["beam step (one step)"], fl["rescore (one passage)"]
    encodes = [v for k, v in fl.items() if k.startswith("generator encode")]
    enc_floor = sum(e["floor_ms"] for e in encodes)
    step_floor = dec["floor_ms"] + lm["floor_ms"]
    question_floor = enc_floor + steps * (step_floor + host["floor_ms"]) + calls * rescore["floor_ms"]
    rows = round(measured["rescore_rows_mean"])
    widths = " + ".join(str(w) for w in measured["encoder_widths"])
    return [
        (f"generator encode (encoder graph, per question; {len(encodes)} calls, widths {widths})",
         measured["encoder_graph_ms"], enc_floor, encodes[0]["bound"]),
        ("beam-search decoder call (one step: layers + LM head)", measured["decoder_call_ms"], step_floor,
         f"{dec['bound']} + {lm['bound']}"),
        ("per beam-search step beside the decoder (beam step graph, search, bookkeeping)", measured["host_per_step_ms"],
         host["floor_ms"], host["bound"]),
        *([("  of which the beam step graph (one call)", measured["beam_step_call_ms"], host["floor_ms"], host["bound"])]
          if "beam_step_call_ms" in measured else []),
        (f"rescore, one passage ({rows} teacher-forced rows: decoder, LM head, scorer)",
         measured["rescore_call_ms"], rescore["floor_ms"], rescore["bound"]),
        (f"question p50 (encode + {steps:.0f} steps + {calls:.0f} rescoring calls)", measured["question_p50_ms"],
         question_floor, "sum of the stages"),
    ]


def markdown(report: dict) -> str:
    lines = [f"# {report['name']}", "", f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; threads {report['threads']}; onnxruntime {report['onnxruntime']}", "",
             f"Load average (1 min): {report['load_avg_start']:.2f} at start, {report['load_avg_end']:.2f} at end", "",
             f"Workload: {report['workload']}", "",
             f"Memory bandwidth (numpy copy, read + write): {report['bandwidth_gbps']:.1f} GB/s; onnxruntime Exp "
             f"over [rows, vocab]: {report['exp_gelem_per_s']:.2f} G elements/s", "",
             "| MatMul [m, k] x [k, n] | GFLOP/s |", "| --- | ---: |"]
    lines += [f"| [{r['m']}, {r['k']}] x [{r['k']}, {r['n']}] | {r['gflops']:.1f} |" for r in report["matmul"]]
    if "lm_head_profiled_ms" in report:
        lines += ["", f"LM head kernel per decoder call (onnxruntime profile of {report['profiled_calls']} calls, "
                      f"ops {report['lm_head_ops']}): {report['lm_head_profiled_ms']:.1f} ms"]
    lines += ["", "| stage | measured ms | floor ms | bound | measured / floor |", "| --- | ---: | ---: | --- | ---: |"]
    lines += [f"| {s} | {m:.1f} | {f:.1f} | {b} | {m / f:.2f}x |" for s, m, f, b in report["table"]]
    lines += ["", "Floors per stage:", "", "| stage | GFLOP | MB streamed | compute ms | bytes ms |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {k} | {v['gflop']:.2f} | {v['mbytes']:.0f} | {v['compute_ms']:.1f} | {v['bytes_ms']:.1f} |"
              for k, v in report["floors"].items()]
    return "\n".join(lines) + "\n"


def _workload(workload: str, kind: str) -> tuple[Path, dict, dict]:
    """The fp32 export the stages run, the generator's dims, and the generation parameters."""
    if kind == "token":
        ckpt, exports = prepare(workload)
        export_dir = exports["rag_runtime fp32"]
    else:
        ckpt, export_dir = prepare_export(workload, "sequence", "bart")
    g = json.loads((ckpt / "config.json").read_text())["generator"]
    dims = {"d_model": g["d_model"], "ffn": g["decoder_ffn_dim"], "layers": g["decoder_layers"], "vocab": g["vocab_size"]}
    n = WORKLOADS[workload]["answer_tokens"] + 1
    params = dict(n_docs=N_DOCS, num_beams=BEAMS, num_return_sequences=1, max_length=n, min_length=n,
                  no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=True)
    return export_dir, dims, params


def _max_combined_length(export_dir: Path) -> int:
    from rag_runtime import Manifest

    return Manifest.load(export_dir, verify=False).rag.max_combined_length


def _inputs(export_dir: Path, workload: str, questions: int, threads: int) -> list[tuple]:
    """Per question, the supplied contexts (``benchmarks.device.contexts``) the stages run on."""
    from rag_runtime import RagPipeline

    texts = [q for q in QUESTIONS.read_text().splitlines() if q.strip()][:questions]
    contextualizer = RagPipeline.load(export_dir, threads=threads)
    corpus = workload_passages(workload)
    return [contexts(contextualizer, [q], seed=i, corpus=corpus) for i, q in enumerate(texts)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    p.add_argument("--kind", choices=["token", "sequence"], default="token")
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default=None, help="results file stem (default floor-<workload>[-sequence])")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxruntime

    export_dir, dims, params = _workload(args.workload, args.kind)
    inputs = _inputs(export_dir, args.workload, args.questions, args.threads)
    src = round(statistics.fmean(int(m.sum(axis=1).max()) for _, m, _ in inputs))
    start = load_avg()
    _log(f"load average {start:.2f}; measuring the runtime")
    widths = [src] if args.kind == "token" else [src, _max_combined_length(export_dir)]
    measured = measure_runtime(export_dir, inputs, params, args.threads, args.rounds, widths)
    _log("measuring bandwidth and MatMul rates")
    gbps = bandwidth()
    work = stage_work(dims, src, N_DOCS * BEAMS, args.kind)
    if args.kind == "sequence" and len(measured["encoder_widths"]) > 1:
        work["generator encode, unmasked (generation)"] = encode_work(dims, measured["encoder_widths"][1])
    if args.kind == "sequence":
        work["rescore (one passage)"] = rescore_work(dims, src, round(measured["rescore_rows_mean"]),
                                                     round(measured["candidate_length_mean"]))
    shapes = sorted({(m, k, nn) for w in work.values() for m, k, nn, _ in w["gemms"]})
    rates = {s: matmul_rate(*s, threads=args.threads) for s in shapes}
    exps = exp_rate(N_DOCS * BEAMS, dims["vocab"], args.threads)
    fl = floors(work, rates, gbps, exps)
    if args.kind == "token":
        profile = lm_head_kernel(export_dir, inputs[:2], params, args.threads, dims["vocab"])
        table = _token_rows(measured, fl, profile["lm_head_profiled_ms"])
    else:
        profile, table = {}, _sequence_rows(measured, fl)
    name = "RAG-Token generate_from_context" if args.kind == "token" else "RAG-Sequence (thorough) generate_from_context"
    report = {
        "name": args.name or f"floor-{args.workload}" + ("-sequence" if args.kind == "sequence" else ""),
        "command": "python -m benchmarks.floor " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_line(), "threads": args.threads,
        "onnxruntime": onnxruntime.__version__, "load_avg_start": start, "load_avg_end": load_avg(),
        "workload": f"{args.workload} BART generator fp32 export, {name}, {N_DOCS} contexts padded to {src} tokens "
                    f"(mean), {BEAMS} beams ({N_DOCS * BEAMS} decoder rows), {params['max_length'] - 1} new tokens, "
                    f"{len(inputs)} questions x {args.rounds} rounds, dims {dims}",
        "bandwidth_gbps": gbps, "exp_gelem_per_s": exps,
        "matmul": [{"m": m, "k": k, "n": nn, "gflops": r} for (m, k, nn), r in rates.items()],
        "measured": measured, **profile, "floors": fl, "table": table,
    }
    write_results(args.out / report["name"], report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
