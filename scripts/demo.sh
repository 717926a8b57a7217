#!/usr/bin/env bash
# Set up .venv, build and train the demo RAG checkpoint on the bundled corpus (once, a few minutes; cached),
# export it, answer questions with their sources, and print parity against transformers and timings.
. "$(dirname "$0")/_env.sh" dev
out=${DEMO_DIR:-demo_out}
PYTHONPATH=. python scripts/train_demo.py "$out/checkpoint"
rag-export "$out/checkpoint" "$out/export" --force --context-encoder "$out/checkpoint/context_encoder"
PYTHONPATH=. python scripts/demo.py "$out/checkpoint" "$out/export"
