"""Build a RAG checkpoint offline: tokenizers, random weights, a knowledge base and its faiss index.

The result loads through transformers' ``from_pretrained`` exactly like a hub checkpoint::

    python scripts/make_tiny_rag.py out/tiny-token --kind token --generator bart
    RagRetriever.from_pretrained("out/tiny-token")
    RagTokenForGeneration.from_pretrained("out/tiny-token", retriever=retriever)

A command line over :func:`rag_testing.factory.make_checkpoint` (the ``dev`` install provides it).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rag_testing.corpus import CORPUS
from rag_testing.factory import SIZES, generators, make_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", type=Path, help="output checkpoint directory")
    parser.add_argument("--kind", choices=["token", "sequence"], default="token")
    parser.add_argument("--generator", choices=generators(), default="bart")
    parser.add_argument("--generator-config", type=json.loads, default=None,
                        help='JSON object of generator config overrides, e.g. \'{"activation_function": "relu"}\'')
    parser.add_argument("--dpr-config", type=json.loads, default=None,
                        help='JSON object of overrides for both DPR encoders\' configs, e.g. \'{"hidden_size": 256}\'')
    parser.add_argument("--final-logits-bias-std", type=float, default=0.0,
                        help="draw final_logits_bias from N(0, std) (BART-like generators)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="JSONL with title and text")
    parser.add_argument("--passages", type=int, default=0, help="minimum passage count (longer ones are joined)")
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--index-type", default="Flat",
                        help="faiss factory string, or 'none' for no knowledge base (needs neither faiss nor datasets)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    make_checkpoint(args.out, args.kind, args.generator, size=args.size, corpus=args.corpus, seed=args.seed,
                    n_passages=args.passages, n_docs=args.n_docs,
                    index_type=None if args.index_type.lower() == "none" else args.index_type,
                    generator_config=args.generator_config, dpr_config=args.dpr_config,
                    logits_bias_std=args.final_logits_bias_std)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
