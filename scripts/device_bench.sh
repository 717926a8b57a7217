#!/usr/bin/env bash
# The device run, in at most 4 calls back to back (the calls scripts/device_wheels.sh prints; README, "Devices,
# IOBinding and fp16"):
#
#   part FILE SHA256    copy one carried wheel part to $RAG_DEVICE_DIR/parts (a copy, not an append: a retried
#                       call changes nothing) and check it
#   prepare             print the machine's facts; start building the tiny and large checkpoints and exports in
#                       the background (setsid: it outlives the call), so later calls find them ready
#   measure SHA256 [all|large]
#                       join the parts, check the wheel against SHA256, install it (--no-deps --no-compile), then:
#                       ldd gate of the CUDA provider against the image's nvidia/* libraries, provider and TF32
#                       gate, tiny parity (runtime CUDA vs runtime CPU vs transformers CPU/GPU), fp16 drift and node
#                       placement, the large workload at batch 1 and 8; results to $OUT after every stage
#                       ("large": the gates and the large workload only, for a rerun)
#
# --rehearse (after the subcommand) runs the same steps on a CPU machine: CPU sides instead of CUDA ones, the ldd
# gate on the CPU build's provider bridge, no nvidia-smi, fewer questions; LARGE_WORKLOAD=tiny makes it fast
# (tests/test_device_script.py). Environment: RAG_DEVICE_DIR (/tmp/rag-device), OUT (benchmarks/results/device),
# PYTHON (python3), LARGE_WORKLOAD (large), MEASURE_BUDGET_S (370: the measuring call's own deadline).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dir=${RAG_DEVICE_DIR:-/tmp/rag-device}
py=${PYTHON:-python3}
large=${LARGE_WORKLOAD:-large}
out=${OUT:-$repo/benchmarks/results/device}
cmd=${1:?usage: device_bench.sh part FILE SHA256 | prepare | measure SHA256 [all|large] [--rehearse]}
shift
rehearse=0
args=()
for a in "$@"; do
  if [ "$a" = --rehearse ]; then rehearse=1; else args+=("$a"); fi
done
mkdir -p "$dir/parts" "$dir/cache"
export PYTHONPATH=$repo/runtime:$repo/testing:$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false

