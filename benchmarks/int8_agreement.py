"""int8 against fp32 on a generator trained to copy, for rag_runtime and CTranslate2 side by side.

    python -m benchmarks.int8_agreement --minutes 5 --questions 16          # by hand, not in CI

On random weights the next-token distributions are nearly flat, so int8 rounding flips answers and the
agreement says nothing about a real model. This builds (once per training setting, under
``.cache/bench/int8-trained/``) a RAG-Token checkpoint with the factory (tiny tokenizers and DPR, a BART
generator of ``--d-model`` / ``--layers``) and trains, on one thread, the generator for a few minutes on a
copy task over the bundled corpus (input: ``title / text // question`` exactly as the retriever builds it;
target: the context's start up to the first clause end) and the question encoder for about a minute (so
that questions retrieve different passages); saves both back into the checkpoint, exports it fp32,
``--quantize int8`` (question encoder fp32) and ``--quantize int8 --quantize-retrieval`` and converts its
generator to CTranslate2 fp32 and int8 (``benchmarks.peers``). Then:

1. the whole pipeline (retrieval, 5 passages, 4 beams) fp32 against both int8 exports: identical answers,
   same passages, score drift, first differing position; fp32 against transformers on a few questions;
2. per (question, supplied context) pair, one context, 4 beams, both engines: int8 against fp32, and
   rag_runtime fp32 against CTranslate2 fp32 (the same model); decoder logits drift under teacher forcing;
3. latency of the four sides (``benchmarks.peers.measure``: 5 contexts, 4 beams, fixed length).

Writes ``benchmarks/results/int8-agreement.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks import peers
from benchmarks.device import N_DOCS, contexts
from benchmarks.run import CACHE, QUESTIONS, RESULTS, _log, machine_line, write_results
from rag_testing.corpus import load_corpus
from rag_testing.factory import make_checkpoint

BENCH = CACHE / "int8-trained"
RETRIEVAL_EXPORT = "export-int8-retrieval"  # --quantize int8 --quantize-retrieval: the question encoder too
TARGET_WORDS = 16  # longest target: answers stay well inside MAX_LENGTH
MAX_LENGTH = 48
TIMED_TOKENS = 20
PARAMS = dict(n_docs=N_DOCS, num_beams=4, num_return_sequences=1, max_length=MAX_LENGTH, min_length=1,
              no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=True)


@dataclass(frozen=True)
class Training:
    """How the model is built and trained; a cached model made with other settings is rebuilt.

    Attributes:
        d_model: Generator width (heads of 64 dims, feed-forward 4 x d_model).
        layers: Encoder and decoder layers each.
        steps: Most optimizer steps.
        minutes: Most wall-clock minutes of training (whichever limit comes first).
        batch: Examples per step.
        lr: Peak AdamW learning rate (linear warm-up, then linear decay over the steps or minutes).
        shuffled: Share of training passages with their words shuffled (see :func:`examples`).
        short: Share of training contexts cut short (see :func:`examples`).
        retriever_steps: Question encoder training steps (see :func:`train_retriever`).
        seed: Seeds the factory, the initial weights and the example order.
        target: What the generator learns to copy from its context (a :data:`TARGETS` key).
    """

    d_model: int = 256
    layers: int = 3
    steps: int = 5000
    minutes: float = 5.0
    batch: int = 8
    lr: float = 1e-3
    shuffled: float = 0.5
    short: float = 0.5
    retriever_steps: int = 1500
    seed: int = 0
    target: str = "first_clause"

    def generator_config(self) -> dict:
        heads = max(1, self.d_model // 64)
        return dict(d_model=self.d_model, encoder_layers=self.layers, decoder_layers=self.layers,
                    encoder_attention_heads=heads, decoder_attention_heads=heads,
                    encoder_ffn_dim=4 * self.d_model, decoder_ffn_dim=4 * self.d_model)


def first_clause(text: str) -> str:
    """The passage's opening up to its first clause or sentence end, at most ``TARGET_WORDS`` words:
    copying it needs the passage (not the question), and the stop at punctuation is a learnable,
    sharp decision."""
    clause = re.split(r"[,.;:!?](?:\s|$)", text.strip(), maxsplit=1)[0]
    return " ".join(clause.split()[:TARGET_WORDS])


def first_sentence(text: str, words: int = 28) -> str:
    """The passage's opening up to its first sentence end, at most ``words`` words (the demo's answers:
    the retrieved passage's opening sentence, which tends to say what the passage is about)."""
    sentence = re.split(r"[.!?](?:\s|$)", text.strip(), maxsplit=1)[0]
    return " ".join(sentence.split()[:words])


