#!/usr/bin/env bash
# On a GPU machine (the device tool): GPU tests, then the kernel benchmark; logs under $OUT.
# Uses the machine's own torch/triton (no venv): PYTHONPATH points at this checkout.
set -uo pipefail
OUT="${OUT:-/tmp/pagedattn-out}"; mkdir -p "$OUT"
# the top-level integrations/ folder installs as pagedattn.integrations: without pip, run from a copy of the
# checkout that has that layout (results are copied back into bench/results here)
repo="$PWD"; stage=/tmp/pagedattn-stage; rm -rf "$stage"; cp -r "$repo" "$stage"
cp -r "$stage/integrations" "$stage/pagedattn/integrations"; cd "$stage" || exit 1
export PYTHONPATH="$stage" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
tests_timeout="${TESTS_TIMEOUT:-330}"; bench_timeout="${BENCH_TIMEOUT:-200}"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  start=$(date +%s)
  # the sanitizer runs are slow (every kernel compiled under the sanitizer): in the background, beside the suite;
  # every op on both kernel backends (Triton, CUDA/CuPy) under memcheck, one configuration each under racecheck
  if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
    (timeout "$tests_timeout" compute-sanitizer --tool memcheck --error-exitcode 3 python3 tests/ops/sanitize_ops.py \
      > "$OUT/sanitizer.log" 2>&1; echo "sanitizer rc=$?" >> "$OUT/sanitizer.log") &
    (timeout "$tests_timeout" compute-sanitizer --tool racecheck --error-exitcode 3 python3 tests/ops/sanitize_ops.py \
      --quick > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?" >> "$OUT/racecheck.log") &
  fi
  timeout "$tests_timeout" python3 -m pytest ${TEST_PATHS:-tests/ops} -q -n "${XDIST:-8}" -p no:cacheprovider --maxfail=30 \
    -k "not sanitizer" ${PYTEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
  echo "tests rc=$? in $(( $(date +%s) - start ))s"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -30
  wait; [ "${SKIP_SANITIZER:-0}" = 1 ] || { tail -3 "$OUT/sanitizer.log"; tail -3 "$OUT/racecheck.log"; }
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  start=$(date +%s)
  timeout "$bench_timeout" python3 bench/bench_ops.py ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench rc=$? in $(( $(date +%s) - start ))s"; tail -45 "$OUT/bench.log"
  if [ "${SKIP_PREFILL_BENCH:-0}" != 1 ]; then
    start=$(date +%s)
    timeout "${PREFILL_BENCH_TIMEOUT:-120}" python3 bench/bench_prefill.py > "$OUT/bench_prefill.log" 2>&1
    echo "bench_prefill rc=$? in $(( $(date +%s) - start ))s"; tail -25 "$OUT/bench_prefill.log"
  fi
  # one archive: the device tool returns at most 8 files
  tar czf "$OUT/results.tgz" bench/results; cp -r bench/results/. "$repo/bench/results/"
fi
