"""Self-attention cache layouts for a decoder whose rows have different lengths (the engine's decoder),
measured before choosing one (export format 4).

    python -m benchmarks.investigations.decoder_cache_layouts --rows 20 160 --lengths 16 64 200

Three layouts, each as a stack of ``--layers`` self-attention layers at the base decoder's dimensions
(12 heads of 64), one decode step (one new token per row), rows of mixed lengths up to ``length``, every
row's parent changed by the beam search (the worst case; a permutation):

- ``concat`` (format 3's cache, made ragged): the graph takes each layer's past [rows, H, P, d]
  (P = the longest row, shorter rows left-padded and masked), gathers its rows by ``beam_idx`` (which also
  expresses joins and leaves), appends the new key and value and returns the whole present: two copies of
  the cache per layer and step inside the graph, and a fresh output allocation.
- ``host reorder`` (preallocated slots): the cache is a host buffer [rows, H, W, d] per layer that the graph
  only reads (W = the longest row rounded up to a chunk of 16; each row masks the positions past its own
  length); the graph returns only the new keys and values, which the host writes at each row's position,
  and the host moves the rows whose parent changed with numpy.
- ``gather`` (preallocated slots, ping-pong): as ``host reorder``, but the graph gathers the rows by
  ``beam_idx`` itself (joins and leaves included) into the other of two preallocated buffers, bound as its
  output, attends over that, and the host writes the new key and value into it: one copy per layer and
  step, multithreaded in onnxruntime, no allocation.

The FFN, cross-attention and LM head are the same in all and are left out. Prints the step time of each;
writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HEADS, HEAD_DIM = 12, 64


class _Attend(nn.Module):
    def __init__(self, layers: int, mode: str):
        super().__init__()
        d = HEADS * HEAD_DIM
        self.layers, self.mode = layers, mode
        self.q = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.k = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.v = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, h, lengths, beam_idx, *cache):
        rows = h.shape[0]
        keys, values = cache[: self.layers], cache[self.layers :]
        width = keys[0].shape[2]
        pos = torch.arange(width)[None, :]
        # slots: valid positions are 0..length-1; concat: the last `length` of the padded past.
        valid = pos >= (width - lengths)[:, None] if self.mode == "concat" else pos < lengths[:, None]
        bias = torch.where(valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
        new, kept = [], []
        for i in range(self.layers):
            q = self.q[i](h).reshape(rows, 1, HEADS, HEAD_DIM).transpose(1, 2)
            k = self.k[i](h).reshape(rows, 1, HEADS, HEAD_DIM).transpose(1, 2)
            v = self.v[i](h).reshape(rows, 1, HEADS, HEAD_DIM).transpose(1, 2)
            past_k, past_v = keys[i], values[i]
            if self.mode != "host":
                past_k, past_v = past_k.index_select(0, beam_idx), past_v.index_select(0, beam_idx)
            if self.mode == "concat":
                full_k, full_v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                b = torch.cat([bias, torch.zeros(rows, 1, 1, 1)], dim=-1)
                ctx = torch.matmul(torch.softmax(torch.matmul(q, full_k.transpose(-1, -2)) + b, dim=-1), full_v)
                kept += [full_k, full_v]
            else:
                scores = torch.cat([torch.matmul(q, past_k.transpose(-1, -2)) + bias,
                                    torch.matmul(q, k.transpose(-1, -2))], dim=-1)
                p = torch.softmax(scores, dim=-1)
                ctx = torch.matmul(p[..., :width], past_v) + p[..., width:] * v
                new += [k, v]
                if self.mode == "gather":
                    kept += [past_k, past_v]
            h = h + ctx.transpose(1, 2).reshape(rows, 1, HEADS * HEAD_DIM)
        return (h, *kept, *new)


def _names(mode: str, layers: int) -> tuple[list[str], list[str]]:
    kept = [f"kept.{i}" for i in range(2 * layers)] if mode != "host" else []
    new = [f"new.{i}" for i in range(2 * layers)] if mode != "concat" else []
    return kept, new


def _export(mode: str, path: Path, layers: int) -> None:
    h = torch.randn(4, 1, HEADS * HEAD_DIM)
    cache = [torch.randn(4, HEADS, 3, HEAD_DIM) for _ in range(2 * layers)]
    past = [f"past.{i}" for i in range(2 * layers)]
    kept, new = _names(mode, layers)
    inputs = ["h", "lengths", *(["beam_idx"] if mode != "host" else []), *past]
    args = (h, torch.tensor([3, 2, 1, 3]), torch.arange(4), *cache)
    axes = {n: {0: "rows"} for n in ("h", "out", "lengths", "beam_idx")}
    axes.update({n: {0: "rows", 2: "len"} for n in past + kept + new})
    module = _Attend(layers, mode).eval()
    if mode == "host":  # the tracer drops an unread input: give it none
        forward = module.forward
        module.forward = lambda h, lengths, *cache: forward(h, lengths, None, *cache)
        args = (h, torch.tensor([3, 2, 1, 3]), *cache)
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=["out", *kept, *new],
                      dynamic_axes={k: v for k, v in axes.items() if k in inputs + ["out", *kept, *new]},
                      opset_version=17, dynamo=False)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _time(fn, steps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1000


MODES = ("concat", "host", "gather")


def measure(rows: int, length: int, layers: int, threads: int, tmp: Path, steps: int) -> dict[str, float]:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, length + 1, rows)
    lengths[0] = length
    h = rng.standard_normal((rows, 1, HEADS * HEAD_DIM)).astype(np.float32)
    perm = rng.permutation(rows)
    width = -(-(length + 1) // 16) * 16
    past_names = [f"past.{i}" for i in range(2 * layers)]
    results = {}
    for mode in MODES:
        path = tmp / f"{mode}-{layers}.onnx"
        if not path.exists():
            _export(mode, path, layers)
        sess = _session(path, threads)
        kept, new = _names(mode, layers)
        if mode == "concat":
            past = [rng.standard_normal((rows, HEADS, length, HEAD_DIM)).astype(np.float32) for _ in past_names]

            def step(past=past, sess=sess):
                sess.run(None, {"h": h, "lengths": lengths, "beam_idx": perm, **dict(zip(past_names, past, strict=True))})
        elif mode == "host":
            bufs = [rng.standard_normal((rows, HEADS, width, HEAD_DIM)).astype(np.float32) for _ in past_names]
            row_ids = np.arange(rows)

            def step(bufs=bufs, sess=sess, row_ids=row_ids):
                outs = sess.run(None, {"h": h, "lengths": lengths, **dict(zip(past_names, bufs, strict=True))})
                for buf, k in zip(bufs, outs[1:], strict=True):
                    buf[:, :, :length] = buf[perm, :, :length]
                    buf[row_ids, :, lengths] = k[:, :, 0]
        else:
            pair = [[rng.standard_normal((rows, HEADS, width, HEAD_DIM)).astype(np.float32) for _ in past_names]
                    for _ in range(2)]
            row_ids = np.arange(rows)
            state = {"cur": 0}

            def step(pair=pair, sess=sess, kept=kept, new=new, row_ids=row_ids, state=state):
                cur, nxt = pair[state["cur"]], pair[1 - state["cur"]]
                io = sess.io_binding()
                io.bind_cpu_input("h", h)
                io.bind_cpu_input("lengths", lengths)
                io.bind_cpu_input("beam_idx", perm)
                for name, buf in zip(past_names, cur, strict=True):
                    io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf))
                for name, buf in zip(kept, nxt, strict=True):
                    io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buf))
                io.bind_output("out", "cpu")
                for name in new:
                    io.bind_output(name, "cpu")
                sess.run_with_iobinding(io)
                for buf, k in zip(nxt, io.get_outputs()[1 + len(kept):], strict=True):
                    buf[row_ids, :, lengths] = k.numpy()[:, :, 0]
                state["cur"] = 1 - state["cur"]
        results[mode] = _time(step, steps)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[20, 160])
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 200])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    from benchmarks.run import host

    h = host()
    print("# Self-attention cache layouts for rows of different lengths (one decode step)\n")
    print("`python -m benchmarks.investigations.decoder_cache_layouts "
          + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n")
    print(f"{h['cpus']} CPUs, {h['vector_isa']} ({h['cpu']}), 1-minute load {h['load_avg_1m']:.2f} at the start; "
          f"{args.layers} layers of 12 heads x 64, threads {args.threads}, best of 3 x {args.steps} steps.\n")
    print("| rows | longest row | " + " | ".join(f"{m} ms/step" for m in MODES) + " |")
    print("|---|---|" + "---|" * len(MODES))
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            for length in args.lengths:
                r = measure(rows, length, args.layers, args.threads, Path(tmp), args.steps)
                print(f"| {rows} | {length} | " + " | ".join(f"{r[m]:.2f}" for m in MODES) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
