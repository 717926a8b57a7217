#!/usr/bin/env bash
# Set up .venv (from nothing but python3) and run the linter and the test suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k parity
. "$(dirname "$0")/_env.sh" dev
echo "== ruff" >&2
ruff check .
echo "== benchmark smoke (tiny model; fails if any answer differs from transformers, speed is informative)" >&2
python -m benchmarks.run --workload tiny --questions 3 --batch 1 --require-identical --name ci-smoke \
  --out .cache/bench/results
echo "== pytest" >&2
python -m pytest -q "$@"
