#!/usr/bin/env python
"""Issue 11 part 2 -- RAG-Sequence divergence on an N(0,1)-weight BART checkpoint: reproduction + evidence.

Builds a tiny RAG-Sequence BART checkpoint (scripts/make_tiny_rag.py: tiny, Flat index, n_docs 5, seed 0),
re-draws every parameter with ndim >= 2 of the question encoder and generator from N(0, 1) (torch seed 1),
saves it with save_pretrained, exports it (validate=False), then for n_docs=3, num_beams=4,
num_return_sequences=3, no_repeat_ngram_size=2, max_length=12 on questions 36 and 37 of
scripts/data/questions.txt prints:
  A. runtime (both questions batched) vs reference (rag_export.reference: one question at a time) rows;
     reference rows of the batched call; runtime rows for the question alone;
  B. input checks (context ids, generation mask, cross K/V, doc ids/scores, n_docs used);
  C. the per-passage beam search candidates of both sides and the first step where the top-2k differ;
  D. replay: the runtime's beam_search + processors fed transformers' own per-step logits;
  E. fp64 PyTorch ground truth for the competing candidates, and the spread caused by fp32-rounding-sized
     noise injected into the fp64 model.

It instruments the runtime's internals as they were at commit b6be43c (the decoding code it traces has
not changed in behaviour since), so run it against a checkout of that commit:

    git worktree add /tmp/rag-b6be43c b6be43c
    python benchmarks/investigations/rag_sequence_near_tie.py --repo /tmp/rag-b6be43c --work /tmp/near-tie

Findings: benchmarks/results/rag-sequence-near-tie.md.
"""

import argparse
import copy
import importlib.util
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
ap = argparse.ArgumentParser()
ap.add_argument("--repo", required=True, help="a checkout of commit b6be43c")
ap.add_argument("--work", default="/tmp/rag-near-tie", help="scratch directory for the checkpoint and export")
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--pair", type=int, nargs=2, default=[36, 37])
ap.add_argument("--which", type=int, default=37)
args = ap.parse_args()
sys.path[:0] = [args.repo, os.path.join(args.repo, "runtime")]
from pathlib import Path  # noqa: E402 -- after --repo is on sys.path

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
T0 = time.time()
REPO, WORK = Path(args.repo), Path(args.work)
P = dict(n_docs=3, num_beams=4, num_return_sequences=3, no_repeat_ngram_size=2, max_length=12)
K = P["num_beams"]
QS = [q for q in (REPO / "scripts/data/questions.txt").read_text().splitlines() if q.strip()]


# ---------------------------------------------------------------- checkpoint + export
def build(seed):
    base, ck, ex = WORK / "base", WORK / f"spread{seed}", WORK / f"export{seed}"
    if not (base / "config.json").exists():
        spec = importlib.util.spec_from_file_location("make_tiny_rag", REPO / "scripts/make_tiny_rag.py")
        f = importlib.util.module_from_spec(spec)
        sys.modules["make_tiny_rag"] = f
        spec.loader.exec_module(f)
        f.build(
            base,
            "sequence",
            "bart",
            "tiny",
            f.DEFAULT_CORPUS,
            seed=0,
            n_passages=0,
            n_docs=5,
            index_type="Flat",
        )
    if not (ck / "done").exists():
        from transformers import RagSequenceForGeneration

        if ck.exists():
            shutil.rmtree(ck)
        shutil.copytree(base, ck)
        m = RagSequenceForGeneration.from_pretrained(str(base)).eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, t in m.named_parameters():
                if t.dim() >= 2 and ("question_encoder" in name or "generator" in name):
                    t.copy_(torch.randn(t.shape, generator=g))
        m.save_pretrained(str(ck))
        (ck / "done").write_text("ok")
    if not (ex / "manifest.json").exists():
        from rag_export import export

        export(str(ck), ex, force=True, validate=False)
    return ck, ex


def trim(row, eos=2, pad=1):
    t = [int(x) for x in row]
    for i in range(1, len(t)):
        if t[i] == eos:
            return t[: i + 1]
    while len(t) > 1 and t[-1] == pad:
        t.pop()
    return t


