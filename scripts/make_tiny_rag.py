"""Build a RAG checkpoint offline: tokenizers, random weights, a knowledge base and its faiss index.

The result loads through transformers' ``from_pretrained`` exactly like a hub checkpoint::

    python scripts/make_tiny_rag.py out/tiny-token --kind token --generator bart
    RagRetriever.from_pretrained("out/tiny-token")
    RagTokenForGeneration.from_pretrained("out/tiny-token", retriever=retriever)

Sizes: ``tiny`` (for tests), ``base`` (BART-base / DPR-base dimensions, vocab 50265, for benchmarks) and
``large`` (rag-token-nq dimensions: BART-large generator, DPR-base question encoder).
Weights are random but scaled so that generated sequences vary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import sys
import time
from collections import Counter
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CORPUS = DATA_DIR / "corpus.jsonl"

# (question encoder dims, generator dims); vocab sizes are what the trained tokenizers are padded to.
SIZES = {
    "tiny": {
        "dpr": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        "bart": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128),
        "t5": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
        "q_vocab": 1200, "g_vocab": 1500,
    },
    "base": {
        "dpr": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        "bart": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
        "t5": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
        "q_vocab": 30522, "g_vocab": 50265,
    },
    "large": {
        "dpr": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        "bart": dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                     decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096),
        "t5": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
        "q_vocab": 30522, "g_vocab": 50265,
    },
}


def _log(msg: str) -> None:
    print(f"[make_tiny_rag] {msg}", file=sys.stderr, flush=True)


def load_corpus(path: Path, min_passages: int = 0) -> list[dict]:
    """Read the JSONL corpus; if fewer than ``min_passages``, join neighbouring passages into longer ones."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    passages = [{"title": r["title"], "text": r["text"]} for r in rows]
    i = 0
    while len(passages) < min_passages:
        a, b = rows[i % len(rows)], rows[(i * 7 + 3) % len(rows)]
        passages.append({"title": a["title"], "text": f"{a['text']} {b['text']}"})
        i += 1
    return passages


def _pad_vocab(vocab: dict[str, int], size: int, filler: str) -> dict[str, int]:
    """Grow a vocab to exactly ``size`` entries with placeholder tokens (encoding never emits them)."""
    vocab = dict(vocab)
    i = 0
    while len(vocab) < size:
        token = f"{filler}{i}"
        if token not in vocab:
            vocab[token] = len(vocab)
        i += 1
    return vocab


