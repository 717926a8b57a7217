"""rag_runtime against CTranslate2 on the same generator work, in one process, interleaved, after warm-up.

    python -m benchmarks.peers --workload base --questions 8 --rounds 2 --plot     # the issue's comparison
    python -m benchmarks.peers --workload tiny --questions 2 --rounds 1            # smoke size

The benchmark generator (the BART generator of the workload checkpoint, random weights) is converted to
CTranslate2 at fp32 and int8; rag_runtime runs its fp32 export and its ``--quantize int8`` export. Every
side gets the same question's 5 supplied contexts (``benchmarks.device.contexts``), 4 beams and exactly
``answer_tokens`` new tokens (the report's "work" says what each side computes: RAG's marginalization is
only on rag_runtime's side). A greedy one-context check shows both engines run the same model.

CTranslate2's converter wants ``normalize_before`` in the BART config and a tokenizer; both go into a
scratch copy of the generator under ``.cache`` (never into the product). Writes
``benchmarks/results/<name>.json``, ``.md`` and (``--plot``) ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.device import N_DOCS, contexts
from benchmarks.run import (
    CACHE,
    QUESTIONS,
    RESULTS,
    WORKLOADS,
    _log,
    _pct,
    build_checkpoint,
    is_current,
    machine_line,
    write_results,
)

RUNTIME_EXPORTS = {"rag_runtime fp32": "export-fp32", "rag_runtime int8": "export-int8"}
CT2_TYPES = {"ctranslate2 fp32": "float32", "ctranslate2 int8": "int8"}
WORK = (
    "rag_runtime: generate_from_context (RAG-Token): encoder over the 5 contexts, per step the decoder "
    "over 5 x 4 rows (LM head included) and the RAG-Token head (log-softmax, marginalization over "
    "passages with their scores, top-k), one beam search per question. CTranslate2: translate_batch "
    "of the 5 contexts, beam 4, min = max decoding length: the same encoder and decoder work over "
    "5 x 4 rows, 5 independent beam searches, no marginalization (only our side does RAG's). Both force "
    "the checkpoint's BOS first (CTranslate2 as a one-token target prefix); rag_runtime also forces EOS "
    "at the last step (same decoder work)."
)
PAIRS = (("ctranslate2 fp32", "rag_runtime fp32"), ("ctranslate2 int8", "rag_runtime int8"),
         ("ctranslate2 int8", "rag_runtime fp32"))


def load_avg() -> float:
    return os.getloadavg()[0]


def prepare(workload: str) -> tuple[Path, dict[str, Path]]:
    """The workload checkpoint without a knowledge base and its fp32 and int8 exports (built once)."""
    from rag_export import export

    base = CACHE / f"{workload}-token-bart-contexts"
    ckpt = build_checkpoint(base / "checkpoint", workload, "token", "bart", index_type=None)
    exports = {}
    for side, name in RUNTIME_EXPORTS.items():
        out = base / name
        if not is_current(out):
            t0 = time.perf_counter()
            export(str(ckpt), out, force=True, include_index=False,
                   **({"quantize": "int8"} if side.endswith("int8") else {}))
            _log(f"{name} took {time.perf_counter() - t0:.1f}s")
        exports[side] = out
    return ckpt, exports


def workload_passages(workload: str) -> list[dict]:
    """The passages ``benchmarks.run``'s knowledge base adds by joining two corpus passages (about 100 words:
    at base dims a context is about 145 tokens); None (the corpus as is) for a workload without them."""
    from rag_testing.corpus import load_corpus

    joined = load_corpus(min_passages=WORKLOADS[workload]["passages"])
    return joined[len(load_corpus()):] or None


def _scratch_generator(ckpt: Path, scratch: Path) -> list[str]:
    """A BART checkpoint the converter accepts: the RAG generator's weights, its config with
    ``normalize_before`` (BART is post-norm), and a tokenizer whose vocabulary is as large as the model's.
    Returns the vocabulary (token per id)."""
    import torch
    from transformers import PreTrainedTokenizerFast, RagTokenForGeneration

    with torch.no_grad():
        generator = RagTokenForGeneration.from_pretrained(ckpt).generator
    generator.config.normalize_before = False
    generator.save_pretrained(scratch)
    tok = PreTrainedTokenizerFast.from_pretrained(ckpt / "generator_tokenizer")
    size = generator.config.vocab_size
    if len(tok) < size:  # placeholders up to the embedding size (the converter checks the two agree)
        tok.add_tokens([f"<unused_{i}>" for i in range(size - len(tok))], special_tokens=False)
    tok.save_pretrained(scratch)
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])][:size]
    if len(vocab) != size:
        raise RuntimeError(f"scratch vocabulary has {len(vocab)} tokens, the model {size}")
    return vocab


def convert_ct2(ckpt: Path, out_root: Path) -> tuple[dict[str, Path], list[str]]:
    """CTranslate2 models (fp32, int8) of the checkpoint's generator, converted once under ``out_root``."""
    import ctranslate2

    scratch = out_root / "scratch-generator"
    vocab_file = out_root / "vocab.json"
    models = {side: out_root / f"ct2-{ctype}" for side, ctype in CT2_TYPES.items()}
    if not (vocab_file.exists() and all((m / "model.bin").exists() for m in models.values())):
        shutil.rmtree(scratch, ignore_errors=True)
        vocab = _scratch_generator(ckpt, scratch)
        for side, ctype in CT2_TYPES.items():
            t0 = time.perf_counter()
            ctranslate2.converters.TransformersConverter(str(scratch)).convert(
                str(models[side]), quantization=ctype, force=True)
            _log(f"CTranslate2 {ctype} conversion took {time.perf_counter() - t0:.1f}s")
        vocab_file.write_text(json.dumps(vocab))
        shutil.rmtree(scratch, ignore_errors=True)
    return models, json.loads(vocab_file.read_text())


