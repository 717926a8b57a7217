"""The RAG-Token head written three ways, timed in onnxruntime on the same logits.

    python -m benchmarks.investigations.rag_token_head --vocab 50265

- ``logsumexp`` (the head before this one): ``log_softmax`` per passage row + log-prior, ``logsumexp`` over
  passages written as max / exp / sum / log, then ``log_softmax`` of the marginal: two exponentials per
  element of [rows, vocab] and five passes over it;
- ``mixture`` (the head before the current one): ``softmax`` per row, the passages' mixture with their priors
  as one batched product, the log of the mixture over its sum over all of [beams, vocab]: one exponential
  per element, but a logarithm too;
- ``per-beam top-k`` (:class:`rag_export.graphs.heads.RagTokenHeadGraph`): the same mixture, each beam's
  top-k of it (the log is monotone), logs of those candidates only, one small top-k over the beams' best.

The first two ban, add the running scores and take the top-k over [beams * vocab]. Prints per shape
(questions x passages x beams) each variant's median ms, whether the candidates agree with the first's
and the largest score difference; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.run import host
from rag_export.graphs.heads import RagTokenHeadGraph, _top, export_args


class LogsumexpHead(torch.nn.Module):
    def forward(self, logits, doc_logprior, beam_scores, banned, top_k):
        batch, n_docs = doc_logprior.shape
        beams = beam_scores.shape[1]
        lp = torch.log_softmax(logits[:, -1].float().reshape(batch, n_docs, beams, -1), dim=-1)
        lp = lp + doc_logprior[:, :, None, None]
        top = lp.amax(dim=1, keepdim=True)
        marginal = ((lp - top).exp().sum(dim=1, keepdim=True).log() + top).squeeze(1)
        return _top(torch.log_softmax(marginal, dim=-1) + beam_scores[:, :, None], banned, top_k)


class MixtureHead(torch.nn.Module):
    def forward(self, logits, doc_logprior, beam_scores, banned, top_k):
        batch, n_docs = doc_logprior.shape
        beams = beam_scores.shape[1]
        probs = torch.softmax(logits[:, -1].float(), dim=-1).reshape(batch, n_docs, -1)
        weights = (doc_logprior - doc_logprior.amax(dim=1, keepdim=True)).exp()[:, None, :]
        mixture = torch.matmul(weights, probs).reshape(batch, beams, -1)
        lp = mixture.log() - mixture.sum(dim=-1, keepdim=True).log()
        return _top(lp + beam_scores[:, :, None], banned, top_k)


NAMES = ["logits", "doc_logprior", "beam_scores", "banned", "top_k"]
AXES = {"logits": {0: "rows"}, "doc_logprior": {0: "batch", 1: "n_docs"}, "beam_scores": {0: "batch", 1: "beams"},
        "banned": {0: "n_banned"}}


def session(module: torch.nn.Module, vocab: int, threads: int, tmp: Path):
    import onnxruntime as ort

    path = tmp / f"{type(module).__name__}.onnx"
    torch.onnx.export(module, export_args(vocab), str(path), input_names=NAMES, output_names=["scores", "ids"],
                      dynamic_axes=AXES, opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = threads, 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=50265)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args(argv)
    h = host()
    print(f"{h['cpus']} CPUs, {h['vector_isa']} ({h['cpu']}), 1-minute load {h['load_avg_1m']:.2f}; "
          f"threads {args.threads}, vocabulary {args.vocab}, median of {args.runs} runs")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"logsumexp": session(LogsumexpHead(), args.vocab, args.threads, Path(tmp)),
                    "mixture": session(MixtureHead(), args.vocab, args.threads, Path(tmp)),
                    "per-beam top-k": session(RagTokenHeadGraph(), args.vocab, args.threads, Path(tmp))}
        print("| questions x passages x beams | " + " | ".join(f"{n} ms" for n in variants)
              + " | same candidates | max score diff |")
        print("|---|" + "---|" * (len(variants) + 2))
        for batch, docs, beams in ((1, 5, 4), (4, 5, 4), (1, 20, 4), (1, 5, 1)):
            logits = (rng.standard_normal((batch * docs * beams, 1, args.vocab)) * 3).astype(np.float32)
            prior = torch.log_softmax(torch.from_numpy(rng.standard_normal((batch, docs)).astype(np.float32)), -1)
            feed = {"logits": logits, "doc_logprior": prior.numpy(),
                    "beam_scores": rng.standard_normal((batch, beams)).astype(np.float32),
                    "banned": np.array([0, 5], dtype=np.int64), "top_k": np.array([2 * beams], dtype=np.int64)}
            ms, out = {}, {}
            for name, s in variants.items():
                out[name] = s.run(None, feed)
                times = []
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times.append(time.perf_counter() - t0)
                ms[name] = statistics.median(times) * 1e3
            first = out["logsumexp"]
            same = all(bool((o[1] == first[1]).all()) for o in out.values())
            diff = max(float(np.abs(o[0] - first[0]).max()) for o in out.values())
            print(f"| {batch} x {docs} x {beams} | " + " | ".join(f"{v:.2f}" for v in ms.values())
                  + f" | {same} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