TARGETS = {"first_clause": first_clause, "first_sentence": first_sentence}


def examples(ckpt: Path, seed: int, shuffled: float, short: float = 0.0, target=first_clause):
    """An endless stream of (generator input, target): a corpus passage with a random question from
    ``scripts/data/questions.txt``, contextualized with the checkpoint's separators as the runtime does;
    the target is ``target`` of the context (by default its start up to the first clause end:
    ``title / first clause``).

    In a ``shuffled`` share the passage's words are shuffled: 320 passages are few enough for the decoder
    to learn them by heart and ignore the input, and a shuffled target can only be copied. In a ``short``
    share the context is cut a few words after the target: over a short input the copy is learnt sooner
    (the full contexts teach the model to ignore the rest)."""
    from transformers import RagConfig

    from rag_runtime.contexts import contextualize

    cfg = RagConfig.from_pretrained(ckpt)
    passages = load_corpus()
    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()]
    prefix = getattr(cfg.generator, "prefix", None)
    rng = np.random.default_rng(seed)
    while True:
        p, q = passages[rng.integers(len(passages))], questions[rng.integers(len(questions))]
        text = p["text"]
        if rng.random() < shuffled:
            words = text.split()
            text = " ".join(words[i] for i in rng.permutation(len(words)))
        context = contextualize(p["title"], text, q, prefix, cfg.title_sep, cfg.doc_sep)
        answer = target(context)
        if rng.random() < short:
            context = " ".join(context.split()[: len(answer.split()) + int(rng.integers(0, 8))])
        yield context, answer


