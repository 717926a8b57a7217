#!/usr/bin/env bash
# Set up .venv, build the demo RAG checkpoint (random weights, bundled corpus), export it, answer questions
# with their sources, and print parity against transformers and timings.
. "$(dirname "$0")/_env.sh" dev
out=${DEMO_DIR:-demo_out}
if [ ! -f "$out/checkpoint/config.json" ]; then
  python scripts/make_tiny_rag.py "$out/checkpoint" --kind token --generator bart
fi
rag-export "$out/checkpoint" "$out/export" --force --context-encoder "$out/checkpoint/context_encoder"
PYTHONPATH=. python scripts/demo.py "$out/checkpoint" "$out/export"
