# Sourced by the entry-point scripts: create .venv if missing and install the project into it.
# usage: . scripts/_env.sh EXTRAS    (e.g. "dev"; with dev, also the test support testing/, as rag-testing)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.installed-$1-$(cat pyproject.toml testing/pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing rag-export[$1] (torch==2.13.0 CPU, transformers, onnxruntime, faiss)..." >&2
  python -m pip install -q --upgrade pip
  python -m pip install -q -c requirements/constraints.txt -e ".[$1]"
  case ",$1," in
    *,dev,*) python -m pip install -q --no-deps -e testing ;;
  esac
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
  HF_HUB_DISABLE_PROGRESS_BARS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
