"""The checkpoint's tokenizers, trained on the corpus so that every build gives the same vocabulary."""

from __future__ import annotations

import json
import math
import string
from collections import Counter

from .families import generator_spec


def train_tokenizers(texts: list[str], generator: str, q_vocab: int, g_vocab: int):
    """The question encoder's WordPiece tokenizer and the generator's (byte-level BPE for the BART-like
    families: <s>=0, <pad>=1, </s>=2; unigram for T5), padded to ``q_vocab`` and ``g_vocab`` tokens."""
    q_tok = train_question_tokenizer(texts, q_vocab)
    if generator_spec(generator).layout == "t5":
        return q_tok, train_t5_tokenizer(texts, g_vocab)
    return q_tok, train_bart_tokenizer(texts, g_vocab)


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
    """BART's byte-level BPE with ``<mask>`` last, as the BART-like families' checkpoints have it."""
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
    """A unigram vocabulary over Metaspace words, its pieces scored from counts (:func:`_unigram_scores`)."""
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