def train_question_tokenizer(texts: list[str], vocab_size: int):
    """A WordPiece vocabulary learned by tokenizers' BPE trainer over ``▁word`` strings.

    WordPieceTrainer numbers its ``##x`` pieces in hash-map order, which decides ties between merges and
    so changes the vocabulary from run to run. BPE over a fixed alphabet is repeatable, and its pieces
    map onto WordPiece: ``▁ham`` -> ``ham``, ``let`` -> ``##let``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import DPRQuestionEncoderTokenizerFast

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = [f"▁{w}" for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))]
    alphabet = sorted((set("".join(words)) | set(string.digits + string.punctuation + string.ascii_lowercase)) - {"▁"})
    tok = Tokenizer(models.BPE())
    tok.train_from_iterator(words, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet + ["▁"],
                                                       min_frequency=1, show_progress=False))
    learned = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + alphabet + [f"##{c}" for c in alphabet]
    pieces += [p[1:] if p.startswith("▁") else f"##{p}" for p, _ in learned if len(p.lstrip("▁")) > 1]
    vocab = {}
    for p in pieces:
        if len(vocab) < vocab_size:
            vocab.setdefault(p, len(vocab))
    vocab = _pad_vocab(vocab, vocab_size, "[unused")
    return DPRQuestionEncoderTokenizerFast(vocab=vocab, do_lower_case=True)


def train_bart_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BartTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1,
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = _pad_vocab(model["vocab"], vocab_size - 1, "Ġplaceholder")
    vocab["<mask>"] = vocab_size - 1
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return BartTokenizerFast(vocab=vocab, merges=merges)


def train_t5_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
    )
    tok.train_from_iterator(texts, trainer)
    specials = [(p, 0.0) for p in ("<pad>", "</s>", "<unk>")]
    learned = {p for p, _ in json.loads(tok.to_str())["model"]["vocab"]} - {p for p, _ in specials}
    pieces = specials + _unigram_scores(learned, texts, tok.pre_tokenizer)
    seen = {p for p, _ in pieces}
    i = 0
    while len(pieces) < vocab_size:
        if f"▁placeholder{i}" not in seen:
            pieces.append((f"▁placeholder{i}", -30.0))
        i += 1
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _unigram_scores(pieces: set[str], texts: list[str], pre_tokenizer) -> list[tuple[str, float]]:
    """Log relative substring frequency of each piece over the corpus words, best first.

    The Unigram trainer keeps the same pieces every run, but its EM scores differ in the third decimal
    between runs (parallel float sums). Scoring the kept pieces from plain counts makes builds repeatable.
    """
    words = Counter(w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(t))
    longest = max(map(len, pieces))
    substrings = Counter()
    for word, n in words.items():
        for i in range(len(word)):
            for j in range(i + 1, min(len(word), i + longest) + 1):
                substrings[word[i:j]] += n
    total = sum(substrings[p] for p in pieces)
    scored = [(p, math.log(max(substrings[p], 0.5) / total)) for p in pieces]
    return sorted(scored, key=lambda ps: (-ps[1], ps[0]))


def _scale_weights(model, seed: int, gain: float, embed_std: float = 0.5) -> None:
    """Re-draw every matrix with std gain/sqrt(fan_in) so random models give peaked, varied logits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or not p.requires_grad:  # frozen: Marian's and Pegasus' sinusoidal positions
                continue
            fan_in = p.shape[-1]
            std = gain / fan_in**0.5
            if "relative_attention_bias" in name:
                std = 0.5
            elif "embed" in name or "shared" in name:
                std = embed_std
            elif any(k in name for k in ("q_proj", "k_proj", ".q.", ".k.")):
                std *= 2.0  # sharper attention: outputs then depend on which passage was retrieved
            p.copy_(torch.randn(p.shape, generator=g) * std)


GENERATORS = ("bart", "t5", "mbart", "marian", "pegasus")
# Std of the redrawn token embeddings. Pre-norm stacks (T5, mBART, Pegasus) keep the embedding in their
# residual stream to the end, and scaled embeddings (x sqrt(d_model)) are larger still: a large token
# embedding would dominate it and the model would repeat its input.
_EMBED_STD = {"bart": 0.5, "t5": 0.05, "mbart": 0.05, "marian": 0.1, "pegasus": 0.05}


def make_generator(generator: str, g_tok, spec: dict, overrides: dict):
    """The generator's config (``overrides`` applied last), the model, and its generation defaults.

    Special ids follow the real checkpoints of each family: BART and mBART start decoding from EOS and
    force BOS first (mBART-50 forces the target language token there); Marian and Pegasus start from
    the pad token.
    """
    import transformers

    ids = dict(pad_token_id=g_tok.pad_token_id, eos_token_id=g_tok.eos_token_id)
    no_dropout = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    beam = dict(num_beams=4, max_length=40, min_length=1, no_repeat_ngram_size=3, early_stopping=True)
    if generator == "t5":
        fields = dict(vocab_size=len(g_tok), **ids, decoder_start_token_id=g_tok.pad_token_id,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128, **spec["t5"])
        defaults = beam
    else:
        fields = dict(vocab_size=len(g_tok), max_position_embeddings=1024, forced_eos_token_id=g_tok.eos_token_id,
                      **ids, **no_dropout, **spec["bart"])
        start_from_pad = generator in ("marian", "pegasus")
        fields.update(
            decoder_start_token_id=g_tok.pad_token_id if start_from_pad else g_tok.eos_token_id,
            bos_token_id=None if start_from_pad else g_tok.bos_token_id,
        )
        # Each family's usual variant (the overrides try the others), with an untied head: random tied
        # weights make the model predict its input token again.
        fields.update(tie_word_embeddings=False, **{
            "bart": dict(scale_embedding=False),
            "mbart": dict(scale_embedding=True),
            "marian": dict(scale_embedding=True, activation_function="swish"),
            "pegasus": dict(scale_embedding=True, activation_function="relu"),
        }[generator])
        defaults = dict(beam, length_penalty=1.0, forced_eos_token_id=g_tok.eos_token_id)
        if not start_from_pad:
            defaults["forced_bos_token_id"] = g_tok.bos_token_id
    fields.update(overrides)
    names = {"t5": "T5", "bart": "Bart", "mbart": "MBart", "marian": "Marian", "pegasus": "Pegasus"}[generator]
    cfg = getattr(transformers, f"{names}Config")(**fields)
    if generator == "t5":
        cfg.prefix = "answer: "
    if getattr(cfg, "bos_token_id", None) is None:
        # RagSequenceForGeneration.get_nll reads config.generator.bos_token_id, which some configs lack.
        cfg.bos_token_id = None
    model_cls = getattr(transformers, "MarianMTModel" if generator == "marian" else f"{names}ForConditionalGeneration")
    return cfg, model_cls(cfg), defaults