def _lr_factor(step: int, elapsed: float, training: Training) -> float:
    """Linear warm-up over the first 50 steps (fewer in short runs), then linear decay towards whichever
    limit (steps or minutes) is nearer."""
    warmup = min(50, max(1, training.steps // 10))
    progress = max(step / training.steps, elapsed / (training.minutes * 60))
    return min(1.0, (step + 1) / warmup) * max(0.05, 1.0 - progress)


def _initialize(gen, tok, stream, samples: int = 2000) -> None:
    """Standard initialization (the factory scales weights for varied output untrained), with
    ``final_logits_bias`` set to the targets' log unigram frequencies. BART's head has no trainable bias:
    without this the first steps turn the encoder's output into a constant that serves as one (the
    encoder collapses and the decoder never learns to read it)."""
    import torch
    from transformers import BartForConditionalGeneration

    gen.load_state_dict(BartForConditionalGeneration(gen.config).state_dict())
    counts = torch.ones(gen.config.vocab_size)
    for _ in range(samples):
        for i in tok(next(stream)[1]).input_ids[1:]:
            counts[i] += 1
    with torch.no_grad():
        gen.final_logits_bias.copy_(torch.log(counts / counts.sum())[None])


def _batch(tok, stream, size: int, max_length: int):
    inputs, targets = zip(*(next(stream) for _ in range(size)), strict=True)
    x = tok(list(inputs), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    labels = tok(list(targets), padding=True, return_tensors="pt").input_ids
    labels[labels == tok.pad_token_id] = -100
    return x, labels


def train(ckpt: Path, training: Training) -> dict:
    """Train the checkpoint's generator (:func:`train_generator`) and question encoder
    (:func:`train_retriever`) on one thread and save them back into the checkpoint, which
    ``RagTokenForGeneration.from_pretrained`` then loads like any other."""
    import torch
    from transformers import RagTokenForGeneration

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(training.seed)
    rag = RagTokenForGeneration.from_pretrained(ckpt)
    record = {"settings": asdict(training), **train_generator(rag.generator, ckpt, training),
              "retriever": train_retriever(rag.question_encoder, ckpt, training)}
    rag.save_pretrained(ckpt)
    torch.set_num_threads(threads)
    return record


def train_generator(gen, ckpt: Path, training: Training) -> dict:
    """AdamW on :func:`examples` until ``training.steps`` or ``training.minutes``; the loss is logged."""
    import torch
    from transformers import BartTokenizerFast, RagConfig

    tok = BartTokenizerFast.from_pretrained(ckpt / "generator_tokenizer")
    target = TARGETS[training.target]
    _initialize(gen, tok, examples(ckpt, training.seed + 1, training.shuffled, target=target))
    gen.train()
    opt = torch.optim.AdamW(gen.parameters(), lr=training.lr, weight_decay=0.01)
    stream = examples(ckpt, training.seed, training.shuffled, training.short, target)
    width = RagConfig.from_pretrained(ckpt).max_combined_length
    losses, t0 = [], time.perf_counter()
    while len(losses) < training.steps and time.perf_counter() - t0 < training.minutes * 60:
        for group in opt.param_groups:
            group["lr"] = training.lr * _lr_factor(len(losses), time.perf_counter() - t0, training)
        x, labels = _batch(tok, stream, training.batch, width)
        loss = gen(input_ids=x.input_ids, attention_mask=x.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            _log(f"step {len(losses)}: loss {statistics.fmean(losses[-50:]):.3f} "
                 f"({time.perf_counter() - t0:.0f}s)")
    gen.eval()
    return {"generator_parameters": sum(p.numel() for p in gen.parameters()), "steps": len(losses),
            "minutes": (time.perf_counter() - t0) / 60, "examples": len(losses) * training.batch,
            "first_loss": losses[0], "final_loss": statistics.fmean(losses[-20:]),
            "loss_every_50": [statistics.fmean(losses[i : i + 50]) for i in range(0, len(losses), 50)],
            "greedy_exact_copies": copy_check(gen, tok, ckpt, training.seed + 2, target=target)}


def _query(rng, title: str, text: str) -> str:
    """A corpus-derived question: a question word, a few of the passage's words and its title."""
    words = [w.strip(".,;:()\"'") for w in text.split()]
    picked = [words[i] for i in rng.choice(len(words), size=min(len(words), int(rng.integers(2, 6))),
                                               replace=False)]
    wh = ("who", "what", "when", "where", "which", "how")[rng.integers(6)]
    return f"{wh} {' '.join(picked)} {title}?".lower()


def train_retriever(encoder, ckpt: Path, training: Training, batch: int = 32) -> dict:
    """The factory's question encoder is random: every question retrieves about the same passages, and the
    whole pipeline would answer one case again and again. Train it (AdamW, ``training.retriever_steps``)
    to score the source passage of a :func:`_query` highest among all the stored passage embeddings; the
    knowledge base and the context encoder stay as built."""
    import datasets
    import torch
    from transformers import DPRQuestionEncoderTokenizerFast, RagConfig

    kb = datasets.load_from_disk(RagConfig.from_pretrained(ckpt).passages_path)
    emb = torch.tensor(np.asarray(kb["embeddings"]), dtype=torch.float32)
    titles, texts = list(kb["title"]), list(kb["text"])
    tok = DPRQuestionEncoderTokenizerFast.from_pretrained(ckpt / "question_encoder_tokenizer")
    rng = np.random.default_rng(training.seed + 3)
    opt = torch.optim.AdamW(encoder.parameters(), lr=3e-3)

    def loss_on(rows: np.ndarray) -> tuple[torch.Tensor, float]:
        x = tok([_query(rng, titles[i], texts[i]) for i in rows], padding=True, return_tensors="pt")
        scores = encoder(x.input_ids, attention_mask=x.attention_mask)[0] @ emb.T
        top5 = (scores.topk(5).indices == torch.as_tensor(rows)[:, None]).any(1).float().mean().item()
        return torch.nn.functional.cross_entropy(scores, torch.as_tensor(rows)), top5

    encoder.train()
    t0, losses = time.perf_counter(), []
    for _ in range(training.retriever_steps):
        loss, _ = loss_on(rng.integers(len(texts), size=batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    encoder.eval()
    with torch.no_grad():
        _, top5 = loss_on(rng.integers(len(texts), size=256))
    _log(f"question encoder: loss {losses[0]:.2f} -> {statistics.fmean(losses[-20:]):.2f}, source passage in the "
         f"top 5 for {top5:.0%} of new queries ({time.perf_counter() - t0:.0f}s)")
    return {"steps": len(losses), "minutes": (time.perf_counter() - t0) / 60, "first_loss": losses[0],
            "final_loss": statistics.fmean(losses[-20:]), "top5_new_queries": top5}


def copy_check(gen, tok, ckpt: Path, seed: int, n: int = 32, target=first_clause) -> dict:
    """Has it learnt the task? Greedy answers (transformers, up to 64 tokens: the longest targets fit)
    equal to the target on ``n`` new full-context examples, real passages and shuffled ones."""
    import torch

    out = {}
    for name, shuffled in (("real", 0.0), ("shuffled", 1.0)):
        stream, same = examples(ckpt, seed, shuffled, target=target), 0
        for _ in range(n):
            context, expected = next(stream)
            with torch.no_grad():
                ids = gen.generate(**tok([context], return_tensors="pt"), num_beams=1, max_length=64,
                                   min_length=0, no_repeat_ngram_size=0)
            same += tok.decode(ids[0], skip_special_tokens=True).strip() == expected.strip()
        out[name] = {"exact": same, "compared": n}
    return out


def prepare(training: Training, root: Path | None = None) -> tuple[Path, dict[str, Path], dict]:
    """The trained checkpoint, its fp32 and int8 exports (built once per ``training``) and the
    training record."""
    from rag_export import export

    base = (root or BENCH) / f"d{training.d_model}-l{training.layers}"
    record_file = base / "training.json"
    if not (record_file.exists() and json.loads(record_file.read_text())["settings"] == asdict(training)):
        shutil.rmtree(base, ignore_errors=True)
        _log(f"building the checkpoint in {base} (generator {training.generator_config()})")
        make_checkpoint(base / "checkpoint", "token", "bart", seed=training.seed, n_docs=N_DOCS,
                        generator_config=training.generator_config())
        _log(f"training for at most {training.steps} steps / {training.minutes} minutes")
        record = train(base / "checkpoint", training)
        for side, name in peers.RUNTIME_EXPORTS.items():
            t0 = time.perf_counter()
            export(str(base / "checkpoint"), base / name, force=True, include_index=True,
                   quantize="int8" if side.endswith("int8") else None)
            _log(f"{name} took {time.perf_counter() - t0:.1f}s")
        record_file.write_text(json.dumps(record, indent=2))
    if not (base / RETRIEVAL_EXPORT / "manifest.json").exists():  # also made on a checkpoint trained before it
        t0 = time.perf_counter()
        export(str(base / "checkpoint"), base / RETRIEVAL_EXPORT, force=True, include_index=True, quantize="int8",
               quantize_retrieval=True)
        _log(f"{RETRIEVAL_EXPORT} took {time.perf_counter() - t0:.1f}s")
    exports = {side: base / name for side, name in peers.RUNTIME_EXPORTS.items()}
    return base / "checkpoint", exports, json.loads(record_file.read_text())


def _first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length when one is a prefix); None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _compare(a: list[list[int]], b: list[list[int]], sa: list[float] | None = None,
             sb: list[float] | None = None) -> dict:
    """Identical rows, first differing positions, and score drift over all rows and over identical ones."""
    same = [x == y for x, y in zip(a, b, strict=True)]
    out = {"identical": sum(same), "compared": len(same),
           "first_diff": [d for x, y in zip(a, b, strict=True) if (d := _first_diff(x, y)) is not None]}
    if sa is not None:
        drift = [abs(x - y) for x, y in zip(sa, sb, strict=True)]
        kept = [d for d, s in zip(drift, same, strict=True) if s]
        out.update(score_drift_max=max(drift), score_drift_mean=statistics.fmean(drift),
                   score_drift_identical_max=max(kept, default=None),
                   score_drift_identical_mean=statistics.fmean(kept) if kept else None)
    return out


def _rag_rows(pipe, ids: np.ndarray, mask: np.ndarray, scores: np.ndarray) -> tuple[list[list[int]], list[float]]:
    """RAG-Token beam search over ``scores.shape[1]`` passages per question: generated tokens (without the
    decoder start) and scores."""
    gen = pipe.generator
    decoded = gen.run(gen.requests(ids, mask, scores, gen.options({**PARAMS, "n_docs": scores.shape[1]})))
    return [gen.trim(d.sequences[0])[1:] for d in decoded], [float(d.scores[0]) for d in decoded]


def _whole(a: list, b: list) -> dict:
    """Two exports' ``generate`` results on the same questions: answers, scores and retrieved passages."""
    tokens = [[r.answers[0].token_ids[1:] for r in out] for out in (a, b)]  # without the decoder start
    whole = _compare(*tokens, [r.answers[0].score for r in a], [r.answers[0].score for r in b])
    same_docs = [[d.id for d in x.docs] == [d.id for d in y.docs] for x, y in zip(a, b, strict=True)]
    whole["same_passages"] = sum(same_docs)
    whole["identical_with_same_passages"] = sum(s and x == y for s, x, y in zip(same_docs, *tokens, strict=True))
    return whole


def pipeline_agreement(fp32, int8, int8_retrieval, questions: list[str]) -> dict:
    """The whole pipeline, fp32 export against the int8 export (``--quantize int8``: its question encoder
    stays fp32, so retrieval should not change) and against one made with ``--quantize-retrieval`` too (its
    passages can differ: counted); the third row gives both generators fp32's retrieval (the same passages
    and doc scores, as ``generate`` builds them), which isolates the generator."""
    a, b = fp32.generate(questions, **PARAMS), int8.generate(questions, **PARAMS)
    tokens = [[r.answers[0].token_ids[1:] for r in out] for out in (a, b)]  # without the decoder start
    whole = _whole(a, b)
    quantized_retrieval = _whole(a, int8_retrieval.generate(questions, **PARAMS))
    q_ids, emb = fp32.question_encoder.encode(questions)
    doc_ids, doc_scores = fp32.retriever.search(emb, PARAMS["n_docs"])
    ids, mask = fp32.contextualizer.build(q_ids, doc_ids)
    rows = [_rag_rows(p, ids, mask, doc_scores) for p in (fp32, int8)]
    d = fp32.manifest.generation_defaults
    special = {*d.eos_token_id, d.pad_token_id, d.forced_bos_token_id, d.decoder_start_token_id}
    return {
        "whole pipeline": whole,
        "whole pipeline, question encoder int8": quantized_retrieval,
        "same retrieval": _compare(rows[0][0], rows[1][0], rows[0][1], rows[1][1]),
        "fp32_same_as_generate": rows[0][0] == tokens[0],
        "answer_tokens": sorted({len(t) for t in tokens[0]}),
        "distinct_answers": len({tuple(t) for t in tokens[0]}),
        "distinct_tokens": len({t for row in tokens[0] for t in row if t not in special}),
        "examples": [{"question": x.question, "fp32": x.answers[0].text, "int8": y.answers[0].text}
                     for x, y in zip(a[:4], b[:4], strict=True)],
    }


def reference_check(ckpt: Path, pipe, questions: list[str]) -> dict:
    """fp32 answers against transformers' generate on the trained checkpoint: the export is right."""
    from rag_testing.reference import Reference

    want = Reference(str(ckpt)).generate_ids(questions, **PARAMS).numpy()
    got = pipe.generate(questions, **PARAMS)
    same = sum([a.token_ids for a in r.answers] == [pipe.generator.trim(row)]
               for r, row in zip(got, want, strict=True))
    return {"identical": same, "compared": len(questions)}


def _runtime_rows(pipe, ids: np.ndarray, mask: np.ndarray) -> tuple[list[list[int]], list[float]]:
    """One beam search per context row (``n_docs=1``): generated tokens (without the decoder start) and
    beam scores. RAG-Token over one passage is plain beam search, what CTranslate2 runs."""
    return _rag_rows(pipe, ids, mask, np.zeros((len(ids), 1), np.float32))


def question_contexts(pipe, questions: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per question, ``N_DOCS`` supplied contexts (``benchmarks.device.contexts``) and passage scores.
    Built for all questions at once: called per question, that helper gives every question the same five
    passages, and the copy answers would repeat."""
    ids, mask, scores = contexts(pipe, questions)
    return [(ids[i * N_DOCS : (i + 1) * N_DOCS], mask[i * N_DOCS : (i + 1) * N_DOCS], scores[i : i + 1])
            for i in range(len(questions))]


def _ct2_rows(translator, vocab: list[str], ids: np.ndarray, mask: np.ndarray, forced_bos: int | None
              ) -> tuple[list[list[int]], list[float]]:
    """The same rows through CTranslate2 (the forced BOS as a one-token target prefix, as in peers)."""
    index = {t: i for i, t in enumerate(vocab)}
    source = [[vocab[t] for t in row[m.astype(bool)]] for row, m in zip(ids, mask, strict=True)]
    prefix = [[vocab[forced_bos]]] * len(source) if forced_bos is not None else None
    results = translator.translate_batch(source, target_prefix=prefix, beam_size=PARAMS["num_beams"],
                                         num_hypotheses=1, max_decoding_length=MAX_LENGTH - 1,
                                         length_penalty=PARAMS["length_penalty"], return_end_token=True,
                                         return_scores=True)
    return [[index[t] for t in r.hypotheses[0]] for r in results], [float(r.scores[0]) for r in results]


def context_agreement(sides: dict, vocab: list[str], inputs: list[tuple], forced_bos: int | None
                      ) -> tuple[dict, dict[str, list]]:
    """Per (question, context) pair, int8 against fp32 on each engine, and the engines against each other.
    Also returns every side's rows (rag_runtime fp32's feed :func:`logits_drift`)."""
    rows = {name: [] for name in sides}
    scores = {name: [] for name in sides}
    for ids, mask, _ in inputs:
        for name, (kind, model) in sides.items():
            r, s = (_runtime_rows(model, ids, mask) if kind == "runtime"
                    else _ct2_rows(model, vocab, ids, mask, forced_bos))
            rows[name] += r
            scores[name] += s
    pairs = {"rag_runtime int8 vs fp32": ("rag_runtime int8", "rag_runtime fp32"),
             "ctranslate2 int8 vs fp32": ("ctranslate2 int8", "ctranslate2 fp32"),
             "rag_runtime fp32 vs ctranslate2 fp32": ("rag_runtime fp32", "ctranslate2 fp32"),
             "rag_runtime int8 vs ctranslate2 int8": ("rag_runtime int8", "ctranslate2 int8")}
    out = {}
    for label, (a, b) in pairs.items():
        same_engine = a.split()[0] == b.split()[0]  # scores are comparable only within one engine
        out[label] = _compare(rows[a], rows[b], *((scores[a], scores[b]) if same_engine else ()))
    out["answer_tokens"] = sorted({len(r) for r in rows["rag_runtime fp32"]})
    out["distinct_answers"] = len({tuple(r) for r in rows["rag_runtime fp32"]})
    return out, rows


def logits_drift(fp32, int8, inputs: list[tuple], answers: list[list[int]]) -> dict:
    """fp32's one-context answers teacher-forced through both exports: how far int8 moves the logits and
    the answer's log-probabilities, and how often it keeps the top-1 token, at the positions that
    predict an answer token."""
    from rag_runtime.decoding.search import log_softmax

    start = fp32.manifest.generation_defaults.decoder_start_token_id
    diffs, logp, top1, scale = [], [], [], 0.0
    per_q = len(answers) // len(inputs)
    for i, (ids, mask, _) in enumerate(inputs):
        rows = [[start, *a] for a in answers[i * per_q : (i + 1) * per_q]]
        width = max(map(len, rows))
        tokens = np.array([r + [r[-1]] * (width - len(r)) for r in rows], dtype=np.int64)
        valid = np.array([[t < len(r) - 1 for t in range(width - 1)] for r in rows])
        a, b = (p.decoder_logits(ids, mask, tokens[:, :-1])[valid] for p in (fp32, int8))
        nxt = tokens[:, 1:][valid]
        diffs.append(np.abs(a - b).ravel())
        scale = max(scale, float(np.abs(a).max()))
        la, lb = log_softmax(a), log_softmax(b)
        logp.append(np.abs(la[np.arange(len(nxt)), nxt] - lb[np.arange(len(nxt)), nxt]))
        top1.append(a.argmax(1) == b.argmax(1))
    d, lp, t1 = np.concatenate(diffs), np.concatenate(logp), np.concatenate(top1)
    return {"positions": int(t1.size), "max_abs_logit_fp32": scale, "logit_diff_max": float(d.max()),
            "logit_diff_mean": float(d.mean()), "answer_logprob_diff_max": float(lp.max()),
            "answer_logprob_diff_mean": float(lp.mean()), "top1_same": int(t1.sum())}


def timing(sides: dict, vocab: list[str], inputs: list[tuple], rounds: int, forced_bos: int | None) -> dict:
    """``benchmarks.peers.measure`` on this model (5 contexts, 4 beams, exactly ``TIMED_TOKENS`` new tokens,
    interleaved), plus each engine's fp32 p50 / int8 p50."""
    n = TIMED_TOKENS + 1  # + the decoder start token
    params = {**PARAMS, "max_length": n, "min_length": n}
    result = peers.measure(sides, peers._runner(sides, vocab, params, TIMED_TOKENS, forced_bos), inputs, rounds)
    p50 = {name: s["p50_ms"] for name, s in result["sides"].items()}
    result["int8_speedup_p50"] = {engine: p50[f"{engine} fp32"] / p50[f"{engine} int8"]
                                  for engine in ("rag_runtime", "ctranslate2")}
    return result


def _drift(c: dict, key: str) -> str:
    mx, mean = c.get(f"{key}_max"), c.get(f"{key}_mean")
    return "" if mx is None else f"{mx:.4f} / {mean:.4f}"


def _agreement_rows(table: dict) -> list[str]:
    lines = ["| comparison | identical | score drift max / mean, all | same, identical answers | "
             "first differing token (0: the forced BOS) |", "| --- | ---: | ---: | ---: | --- |"]
    for label, c in table.items():
        if isinstance(c, dict):
            lines.append(f"| {label} | {c['identical']}/{c['compared']} | {_drift(c, 'score_drift')} | "
                         f"{_drift(c, 'score_drift_identical')} | {', '.join(map(str, c['first_diff'])) or '-'} |")
    return lines


def markdown(r: dict) -> str:
    lines = [f"# {r['name']}", "", f"Command: `{r['command']}`", "",
             f"Machine: {r['machine']}; threads {r['threads']}; versions {r['versions']}", "",
             "Load average (1 min): " + ", ".join(f"{k} {v:.2f}" for k, v in r["load_avg"].items()), "",
             f"Model: {r['model']}", ""]
    for part in (_training_lines, _pipeline_lines, _context_lines, _timing_lines):
        lines += part(r) + [""]
    return "\n".join(lines)


def _training_lines(r: dict) -> list[str]:
    t, rt = r["training"], r["training"]["retriever"]
    copies = ", ".join(f"{k} passages {v['exact']}/{v['compared']}" for k, v in t["greedy_exact_copies"].items())
    return [f"Training: {t['steps']} steps x {t['settings']['batch']} examples in {t['minutes']:.2f} min (one "
            f"thread, AdamW, peak lr {t['settings']['lr']}); loss {t['first_loss']:.2f} at the first step, "
            f"{t['final_loss']:.3f} over the last 20; every 50 steps: "
            + ", ".join(f"{v:.2f}" for v in t["loss_every_50"])
            + f". Greedy answers (transformers) equal to the target on new examples: {copies}.", "",
            f"Question encoder: {rt['steps']} steps in {rt['minutes']:.2f} min, loss {rt['first_loss']:.2f} -> "
            f"{rt['final_loss']:.2f}; the source passage is in the top 5 for {rt['top5_new_queries']:.0%} of new "
            "corpus-derived queries."]


def _pipeline_lines(r: dict) -> list[str]:
    p = r["pipeline"]
    w, qr = p["whole pipeline"], p["whole pipeline, question encoder int8"]
    lines = [f"## Whole pipeline ({w['compared']} questions, 5 passages, 4 beams, max_length {MAX_LENGTH})", "",
             f"fp32 export against transformers: {r['reference']['identical']}/{r['reference']['compared']} "
             f"identical. fp32 answers: {p['distinct_answers']} distinct, {p['distinct_tokens']} distinct tokens, "
             f"{p['answer_tokens'][0]}-{p['answer_tokens'][-1]} tokens long. The int8 export (question encoder fp32, "
             f"the default) retrieved the same passages (ids, in order) as fp32 for {w['same_passages']}/"
             f"{w['compared']} questions; with `--quantize-retrieval` for {qr['same_passages']}/{qr['compared']}, "
             f"{qr['identical_with_same_passages']} of those {qr['same_passages']} answers identical. \"Same "
             "retrieval\" gives both generators fp32's passages and doc scores.", ""]
    lines += _agreement_rows({"rag_runtime int8 vs fp32, whole pipeline": w,
                              "rag_runtime int8 + int8 question encoder vs fp32, whole pipeline": qr,
                              "rag_runtime int8 vs fp32, same retrieval": p["same retrieval"]})
    lines += ["", "| question | fp32 answer | int8 answer |", "| --- | --- | --- |"]
    return lines + [f"| {e['question']} | {e['fp32']} | {e['int8']} |" for e in p["examples"]]


def _context_lines(r: dict) -> list[str]:
    c, lg = r["contexts"], r["logits"]
    lines = [f"## One supplied context at a time ({c['rag_runtime int8 vs fp32']['compared']} (question, "
             "context) pairs, 4 beams, both engines)", "",
             "Scores are each engine's own (comparable within an engine only). rag_runtime fp32's answers: "
             f"{c['distinct_answers']} distinct, {c['answer_tokens'][0]}-{c['answer_tokens'][-1]} tokens long.", ""]
    lines += _agreement_rows(c)
    return lines + ["", f"Decoder logits, rag_runtime int8 against fp32, fp32's answers teacher-forced "
                    f"({lg['positions']} positions): max |diff| {lg['logit_diff_max']:.4f} (mean "
                    f"{lg['logit_diff_mean']:.4f}; fp32 logits up to {lg['max_abs_logit_fp32']:.1f}); the answer "
                    f"token's log-probability moves by at most {lg['answer_logprob_diff_max']:.4f} (mean "
                    f"{lg['answer_logprob_diff_mean']:.5f}); top-1 token the same at "
                    f"{lg['top1_same']}/{lg['positions']}."]


def _timing_lines(r: dict) -> list[str]:
    tm = r["timing"]
    lines = [f"## Latency ({tm['calls_per_side']} calls per side, 5 contexts, 4 beams, exactly {TIMED_TOKENS} "
             "new tokens, interleaved)", "", "| side | p50 ms/question | p90 | load s |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {r['load_s'][n]:.2f} |"
              for n, s in tm["sides"].items()]
    lines += ["", "fp32 p50 / int8 p50: " + ", ".join(f"{k} {v:.2f}x" for k, v in tm["int8_speedup_p50"].items())
              + "; CTranslate2 time / rag_runtime time (p50): "
              + ", ".join(f"{k} {v['p50_ratio']:.2f}" for k, v in tm["ratios"].items()), "",
              "rag_runtime per-stage time per question (ms):", "", "| side | " + " | ".join(peers.STAGES) + " |",
              "| --- |" + " ---: |" * len(peers.STAGES)]
    lines += [f"| {n} | " + " | ".join(f"{s['stages_ms'].get(k, 0.0):.1f}" for k in peers.STAGES) + " |"
              for n, s in tm["sides"].items() if "stages_ms" in s]
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = Training()
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--layers", type=int, default=d.layers, help="encoder and decoder layers each")
    p.add_argument("--steps", type=int, default=d.steps, help="most training steps")
    p.add_argument("--minutes", type=float, default=d.minutes, help="most training minutes")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--shuffled", type=float, default=d.shuffled, help="share of passages with shuffled words")
    p.add_argument("--short", type=float, default=d.short, help="share of contexts cut short")
    p.add_argument("--retriever-steps", type=int, default=d.retriever_steps, help="question encoder steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--reference", type=int, default=4, help="questions also answered by transformers")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op = CTranslate2 intra_threads")
    p.add_argument("--cache", type=Path, default=BENCH, help="where the checkpoint, exports and CT2 models go")
    p.add_argument("--name", default="int8-agreement", help="results file stem")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ctranslate2
    import onnxruntime
    import torch
    import transformers

    load = {"at start": peers.load_avg()}
    training = Training(d_model=args.d_model, layers=args.layers, steps=args.steps, minutes=args.minutes,
                        batch=args.batch, lr=args.lr, shuffled=args.shuffled, short=args.short,
                        retriever_steps=args.retriever_steps, seed=args.seed)
    ckpt, exports, record = prepare(training, args.cache)
    ct2_models, vocab = peers.convert_ct2(ckpt, ckpt.parent)
    sides, load_s = peers._sides(exports, ct2_models, args.threads)
    fp32, int8 = sides["rag_runtime fp32"][1], sides["rag_runtime int8"][1]
    from rag_runtime import RagPipeline

    int8_retrieval = RagPipeline.load(exports["rag_runtime fp32"].parent / RETRIEVAL_EXPORT, threads=args.threads)
    forced_bos = fp32.manifest.generation_defaults.forced_bos_token_id
    questions = [q for q in QUESTIONS.read_text().splitlines() if q.strip()][: args.questions]
    load["measuring"] = peers.load_avg()
    report = {
        "name": args.name,
        "command": "python -m benchmarks.int8_agreement " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_line(), "threads": args.threads,
        "versions": {"ctranslate2": ctranslate2.__version__, "onnxruntime": onnxruntime.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "model": f"RAG-Token, BART generator d_model {training.d_model}, {training.layers}+{training.layers} layers "
                 f"({record['generator_parameters'] / 1e6:.1f}M parameters, vocabulary {fp32.generator.backend.vocab}) "
                 "trained to copy its context's start (title / first clause); the factory's tiny DPR question "
                 "encoder (64 dims) trained to retrieve the source passage of corpus-derived queries",
        "training": record, "params": PARAMS,
        "reference": reference_check(ckpt, fp32, questions[: args.reference]),
        "pipeline": pipeline_agreement(fp32, int8, int8_retrieval, questions),
    }
    _log(f"pipeline: {report['pipeline']['whole pipeline']['identical']}/{len(questions)} identical; "
         f"reference {report['reference']}")
    inputs = question_contexts(fp32, questions)
    report["contexts"], rows = context_agreement(sides, vocab, inputs, forced_bos)
    report["logits"] = logits_drift(fp32, int8, inputs, rows["rag_runtime fp32"])
    load["timing"] = peers.load_avg()
    report["timing"] = timing(sides, vocab, inputs, args.rounds, forced_bos)
    load["at end"] = peers.load_avg()
    report.update(load_avg=load, load_s=load_s)
    write_results(args.out / args.name, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
