"""Make the demo checkpoint answer from its corpus: fit the retriever, train the generator.

    PYTHONPATH=. python scripts/train_demo.py demo_out/checkpoint   # once; demo-training.json marks it done

It builds the checkpoint with :func:`rag_testing.factory.make_checkpoint` (the bundled corpus, tiny tokenizers), with DPR
encoders of 256 dimensions (:data:`DPR_CONFIG`) and a BART generator of d_model 128
(:data:`GENERATOR_CONFIG`), then:

Retrieval. Both DPR encoders become bag-of-words encoders over the corpus: attention spread evenly over
the tokens (query and key weights zero, values and output passed through), the feed-forward blocks and
the second layer's attention off, every other embedding zero, and one random 256-dimensional vector per
word piece that occurs in at most 10% of the passages (frequent pieces and special tokens get zero).
The [CLS] output, DPR's embedding, is then the normalized mean of a text's rare pieces' vectors, and a
question scores highest against the passages that share its rare pieces. Gradient training of the
factory's random DPR encoders was tried first: after 1500 steps (12 minutes on the 2 shared cores) the
question encoder put the right article first for 11 of the 40 bundled questions; this setup puts it first
for all 40 (``scripts/data/question_sources.tsv``), without a step. The knowledge base is then embedded
again with the new context encoder.

Generation. ``benchmarks.int8_agreement``'s copy task: the generator, from its standard initialization,
learns to answer with its context's opening up to the first sentence end (``title / first sentence``),
for a few minutes on the corpus's passages (half of them with shuffled words, so that it copies rather
than recites). With the retriever's peaked scores RAG-Token follows the top passage, so the answer is
read off the passage retrieved first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

DPR_CONFIG = {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512}
GENERATOR_CONFIG = {"d_model": 128, "encoder_ffn_dim": 512, "decoder_ffn_dim": 512, "encoder_attention_heads": 4,
                    "decoder_attention_heads": 4}
RARE_PIECES = 0.10  # document frequency at most this: the pieces a bag-of-words embedding keeps
MARKER = "demo-training.json"


def piece_document_frequency(tok, passages: list[dict]) -> Counter:
    """In how many passages each word piece occurs (passages tokenized as DPR embeds them)."""
    enc = tok([p["title"] for p in passages], [p["text"] for p in passages], truncation=True, max_length=512)
    return Counter(piece for ids in enc.input_ids for piece in set(ids))


def bag_of_words(encoder, frequency: Counter, passages: int, special: list[int], seed: int) -> None:
    """Turn a DPR encoder (BERT, [CLS] output) into the bag-of-words encoder the module docstring describes."""
    import torch

    bert = encoder.state_dict()
    hidden = encoder.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in bert.items():
            if name.endswith("LayerNorm.weight"):
                value.fill_(1.0)
            else:
                value.zero_()
        vectors = torch.randn(encoder.config.vocab_size, hidden, generator=g)
        rare = torch.tensor([frequency[i] <= RARE_PIECES * passages and i not in special
                             for i in range(encoder.config.vocab_size)])
        vectors[~rare] = 0
        for name, value in bert.items():
            if name.endswith("word_embeddings.weight"):
                value.copy_(vectors)
            elif ("layer.0.attention.self.value.weight" in name or "layer.0.attention.output.dense.weight" in name):
                value.copy_(torch.eye(hidden))
    encoder.load_state_dict(bert)


def fit_retriever(ckpt: Path, seed: int = 0) -> dict:
    """Both encoders as bag-of-words encoders; the knowledge base embedded again; returns a record."""
    from transformers import DPRContextEncoder, DPRQuestionEncoderTokenizerFast, RagTokenForGeneration

    from rag_testing.corpus import load_corpus
    from rag_testing.factory import embed_knowledge

    passages = load_corpus()
    tok = DPRQuestionEncoderTokenizerFast.from_pretrained(ckpt / "question_encoder_tokenizer")
    frequency = piece_document_frequency(tok, passages)
    rag = RagTokenForGeneration.from_pretrained(ckpt)
    context = DPRContextEncoder.from_pretrained(ckpt / "context_encoder")
    for encoder in (rag.question_encoder, context):
        bag_of_words(encoder, frequency, len(passages), tok.all_special_ids, seed)
    rag.save_pretrained(ckpt)
    context.save_pretrained(ckpt / "context_encoder")
    embed_knowledge(ckpt, passages, context, tok, "Flat")
    kept = sum(1 for piece, n in frequency.items() if n <= RARE_PIECES * len(passages))
    return {"rare_pieces": kept, "pieces_seen": len(frequency), "max_document_frequency": RARE_PIECES}


def train(ckpt: Path, steps: int, minutes: float, seed: int = 0) -> dict:
    """Build the demo checkpoint at ``ckpt``, fit its retriever and train its generator; once: a checkpoint
    whose marker file records the same settings is kept as it is."""
    import shutil

    import torch
    from transformers import RagTokenForGeneration

    from benchmarks.int8_agreement import Training, train_generator
    from rag_testing.factory import make_checkpoint

    training = Training(d_model=GENERATOR_CONFIG["d_model"], layers=2, steps=steps, minutes=minutes, batch=8,
                        lr=2e-3, short=0.8, seed=seed, target="first_sentence")
    marker = ckpt / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == asdict(training):
        return json.loads(marker.read_text())
    t0 = time.perf_counter()
    shutil.rmtree(ckpt, ignore_errors=True)
    make_checkpoint(ckpt, "token", "bart", seed=seed, generator_config=GENERATOR_CONFIG, dpr_config=DPR_CONFIG)
    record = {"settings": asdict(training), "retriever": fit_retriever(ckpt, seed)}
    # One thread: on 2 cores shared with other jobs, two threads made each step 4x slower (0.8 against 0.2 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rag = RagTokenForGeneration.from_pretrained(ckpt)
    record["generator"] = train_generator(rag.generator, ckpt, training)
    torch.set_num_threads(threads)
    rag.save_pretrained(ckpt)
    record["seconds"] = time.perf_counter() - t0
    marker.write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="directory of the demo checkpoint (built, or kept when trained "
                        "with the same settings)")
    parser.add_argument("--steps", type=int, default=1000, help="generator training steps (8 examples each)")
    parser.add_argument("--minutes", type=float, default=15.0, help="at most this many minutes of generator "
                        "training, if the steps take longer")
    args = parser.parse_args(argv)
    record = train(args.checkpoint, args.steps, args.minutes)
    g = record["generator"]
    copies = g["greedy_exact_copies"]
    print(f"[train_demo] trained in {record['seconds']:.0f}s: generator {g['steps']} steps, loss "
          f"{g['first_loss']:.2f} -> {g['final_loss']:.2f}, exact copies {copies['real']['exact']}/"
          f"{copies['real']['compared']} (shuffled passages {copies['shuffled']['exact']}/"
          f"{copies['shuffled']['compared']}); retriever: {record['retriever']['rare_pieces']} rare word pieces",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