def embed_knowledge(out: Path, passages: list[dict], ctx_model, q_tok, index_type: str) -> Path:
    """Embed ``passages`` with the DPR context encoder and write the knowledge base under ``out/knowledge``
    (a saved dataset and its faiss index, transformers' custom-knowledge layout); returns that directory."""
    import shutil

    import datasets
    import faiss
    import numpy as np
    import torch

    t0 = time.perf_counter()
    ctx_model.eval()
    embeddings = []
    with torch.no_grad():
        for i in range(0, len(passages), 64):
            chunk = passages[i : i + 64]
            # DPR passage encoding: "title [SEP] text", padding masked, segment ids all 0 (as rag-index
            # build embeds; transformers' RAG example passes input_ids alone, leaving padding unmasked).
            enc = q_tok([p["title"] for p in chunk], [p["text"] for p in chunk], truncation=True,
                        max_length=512, padding="longest", return_tensors="pt")
            embeddings.append(ctx_model(enc.input_ids, attention_mask=enc.attention_mask).pooler_output.numpy())
    emb = np.concatenate(embeddings).astype("float32")
    _log(f"embedded {len(passages)} passages in {time.perf_counter() - t0:.1f}s")

    kb_dir = (out / "knowledge").resolve()
    shutil.rmtree(kb_dir, ignore_errors=True)
    ds = datasets.Dataset.from_dict({
        "title": [p["title"] for p in passages],
        "text": [p["text"] for p in passages],
        "embeddings": [e for e in emb],
    })
    ds.save_to_disk(str(kb_dir / "passages"))
    index = faiss.index_factory(emb.shape[1], index_type, faiss.METRIC_INNER_PRODUCT)
    ds.add_faiss_index("embeddings", custom_index=index)
    ds.get_index("embeddings").save(str(kb_dir / "passages.faiss"))
    return kb_dir