def _sides(exports: dict[str, Path], ct2_models: dict[str, Path], threads: int) -> tuple[dict, dict]:
    """Loaded sides by name, and each one's load time (directory to a model ready to answer)."""
    import ctranslate2

    from rag_runtime import RagPipeline, StageTimer

    sides, load_s = {}, {}
    for name, path in exports.items():
        t0 = time.perf_counter()
        sides[name] = ("runtime", RagPipeline.load(path, threads=threads, timer=StageTimer()))
        load_s[name] = time.perf_counter() - t0
    for name, path in ct2_models.items():
        t0 = time.perf_counter()
        sides[name] = ("ct2", ctranslate2.Translator(str(path), device="cpu", compute_type=CT2_TYPES[name],
                                                     intra_threads=threads, inter_threads=1))
        load_s[name] = time.perf_counter() - t0
    return sides, load_s


def _runner(sides: dict, vocab: list[str], params: dict, new_tokens: int, forced_bos: int | None):
    """``run(name, ids, mask, scores) -> (seconds, generated tokens per returned row)``. CTranslate2 gets
    the checkpoint's forced BOS as a one-token target prefix (rag_runtime forces it at the first step)."""
    prefix = [vocab[forced_bos]] if forced_bos is not None else None

    def run(name: str, ids: np.ndarray, mask: np.ndarray, scores: np.ndarray) -> tuple[float, list[int]]:
        kind, model = sides[name]
        if kind == "runtime":
            t0 = time.perf_counter()
            rows = model.generate_from_context(ids, mask, scores, **params)
            dt = time.perf_counter() - t0
            return dt, [int(rows.shape[1]) - 1]  # without the decoder start token
        source = [[vocab[t] for t in row[m.astype(bool)]] for row, m in zip(ids, mask, strict=True)]
        t0 = time.perf_counter()
        results = model.translate_batch(source, target_prefix=[prefix] * len(source) if prefix else None,
                                        beam_size=params["num_beams"], num_hypotheses=1,
                                        max_decoding_length=new_tokens, min_decoding_length=new_tokens,
                                        length_penalty=params["length_penalty"], return_end_token=True)
        dt = time.perf_counter() - t0
        return dt, [len(r.hypotheses[0]) for r in results]

    return run


