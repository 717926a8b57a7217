#!/usr/bin/env bash
# Prepare onnxruntime-gpu for an accelerator machine that cannot download anything: fetch the wheel
# (CUDA 13 build, Python 3.12, x86_64; the image's torch brings CUDA 13 and cuDNN 9) and cut it into
# parts of at most 60 MiB, so each part fits one device call next to the working tree.
#
#   bash scripts/device_wheels.sh              -> .device/parts/<wheel>.part-aa, -ab, ... and <wheel>.sha256
#
# On the device, one call per part (back to back: the machine is held ~30 s between calls), carrying
# that part:     cat .device/parts/<wheel>.part-XX >> /tmp/<wheel>
# then:          cd /tmp && sha256sum -c <repo>/.device/parts/<wheel>.sha256 \
#                  && pip install --no-deps --target /tmp/site /tmp/<wheel>
# and run with PYTHONPATH=/tmp/site:runtime:. (see README, "Devices, IOBinding and fp16").
set -euo pipefail
cd "$(dirname "$0")/.."
version=${ORT_GPU_VERSION:-1.31.1}
dir=.device
mkdir -p "$dir/wheel" "$dir/parts"
python3 -m pip download "onnxruntime-gpu==$version" --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d "$dir/wheel" >&2
wheel=$(ls "$dir"/wheel/onnxruntime_gpu-"$version"-*.whl)
name=$(basename "$wheel")
rm -f "$dir/parts/$name".part-*
split -b 60M "$wheel" "$dir/parts/$name.part-"
(cd "$dir/wheel" && sha256sum "$name") > "$dir/parts/$name.sha256"
ls -l "$dir/parts"