def build(out: Path, kind: str, generator: str, size: str, corpus: Path, seed: int,
          n_passages: int, n_docs: int, index_type: str | None, generator_config: dict | None = None,
          logits_bias_std: float = 0.0, dpr_config: dict | None = None) -> None:
    """Write a RAG checkpoint to ``out``; ``generator_config`` overrides fields of the generator's config,
    ``dpr_config`` those of both DPR encoders, ``logits_bias_std`` draws a random ``final_logits_bias``
    (BART-like generators)."""
    import torch
    from transformers import (
        DPRConfig,
        DPRContextEncoder,
        DPRQuestionEncoder,
        GenerationConfig,
        RagConfig,
        RagSequenceForGeneration,
        RagTokenForGeneration,
        RagTokenizer,
    )

    torch.manual_seed(seed)
    spec = SIZES[size]
    passages = load_corpus(corpus, min_passages=n_passages)
    texts = [f"{p['title']} {p['text']}" for p in passages]
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    q_tok = train_question_tokenizer(texts, spec["q_vocab"])
    if generator == "t5":
        g_tok = train_t5_tokenizer(texts, spec["g_vocab"])
    else:  # the BART-like families share BART's byte-level BPE: <s>=0, <pad>=1, </s>=2
        g_tok = train_bart_tokenizer(texts, spec["g_vocab"])
    _log(f"tokenizers trained ({len(q_tok)} / {len(g_tok)} tokens) in {time.perf_counter() - t0:.1f}s")

    dpr_cfg = DPRConfig(vocab_size=len(q_tok), max_position_embeddings=512, projection_dim=0,
                        pad_token_id=q_tok.pad_token_id, **{**spec["dpr"], **(dpr_config or {})})
    gen_cfg, gen_model, gen_defaults = make_generator(generator, g_tok, spec, generator_config or {})
    q_model = DPRQuestionEncoder(dpr_cfg)
    ctx_model = DPRContextEncoder(dpr_cfg)
    _scale_weights(q_model, seed + 1, gain=1.0)
    _scale_weights(ctx_model, seed + 2, gain=1.0)
    _scale_weights(gen_model, seed + 3, gain=1.0, embed_std=_EMBED_STD[generator])
    if logits_bias_std:
        g = torch.Generator().manual_seed(seed + 4)
        gen_model.final_logits_bias.copy_(torch.randn(gen_model.final_logits_bias.shape, generator=g) * logits_bias_std)
    gen_model.generation_config = GenerationConfig(
        decoder_start_token_id=gen_cfg.decoder_start_token_id, pad_token_id=gen_cfg.pad_token_id,
        eos_token_id=gen_cfg.eos_token_id, bos_token_id=getattr(gen_cfg, "bos_token_id", None), **gen_defaults,
    )

    if index_type:
        # Knowledge base: passages embedded by the (random) DPR context encoder, exactly as a real one would be.
        kb_dir = embed_knowledge(out, passages, ctx_model, q_tok, index_type)
        rag_cfg = RagConfig.from_question_encoder_generator_configs(
            dpr_cfg, gen_cfg, n_docs=n_docs, max_combined_length=300, retrieval_vector_size=dpr_cfg.hidden_size,
            index_name="custom", passages_path=str(kb_dir / "passages"),
            index_path=str(kb_dir / "passages.faiss"), use_dummy_dataset=False,
        )
    else:  # no knowledge base (generation from supplied contexts only; needs neither faiss nor datasets)
        rag_cfg = RagConfig.from_question_encoder_generator_configs(dpr_cfg, gen_cfg, n_docs=n_docs,
                                                                    max_combined_length=300)
    cls = RagTokenForGeneration if kind == "token" else RagSequenceForGeneration
    model = cls(config=rag_cfg, question_encoder=q_model, generator=gen_model)
    if kind == "token":
        model.generation_config = GenerationConfig(
            decoder_start_token_id=gen_cfg.decoder_start_token_id, pad_token_id=gen_cfg.pad_token_id,
            eos_token_id=gen_cfg.eos_token_id, bos_token_id=getattr(gen_cfg, "bos_token_id", None),
            **gen_defaults,
        )
    model.save_pretrained(out)
    RagTokenizer(question_encoder=q_tok, generator=g_tok).save_pretrained(out)
    ctx_model.save_pretrained(out / "context_encoder")
    q_tok.save_pretrained(out / "context_encoder")
    _log(f"wrote rag-{kind} ({generator}, {size}) to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", type=Path, help="output checkpoint directory")
    parser.add_argument("--kind", choices=["token", "sequence"], default="token")
    parser.add_argument("--generator", choices=GENERATORS, default="bart")
    parser.add_argument("--generator-config", type=json.loads, default=None,
                        help='JSON object of generator config overrides, e.g. \'{"activation_function": "relu"}\'')
    parser.add_argument("--dpr-config", type=json.loads, default=None,
                        help='JSON object of overrides for both DPR encoders\' configs, e.g. \'{"hidden_size": 256}\'')
    parser.add_argument("--final-logits-bias-std", type=float, default=0.0,
                        help="draw final_logits_bias from N(0, std) (BART-like generators)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="JSONL with title and text")
    parser.add_argument("--passages", type=int, default=0, help="minimum passage count (longer ones are joined)")
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--index-type", default="Flat",
                        help="faiss factory string, or 'none' for no knowledge base (needs neither faiss nor datasets)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build(args.out, args.kind, args.generator, args.size, args.corpus, args.seed, args.passages,
          args.n_docs, None if args.index_type.lower() == "none" else args.index_type,
          generator_config=args.generator_config, logits_bias_std=args.final_logits_bias_std,
          dpr_config=args.dpr_config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
