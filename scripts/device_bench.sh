#!/usr/bin/env bash
# On the accelerator machine, after the onnxruntime-gpu parts are assembled in /tmp (scripts/device_wheels.sh):
# install it beside the image's packages, check the CUDA provider, then measure.
#
#   bash scripts/device_bench.sh [benchmarks.device arguments]     (results go to $OUT, or benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=$(ls /tmp/onnxruntime_gpu-*.whl 2>/dev/null | head -1 || true)
if [ ! -d /tmp/site/onnxruntime ]; then
  [ -n "$wheel" ] || { echo "no /tmp/onnxruntime_gpu-*.whl: send the parts first (scripts/device_wheels.sh)" >&2; exit 2; }
  (cd /tmp && sha256sum -c "$OLDPWD/.device/parts/$(basename "$wheel").sha256")
  python3 -m pip install --quiet --no-deps --target /tmp/site "$wheel"
fi
export PYTHONPATH=/tmp/site:$PWD/runtime:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import onnxruntime as o; p = o.get_available_providers(); print(o.__version__, p); assert 'CUDAExecutionProvider' in p"
python3 -m benchmarks.device --device cuda --out "${OUT:-benchmarks/results}" "$@"