# ---------------------------------------------------------------- instrumented runs
def run_both(ck, ex, qa, qb, which):
    from transformers import LogitsProcessor, LogitsProcessorList

    import rag_runtime.decoding.processors as PR
    import rag_runtime.decoding.rag as RR
    import rag_runtime.pipeline as RP
    from rag_export.reference import Reference
    from rag_runtime import RagPipeline

    q = QS[which]
    ref = Reference(str(ck))
    gen = ref.model.generator
    T = {"steps": [], "raw": []}

    class Rec(LogitsProcessor):  # runs after transformers' own processors: the processed log-probs
        def __call__(self, input_ids, scores):
            T["steps"].append((input_ids.numpy().copy(), scores.numpy().copy()))
            return scores

    hook = gen.register_forward_hook(lambda m, a, o: T["raw"].append(o.logits[:, -1].float().numpy().copy()))
    orig = gen.generate

    def generate(input_ids, **kw):
        T["ctx"], T["kwargs"] = input_ids.numpy().copy(), dict(kw)
        with torch.no_grad():
            enc = gen.get_encoder()(input_ids=input_ids, attention_mask=None).last_hidden_state
            T["cross"] = [
                (layer.encoder_attn.k_proj(enc).numpy(), layer.encoder_attn.v_proj(enc).numpy())
                for layer in gen.model.decoder.layers
            ]
        out = orig(input_ids, logits_processor=LogitsProcessorList([Rec()]), **kw)
        T["cands"] = out.numpy().copy()
        return out

    gen.generate = generate
    r = ref.generate([q], **P)[0]
    gen.generate = orig
    hook.remove()
    T["raw"] = T["raw"][: len(T["steps"])]  # generation calls only; the rescoring forward comes after
    batched = ref.generate_ids([QS[qa], QS[qb]], **P).numpy()

    pipe = RagPipeline.load(ex, threads=1)
    R = {"steps": [], "enc": [], "rs": [], "cands": []}
    o_apply, o_encode, o_rs, o_bs = PR.apply, pipe.generator.encode, RP.rag_sequence, RR.beam_search

    def apply(settings, ids, scores):
        out = o_apply(settings, ids, scores)
        if ids.shape[1] == 1:
            R["steps"].append([])
        R["steps"][-1].append((ids.copy(), out.copy()))
        return out

    def encode(ids, mask):
        st = o_encode(ids, mask)
        R["enc"].append((ids.copy(), mask.copy(), st.keys.numpy().copy(), st.values.numpy().copy()))
        return st

    def rag_sequence(*a, **kw):
        R["rs"].append(a)
        return o_rs(*a, **kw)

    def beam_search(*a, **kw):
        out = o_bs(*a, **kw)
        R["cands"].append(out[0].copy())
        return out

    PR.apply, pipe.generator.encode, RP.rag_sequence, RR.beam_search = (
        apply,
        encode,
        rag_sequence,
        beam_search,
    )
    try:
        got = pipe.generate([QS[qa], QS[qb]], **P)
    finally:
        PR.apply, RP.rag_sequence, RR.beam_search = o_apply, o_rs, o_bs
        pipe.generator.encode = o_encode
    alone = pipe.generate([q], **P)[0]
    pos = [qa, qb].index(which)
    return dict(
        ref=r,
        ref_batched=batched[pos * 3 : (pos + 1) * 3],
        got=got[pos],
        alone=alone,
        T=T,
        R=R,
        pos=pos,
        pipe=pipe,
        ref_retrieval=ref.retrieve([q], P["n_docs"]),
        model=ref.model,
    )


def cum_scores(steps):
    """Per step (ids, processed log-probs, acc = log-probs + running score of each row's prefix); the running
    score is rebuilt from the recorded scores (first step: beam 0 at 0, the others at -1e9, as both do)."""
    cum, out = {}, []
    for t, (ids, lp) in enumerate(steps):
        run = np.array(
            [(0.0 if i % K == 0 else -1e9) if t == 0 else cum[tuple(row)] for i, row in enumerate(ids)],
            dtype=np.float32,
        )
        acc = lp + run[:, None]
        out.append((ids, acc))
        for i, row in enumerate(ids):
            for tok in np.argsort(-acc[i])[: 2 * K]:
                cum.setdefault(tuple(row) + (int(tok),), acc[i, tok])
    return out