def same_model_check(sides: dict, vocab: list[str], inputs: list[tuple], params: dict, new_tokens: int,
                     forced_bos: int | None) -> dict:
    """Both engines run the same model: from one context, greedy, RAG-Token is plain decoding, so rag_runtime
    fp32 and CTranslate2 fp32 must produce the same tokens (all but the last, which rag_runtime forces to EOS)."""
    index = {t: i for i, t in enumerate(vocab)}
    same = 0
    for ids, mask, scores in inputs:
        ours = sides["rag_runtime fp32"][1].generate_from_context(
            ids[:1], mask[:1], scores[:, :1], **{**params, "num_beams": 1, "n_docs": 1})[0, 1:].tolist()
        source = [vocab[t] for t in ids[0][mask[0].astype(bool)]]
        hyp = sides["ctranslate2 fp32"][1].translate_batch(
            [source], target_prefix=[[vocab[forced_bos]]] if forced_bos is not None else None, beam_size=1,
            max_decoding_length=new_tokens, min_decoding_length=new_tokens, return_end_token=True)[0].hypotheses[0]
        theirs = [index[t] for t in hyp]
        same += ours[:-1] == theirs[:-1]
    return {"greedy_one_context_same_tokens": same, "compared": len(inputs)}


def measure(sides: dict, run, inputs: list[tuple], rounds: int) -> dict:
    """Interleaved rounds (the order rotates per question); latency per question and side."""
    names = list(sides)
    for name in names:  # warm-up
        run(name, *inputs[0])
    for kind, model in sides.values():
        if kind == "runtime":
            model.timer.reset()
    lat = {name: [] for name in names}
    lengths = {name: set() for name in names}
    for r in range(rounds):
        for i, args in enumerate(inputs):
            k = (i + r) % len(names)
            for name in names[k:] + names[:k]:
                dt, n = run(name, *args)
                lat[name].append(dt)
                lengths[name].update(n)
    calls = len(inputs) * rounds
    out = {}
    for name, values in lat.items():
        kind, model = sides[name]
        out[name] = {"p50_ms": _pct(values, 50) * 1e3, "p90_ms": _pct(values, 90) * 1e3,
                     "mean_ms": statistics.fmean(values) * 1e3, "generated_tokens": sorted(lengths[name])}
        if kind == "runtime":
            out[name]["stages_ms"] = {k: v * 1e3 / calls for k, v in model.timer.totals.items()}
    ratios = {}
    for peer, ours in PAIRS:
        paired = [a / b for a, b in zip(lat[peer], lat[ours], strict=True)]
        ratios[f"{peer} / {ours}"] = {"p50_ratio": out[peer]["p50_ms"] / out[ours]["p50_ms"],
                                      "median_paired_ratio": float(np.median(paired))}
    return {"calls_per_side": calls, "sides": out, "ratios": ratios}


