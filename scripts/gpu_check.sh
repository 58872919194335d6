#!/usr/bin/env bash
# GPU readiness check, one call of at most 8 minutes on a GPU machine (run from the repository root):
#   1. installs the wheels carried in .whl/ (scripts/gpu_wheels.sh fetches them; no network needed there),
#   2. runs the CUDA tests (Testing/test_cuda.py: CUDA path vs CPU on seeded ViT-B and the tiny model, pinned
#      memory, batched lookahead, real out-of-memory halving and CPU fallback) and the GPU helpers' CPU tests,
#   3. runs `robustmedsam bench` (CPU rows plus the GPU rows), writing bench-gpu.json and bench-gpu.md.
# Results go to $OUT (the device tool's folder that comes back) or ./gpu-check-out. Every step has its own
# time limit, so the whole run ends within about 7.5 minutes even when a step hangs.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
started=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - started )) s)"; }

step "install carried wheels"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  echo "no .whl/ folder: using what is installed"; export PYTHONPATH="$PWD"
fi
{ nvidia-smi || true; "$PY" -c "import torch; from RobustMedSAMLib.precision import cpu_model, native_bf16; gpu = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', gpu and torch.cuda.get_device_name(), 'capability', gpu and torch.cuda.get_device_capability(), '| cpu', cpu_model(), '| native bf16', native_bf16() or 'none', '| threads', torch.get_num_threads())"; } 2>&1 | tee "$OUT/machine.txt"

step "CUDA tests"
timeout 210 "$PY" -m pytest -q -s -rs -p no:cacheprovider Testing/test_cuda.py Testing/test_acceleration.py 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

step "benchmark"
timeout 210 "$PY" -m RobustMedSAMLib.bench ${BENCH_ARGS:---repeats 3 --slices 4 --no-memory} --json "$OUT/bench-gpu.json" \
  > "$OUT/bench-gpu.md" 2> "$OUT/bench.log"
bench_rc=$?
cat "$OUT/bench-gpu.md"; tail -n 5 "$OUT/bench.log"

step "done: tests exit $tests_rc, bench exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