def topcands(ids, acc, doc, n):
    rows = np.arange(doc * K, (doc + 1) * K)
    a, vocab = acc[rows].reshape(-1), acc.shape[1]
    return [
        (tuple(ids[rows[o // vocab]].tolist()) + (int(o % vocab),), float(a[o]))
        for o in np.argsort(-a, kind="stable")[:n]
    ]


def main():
    qa, qb = args.pair
    ck, ex = build(args.seed)
    print(f"[{time.time() - T0:.0f}s] checkpoint {ck}, export {ex}")
    res = run_both(ck, ex, qa, qb, args.which)
    T, R, pos, ref, got = res["T"], res["R"], res["pos"], res["ref"], res["got"]
    print(
        f"\n=== A. seed {args.seed}, questions {qa} {QS[qa]!r} + {qb} {QS[qb]!r} (runtime batched), traced "
        f"{args.which}; params {P}"
    )
    print("reference (alone)  :", [trim(x)[1:] for x in ref.sequences], np.round(ref.scores, 5).tolist())
    print(
        "runtime (batched)  :",
        [a.token_ids[1:] for a in got.answers],
        [round(a.score, 5) for a in got.answers],
    )
    print(
        "reference batched == reference alone:",
        [trim(x) for x in res["ref_batched"]] == [trim(x) for x in ref.sequences],
    )
    print(
        "runtime alone == runtime batched:",
        [a.token_ids for a in res["alone"].answers] == [a.token_ids for a in got.answers],
    )

    print("\n=== B. inputs")
    n = T["ctx"].shape[0]
    gids, gmask, gk, gv = R["enc"][1]
    rows = np.arange(pos * n, (pos + 1) * n)
    print("transformers generator.generate kwargs:", T["kwargs"])
    print(
        "generation context ids identical:",
        bool((gids[rows] == T["ctx"]).all()),
        "| width",
        gids.shape[1],
        "| runtime generation mask all ones:",
        bool(gmask.all()),
        "| transformers attention_mask:",
        T["kwargs"]["attention_mask"],
    )
    H = gk.shape[2]
    for li, (tk, tv) in enumerate(T["cross"]):

        def f(x):
            return x.reshape(x.shape[0], x.shape[1], H, -1).transpose(0, 2, 1, 3)

        print(
            f"cross K/V layer {li}: max|diff| {np.abs(f(tk) - gk[li][rows]).max():.3g} / {np.abs(f(tv) - gv[li][rows]).max():.3g}"
            f"  (max|K| {np.abs(tk).max():.3g})"
        )
    ids_ref, sc_ref = res["ref_retrieval"]
    a = R["rs"][0]
    print("doc ids    ref", ids_ref[0].tolist(), "runtime", [d.id for d in got.docs])
    print(
        "doc scores ref",
        np.round(sc_ref[0], 6).tolist(),
        "| runtime rescoring (configured n_docs):",
        np.round(a[2][pos], 6).tolist(),
        "| generation docs",
        a[-1],
    )

    print("\n=== C. per-passage beam search candidates (12 = 3 passages x 4 beams), transformers | runtime")
    rc = R["cands"][pos]
    for i in range(len(T["cands"])):
        t, r_ = T["cands"][i].tolist(), rc[i].tolist()
        print(f"  p{i // K} b{i % K}: {t[1:]}" + ("  (same)" if t == r_ else f"\n         runtime: {r_[1:]}"))
    ts, rs = cum_scores(T["steps"]), cum_scores(R["steps"][pos])
    first = None
    for t in range(min(len(ts), len(rs))):
        for d in range(n):
            tc, rc2 = topcands(*ts[t], d, 2 * K), topcands(*rs[t], d, 2 * K)
            if [c[0] for c in tc] != [c[0] for c in rc2]:
                first = (t, d, tc, rc2)
                break
        if first:
            break
    if first is None:
        print("no differing step")
        return
    t, d, tc, rc2 = first
    print(
        f"\nfirst differing step: {t} (cur_len {t + 1}), passage {d}; top-{2 * K} (score = processed log-prob + running):"
    )
    print(f"{'':>3} | {'transformers':<40} {'score':>10} | {'runtime':<40} {'score':>10}")
    for i in range(2 * K):
        print(
            f"{i:>3} | {str(tc[i][0][1:]):<40} {tc[i][1]:>10.6f} | {str(rc2[i][0][1:]):<40} {rc2[i][1]:>10.6f}"
        )

    print("\n=== D. replay: runtime beam_search + processors fed transformers' own raw logits")
    from rag_runtime.decoding import processors as PR
    from rag_runtime.decoding import search as S

    look = {
        (i // K,) + tuple(row.tolist()): logits
        for (ids, _), lg in zip(T["steps"], T["raw"], strict=False)
        for i, (row, logits) in enumerate(zip(ids, lg, strict=False))
    }
    proc = PR.ProcessorSettings(
        max_length=P["max_length"], no_repeat_ngram_size=2, forced_eos_token_id=2, eos_token_ids=(2,)
    )

    def step(seqs):
        return np.stack([look[(i // K,) + tuple(r.tolist())] for i, r in enumerate(seqs)])

    cands, _ = S.beam_search(
        S.host_candidates(step, proc),
        lambda rows: None,
        np.full((n * K, 1), 2, np.int64),
        proc,
        S.SearchSettings(K, K, 1.0, False, 1, (2,)),
    )
    print(
        "candidates identical to transformers':",
        cands.shape == T["cands"].shape and bool((cands == T["cands"]).all()),
    )

    print(
        f"\n=== E. fp64 ground truth at step {t}, passage {d} (teacher-forced, same unmasked 300-wide context)"
    )
    g32 = res["model"].generator
    g64 = copy.deepcopy(g32).double()
    ctx = torch.as_tensor(T["ctx"][d : d + 1])

    def score(model, cand):
        with torch.no_grad():
            lp = torch.log_softmax(
                model(input_ids=ctx, decoder_input_ids=torch.as_tensor([list(cand[:-1])])).logits[0], -1
            )
        return sum(float(lp[i, tok]) for i, tok in enumerate(cand[1:]))

    tmap = dict(topcands(*ts[t], d, 40))
    rmap = dict(topcands(*rs[t], d, 40))
    allc = sorted({c[0] for c in tc} | {c[0] for c in rc2}, key=lambda c: -score(g64, c))
    f64 = {c: score(g64, c) for c in allc}
    print(
        f"{'candidate':<40} {'torch fp32':>11} {'ORT fp32':>11} {'torch fp64':>11} {'t32-f64':>9} {'ort-f64':>9}"
    )
    for c in allc:
        print(
            f"{str(c[1:]):<40} {tmap.get(c, np.nan):>11.6f} {rmap.get(c, np.nan):>11.6f} {f64[c]:>11.6f} "
            f"{tmap.get(c, np.nan) - f64[c]:>+9.2e} {rmap.get(c, np.nan) - f64[c]:>+9.2e}"
        )
    swapped = [
        (x[0], y[0])
        for i, x in enumerate(tc)
        for y in tc[i + 1 :]
        if rmap.get(y[0], -np.inf) > rmap.get(x[0], -np.inf)
    ]
    g = torch.Generator().manual_seed(0)
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: o * (1 + 6e-8 * torch.randn(o.shape, generator=g, dtype=o.dtype))
        )
        for m in g64.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding))
    ]
    for A, B in swapped:
        print(
            f"\nswapped: A={A[1:]} B={B[1:]}\n  A-B: torch fp32 {tmap[A] - tmap[B]:+.6f} | ORT fp32 {rmap[A] - rmap[B]:+.6f}"
            f" | torch fp64 {f64[A] - f64[B]:+.6f}"
        )
        draws = np.array([[score(g64, A), score(g64, B)] for _ in range(50)])
        gap = draws[:, 0] - draws[:, 1]
        print(
            f"  fp64 + fp32-sized noise (x*(1+6e-8*N(0,1)) at every Linear/LayerNorm/Embedding output), 50 draws:\n"
            f"    A std {draws[:, 0].std():.2e} spread {np.ptp(draws[:, 0]):.2e}; B std {draws[:, 1].std():.2e} "
            f"spread {np.ptp(draws[:, 1]):.2e}; A-B in [{gap.min():+.4f}, {gap.max():+.4f}], A>B in {(gap > 0).sum()}/50"
        )
    for h in hooks:
        h.remove()
    if swapped:
        from transformers.modeling_outputs import BaseModelOutput

        A, B = swapped[0]
        with torch.no_grad():
            e32 = g32.get_encoder()(input_ids=ctx).last_hidden_state
            e64 = g64.get_encoder()(input_ids=ctx).last_hidden_state
        print(
            f"\nwhere torch fp32's error comes from (generator encoder output max|fp32-fp64| "
            f"{float((e32.double() - e64).abs().max()):.2e}, max|value| {float(e64.abs().max()):.2f}):"
        )

        def sc(model, e, cand):
            with torch.no_grad():
                lp = torch.log_softmax(
                    model(
                        encoder_outputs=BaseModelOutput(last_hidden_state=e),
                        decoder_input_ids=torch.as_tensor([list(cand[:-1])]),
                    )
                    .logits[0]
                    .double(),
                    -1,
                )
            return sum(float(lp[i, tok]) for i, tok in enumerate(cand[1:]))

        for name, model, e in [
            ("encoder fp32, decoder fp32", g32, e32),
            ("encoder fp64, decoder fp32", g32, e64.float()),
            ("encoder fp32, decoder fp64", g64, e32.double()),
            ("encoder fp64, decoder fp64", g64, e64),
        ]:
            a_, b_ = sc(model, e, A), sc(model, e, B)
            print(f"  {name}: A {a_:.6f} B {b_:.6f} A-B {a_ - b_:+.6f}")
    print(f"\n[{time.time() - T0:.0f}s] done")


if __name__ == "__main__":
    main()