def markdown(report: dict) -> str:
    lines = [f"# {report['name']}", "", f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; threads {report['threads']} (onnxruntime intra-op, CTranslate2 "
             f"intra_threads); versions {report['versions']}", "",
             f"Load average (1 min): {report['load_avg_start']:.2f} at start, {report['load_avg_end']:.2f} at end",
             "", f"Workload: {report['workload']}", "", f"Work per side: {report['work']}", "",
             f"Same model on both engines (one context, greedy, all tokens but rag_runtime's forced final EOS): "
             f"{report['same_model_check']['greedy_one_context_same_tokens']}/{report['same_model_check']['compared']}"
             f" identical", "",
             "| side | p50 ms/question | p90 | mean | generated tokens | load s |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for name, s in report["result"]["sides"].items():
        lines.append(f"| {name} | {s['p50_ms']:.0f} | {s['p90_ms']:.0f} | {s['mean_ms']:.0f} | "
                     f"{', '.join(map(str, s['generated_tokens']))} | {report['load_s'][name]:.2f} |")
    lines += ["", "| ratio (peer time / ours; > 1: rag_runtime faster) | of p50s | median of paired runs |",
              "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v['p50_ratio']:.2f} | {v['median_paired_ratio']:.2f} |"
              for k, v in report["result"]["ratios"].items()]
    lines += ["", "rag_runtime per-stage time per question (ms):", "", "| side | " + " | ".join(STAGES) + " |",
              "| --- |" + " ---: |" * len(STAGES)]
    for name, s in report["result"]["sides"].items():
        if "stages_ms" in s:
            lines.append(f"| {name} | " + " | ".join(f"{s['stages_ms'].get(k, 0.0):.0f}" for k in STAGES) + " |")
    return "\n".join(lines) + "\n"


STAGES = ("generator_encode", "decode", "onnxruntime/generator_encoder", "onnxruntime/generator_decoder",
          "onnxruntime/rag_token_head")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = report["result"]["sides"]
    names = list(sides)
    p50 = [sides[n]["p50_ms"] for n in names]
    p90 = [sides[n]["p90_ms"] - sides[n]["p50_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = ["tab:blue" if n.startswith("rag_runtime") else "tab:orange" for n in names]
    ax.bar(names, p50, yerr=[[0] * len(names), p90], color=colors, capsize=4)
    ax.set_ylabel("ms per question (p50, bar to p90)")
    ax.set_title(report["name"])
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op = CTranslate2 intra_threads")
    p.add_argument("--plot", action="store_true", help="write a PNG chart")
    p.add_argument("--name", default=None, help="results file stem (default peers-<workload>)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ctranslate2
    import onnxruntime

    new_tokens = WORKLOADS[args.workload]["answer_tokens"]
    n = new_tokens + 1  # + the decoder start token
    params = dict(n_docs=N_DOCS, num_beams=4, num_return_sequences=1, max_length=n, min_length=n,
                  no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=True)
    ckpt, exports = prepare(args.workload)
    ct2_models, vocab = convert_ct2(ckpt, ckpt.parent)
    sides, load_s = _sides(exports, ct2_models, args.threads)
    any_pipe = sides["rag_runtime fp32"][1]
    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()][: args.questions]
    corpus = workload_passages(args.workload)
    inputs = [contexts(any_pipe, [q], seed=i, corpus=corpus) for i, q in enumerate(questions)]
    lengths = [int(m.sum(axis=1).mean()) for _, m, _ in inputs]
    start = load_avg()
    _log(f"{len(inputs)} questions x {args.rounds} rounds, load average {start:.2f}")
    forced_bos = any_pipe.manifest.generation_defaults.forced_bos_token_id
    same = same_model_check(sides, vocab, inputs[:3], params, new_tokens, forced_bos)
    _log(f"same model: {same}")
    result = measure(sides, _runner(sides, vocab, params, new_tokens, forced_bos), inputs, args.rounds)
    report = {
        "name": args.name or f"peers-{args.workload}",
        "command": "python -m benchmarks.peers " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_line(),
        "threads": args.threads,
        "versions": {"ctranslate2": ctranslate2.__version__, "onnxruntime": onnxruntime.__version__},
        "load_avg_start": start, "load_avg_end": load_avg(),
        "workload": f"{args.workload} BART generator (random weights), {N_DOCS} contexts per question of "
                    f"{min(lengths)}-{max(lengths)} tokens (mean per question), 4 beams, {new_tokens} new tokens "
                    f"(min = max length), batch 1, {len(inputs)} questions x {args.rounds} rounds",
        "work": WORK,
        "load_s": load_s,
        "same_model_check": same,
        "params": params,
        "result": result,
    }
    stem = write_results(args.out / report["name"], report, markdown(report))
    if args.plot:
        plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