log() { echo "[device $(date +%T)] $*" >&2; }
die() { log "$1"; exit "${2:-2}"; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

part() {
  local file=${args[0]:?part FILE SHA256} want=${args[1]:?part FILE SHA256}
  [ -f "$file" ] || die "no $file here: name it in the call's carry"
  local name
  name=$(basename "$file")
  [[ $name =~ \.part-[0-9]+-of-[0-9]+$ ]] || die "$name is not a part made by scripts/device_wheels.sh"
  cp "$file" "$dir/parts/.$name.tmp"
  [ "$(sha_of "$dir/parts/.$name.tmp")" = "$want" ] || die "$name arrived damaged (sha256 differs): send it again"
  mv -f "$dir/parts/.$name.tmp" "$dir/parts/$name"
  log "part $name in place: $(ls "$dir/parts" | grep -c '\.part-') part(s) of ${name##*-of-} here"
}

build() {  # the background job of `prepare`; status lines go to $dir/prepare.status
  local status=$dir/prepare.status
  run_step() { local label=$1; shift; if "$@"; then echo "$label" >> "$status"; else echo "failed: $label" >> "$status"; return 1; fi; }
  bench=("$py" -m benchmarks.device --cache "$dir/cache" --prepare-only)
  run_step tiny "${bench[@]}" --workload tiny --exports fp32 fp16 || return 1
  run_step large-checkpoint "${bench[@]}" --workload "$large" --exports || return 1
  # Two processes: the fp16 export does not need the fp32 one (validation is left to the parity runs).
  "${bench[@]}" --workload "$large" --exports fp32 --no-validate & local fp32=$!
  "${bench[@]}" --workload "$large" --exports fp16 --no-validate & local fp16=$!
  local ok=1
  wait "$fp32" || ok=0
  wait "$fp16" || ok=0
  if [ $ok = 1 ]; then echo large >> "$status"; else echo "failed: large exports" >> "$status"; fi
}

facts() {
  if [ $rehearse = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || log "nvidia-smi failed"
  fi
  "$py" - <<'EOF' || true
import importlib.metadata as m, platform
names = ["torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers"]
found = {}
for n in names:
    try:
        found[n] = m.version(n)
    except m.PackageNotFoundError:
        pass
print("python", platform.python_version(), found)
EOF
}

prepare() {
  facts
  if [ -f "$dir/prepare.status" ]; then log "prepare already started: $(tr '\n' ' ' < "$dir/prepare.status")"; return 0; fi
  : > "$dir/prepare.status"
  # A new session, so the job outlives this call (the device kills what a command leaves behind otherwise).
  if command -v setsid > /dev/null; then
    setsid nohup bash "$repo/scripts/device_bench.sh" _build > "$dir/prepare.log" 2>&1 < /dev/null &
  else
    "$py" -c 'import os, sys; os.setsid(); os.execvp("bash", sys.argv[1:])' "$repo/scripts/device_bench.sh" _build \
      > "$dir/prepare.log" 2>&1 < /dev/null &
  fi
  log "building tiny and $large checkpoints and exports in the background (log: $dir/prepare.log)"
}

wait_for() {  # wait_for LABEL SECONDS: until prepare.status says LABEL (or a failure), at most SECONDS
  local label=$1 until=$(( $(date +%s) + $2 ))
  while ! grep -qx "$label" "$dir/prepare.status" 2>/dev/null; do
    if grep -q '^failed' "$dir/prepare.status" 2>/dev/null; then
      tail -20 "$dir/prepare.log" >&2
      die "background build $(grep '^failed' "$dir/prepare.status")"
    fi
    (( $(date +%s) < until )) || die "background build not at '$label' after $2 s: $(tr '\n' ' ' < "$dir/prepare.status")"
    sleep 3
  done
}

nvidia_lib_dirs() {  # the image's CUDA/cuDNN libraries (the lib folders of the nvidia-* wheels beside torch),
  # and the driver's folder if the loader does not know libcuda.so.1 already
  "$py" - <<'EOF'
import ctypes, site, sys
from pathlib import Path
roots = [Path(p) / "nvidia" for p in [*site.getsitepackages(), site.getusersitepackages(), *sys.path] if p]
dirs = sorted({str(f.parent) for r in roots if r.is_dir() for f in r.rglob("lib*.so*")})
try:
    ctypes.CDLL("libcuda.so.1")
except OSError:
    dirs += sorted({str(f.parent) for d in ("/usr/local/nvidia", "/usr/lib64", "/usr/lib/x86_64-linux-gnu")
                    if Path(d).is_dir() for f in Path(d).rglob("libcuda.so.1")})
print(":".join(dirs))
EOF
}

ldd_gate() {  # ldd_gate LIBRARY: every library it links must resolve; cuDNN (loaded at run time) must exist
  local lib=$1 links missing
  [ -f "$lib" ] || die "no $lib: the wheel did not install an onnxruntime with a CUDA provider" 3
  command -v ldd > /dev/null || die "no ldd on this machine: cannot check $(basename "$lib")'s libraries" 3
  links=$(ldd "$lib" 2>&1) || die "ldd $lib failed: $links" 3
  missing=$(awk '/not found/ {print $1}' <<< "$links" | tr '\n' ' ')
  [ -z "$missing" ] || die "$(basename "$lib") cannot load: missing $missing(searched LD_LIBRARY_PATH=$LD_LIBRARY_PATH)" 3
  log "ldd $(basename "$lib"): every linked library resolves"
  if [ $rehearse = 0 ]; then
    "$py" -c "import ctypes; ctypes.CDLL('libcudnn.so.9')" 2>/dev/null \
      || die "libcudnn.so.9 (loaded by the CUDA provider at run time) not found on LD_LIBRARY_PATH" 3
    log "libcudnn.so.9 loads"
  fi
}

left() { echo $(( budget_end - $(date +%s) )); }

tiny_check() {  # 2b. fp32 parity across devices, TF32 against TF32, fp16 drift, node placement (tiny model)
  local sides rc=0
  if [ "$1" = cuda ]; then
    sides=(runtime:cuda:fp32 runtime:cpu:fp32 transformers:cpu:fp32:eager transformers:cuda:fp32:eager
           runtime:cuda:fp16 transformers:cuda:fp16:eager runtime:cuda:fp32:tf32 transformers:cuda:fp32:eager:tf32)
  else
    sides=(runtime:cpu:fp32 transformers:cpu:fp32:eager runtime:cpu:fp16 transformers:cpu:fp16:eager)
  fi
  local counts=(--questions 8 --min-batches 4 --warmup 2)
  [ $rehearse = 0 ] || counts=(--questions 2 --min-batches 1 --warmup 1)
  timeout 150 "$py" -m benchmarks.device --workload tiny --cache "$dir/cache" --sides "${sides[@]}" \
    --batch 1 4 "${counts[@]}" --deadline-s 120 --name device-tiny-check --out "$out" --require-identical || rc=$?
  log "tiny check exit $rc (1: an fp32 pair differs, see device-tiny-check.md); going on"
}

measure() {  # everything it prints also goes to $out/device-run.log
  mkdir -p "$out"
  measure_steps 2>&1 | tee -a "$out/device-run.log"
}

measure_steps() {
  local want=${args[0]:?measure SHA256} stages=${args[1]:-all} t_start
  [[ $stages = all || $stages = large ]] || die "measure SHA256 [all|large]: unknown stages '$stages'"
  t_start=$(date +%s)
  budget_end=$(( t_start + ${MEASURE_BUDGET_S:-370} ))
  log "measure $stages: budget ${MEASURE_BUDGET_S:-370} s, results in $out; background build:" \
      "$(tr '\n' ' ' < "$dir/prepare.status" 2>/dev/null || echo 'not started')"
  # 1. the wheel: every part here, joined, checked against the sha256 on this command line, installed
  local any total name
  any=$(ls "$dir/parts" | grep -E '\.part-[0-9]+-of-[0-9]+$' | head -1 || true)
  [ -n "$any" ] || die "no wheel parts in $dir/parts (the machine was given back?): send them again, calls 1-3"
  total=${any##*-of-}
  name=${any%.part-*}
  for i in $(seq 1 "$total"); do
    [ -f "$dir/parts/$name.part-$i-of-$total" ] || die "part $i of $total missing in $dir/parts: send it again"
  done
  if [ ! -f "$dir/site/.installed-$want" ]; then
    for i in $(seq 1 "$total"); do cat "$dir/parts/$name.part-$i-of-$total"; done > "$dir/$name"
    [ "$(sha_of "$dir/$name")" = "$want" ] || die "joined $name does not match sha256 $want: a part is stale, send them again"
    rm -rf "$dir/site"
    "$py" -m pip install --quiet --no-deps --no-compile --no-index --target "$dir/site" "$dir/$name"
    touch "$dir/site/.installed-$want"
    log "installed $name into $dir/site"
  fi
  [ -f "$dir/prepare.status" ] || prepare  # call 1 normally started it
  local device=cuda provider
  if [ $rehearse = 1 ]; then
    device=cpu  # the CPU build stands in for onnxruntime-gpu; the installed rehearsal wheel stays unused
    provider=$("$py" -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime_providers_shared.so'))")
  else
    export PYTHONPATH=$dir/site:$PYTHONPATH
    provider=$dir/site/onnxruntime/capi/libonnxruntime_providers_cuda.so
    export LD_LIBRARY_PATH
    LD_LIBRARY_PATH=$(nvidia_lib_dirs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  # 2. gates, before any model: the provider's libraries resolve, CUDA is granted, fp32 is fp32
  ldd_gate "$provider"
  timeout 90 "$py" -m benchmarks.device_gate --device "$device" --out "$out" || die "provider gate failed (exit $?)" 3
  local rc=0
  if [ "$stages" = all ]; then
    wait_for tiny 120
    # The suite's CUDA tests (skipped, and reported, where there is no GPU), on the tiny export just built.
    RAG_EXPORT_TEST_CACHE=$dir/cache timeout 90 "$py" -m pytest -q -p no:cacheprovider -m cuda tests/test_sessions.py \
      || log "CUDA tests failed (exit $?); going on"
    tiny_check "$device"
  fi
  # 3. the large workload, each side loaded once, results written after each batch size
  wait_for large $(( $(left) - 100 > 0 ? $(left) - 100 : 1 ))
  local questions=32 batches=8 warmup=3
  [ $rehearse = 0 ] || { questions=2; batches=1; warmup=1; }
  local deadline=$(( $(left) - 45 ))
  (( deadline > 30 )) || die "only $(left) s left for the $large workload: rerun measure (the exports are ready now)"
  timeout $(( $(left) - 10 )) "$py" -m benchmarks.device --workload "$large" --cache "$dir/cache" --device "$device" \
    --batch 1 8 --questions $questions --min-batches $batches --warmup $warmup --deadline-s $deadline \
    --name "device-$large-$device" --out "$out" || rc=$?
  log "$large workload exit $rc after $(( $(date +%s) - t_start )) s"
  cp "$dir/prepare.log" "$out/prepare.log" 2>/dev/null || true
  for f in "$out/device-tiny-check.md" "$out/device-$large-$device.md"; do
    if [ -f "$f" ]; then grep -E '^(## batch|\| (runtime|transformers))' "$f" | cut -c1-220 || true; fi
  done
  return $rc
}

case $cmd in
  part) part ;;
  prepare) prepare ;;
  _build) build ;;
  measure) measure ;;
  *) die "unknown subcommand $cmd: part FILE SHA256 | prepare | measure SHA256 [--rehearse]" ;;
esac
