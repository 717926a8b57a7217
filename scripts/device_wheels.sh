#!/usr/bin/env bash
# Prepare onnxruntime-gpu for an accelerator machine that cannot download anything: fetch the wheel (CUDA 13
# build, Python 3.12, x86_64; the image's torch brings CUDA 13 and cuDNN 9) and cut it into 4 parts, each small
# enough to travel in one device call beside the working tree (64 MiB in all), then print the device calls.
#
#   bash scripts/device_wheels.sh [WHEEL]   -> $RAG_DEVICE_PARTS (default .device/parts)/<wheel>.part-N-of-4
#
# Each call copies its part to a numbered file on the device (scripts/device_bench.sh part), so a retried call
# replaces the file instead of appending to it; the measuring call joins the parts, checks the wheel's sha256
# given on its command line and installs it with --no-deps --no-compile (README, "Devices, IOBinding and fp16").
set -euo pipefail
cd "$(dirname "$0")/.."
parts=4
limit=$((64 * 1024 * 1024))
out=${RAG_DEVICE_PARTS:-.device/parts}
if [ $# -ge 1 ]; then
  wheel=$1
else
  version=${ORT_GPU_VERSION:-1.31.1}
  mkdir -p .device/wheel
  python3 -m pip download "onnxruntime-gpu==$version" --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d .device/wheel >&2
  wheel=$(ls .device/wheel/onnxruntime_gpu-"$version"-*.whl)
fi
name=$(basename "$wheel")
size=$(stat -c %s "$wheel")
chunk=$(( (size + parts - 1) / parts ))
# What travels with every call: tracked files and untracked files git does not ignore (README of the device tool).
tree=$(git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s | awk '{s += $1} END {print s + 0}')
if (( chunk + tree > limit )); then
  echo "a part ($chunk bytes) and the working tree ($tree bytes) exceed the $limit bytes one device call carries:" \
       "commit or remove large untracked files first" >&2
  exit 2
fi
rm -rf "$out"
mkdir -p "$out"
split -n "$parts" --numeric-suffixes=1 -a 1 "$wheel" "$out/$name.part-"
for i in $(seq 1 "$parts"); do mv "$out/$name.part-$i" "$out/$name.part-$i-of-$parts"; done
wheel_sha=$(sha256sum "$wheel" | cut -d' ' -f1)
echo "$wheel_sha  $name" > "$out/$name.sha256"
echo "wheel $name: $size bytes in $parts parts of <= $chunk; working tree $tree bytes; margin $((limit - chunk - tree)) bytes" >&2
echo "device calls, back to back (README, 'Devices, IOBinding and fp16'):"
for i in $(seq 1 "$parts"); do
  part="$out/$name.part-$i-of-$parts"
  cmd="bash scripts/device_bench.sh part $part $(sha256sum "$part" | cut -d' ' -f1)"
  case $i in
    1) cmd="$cmd && bash scripts/device_bench.sh prepare"; timeout=180 ;;
    "$parts") cmd="$cmd && bash scripts/device_bench.sh measure $wheel_sha"; timeout=400 ;;
    *) timeout=120 ;;
  esac
  printf '%s\n' "run(carry=[\"$part\"], timeout_s=$timeout, command=\"$cmd\")"
done
echo "rerun if needed (parts stay in /tmp while the machine is warm): run(timeout_s=280, command=\"MEASURE_BUDGET_S=250 bash scripts/device_bench.sh measure $wheel_sha large\")"
