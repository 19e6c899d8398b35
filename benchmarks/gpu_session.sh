#!/usr/bin/env bash
# One prepared GPU session for the open kernel / engine measurements (issues #5 and #6): device
# correctness checks first, then every kernel benchmark at the real shapes, then bench_step for the
# two sharded engines. Every result is a JSON file under $OUT (default gpu_out/), plus log.txt:
# 8 files at most, what the device tool brings back.
#
#     bash benchmarks/gpu_wheels.sh                          # here, once: wheels the GPU machine lacks -> .whl/
#     OUT=/path bash benchmarks/gpu_session.sh all           # on the GPU machine (device run, carry=[".whl"])
#     OUT=/path bash benchmarks/gpu_session.sh kernels|steps # the two halves
#     DEVICE=cpu WHEELS=none OUT=/tmp/o bash benchmarks/gpu_session.sh all  # rehearsal of the flow here, tiny shapes
#
# The lent machine has CUDA torch and triton as `python3` but no package registry: `setup` installs
# the carried wheels and selfdistill itself (always anew; no network) into $SITE and runs everything from
# outside the checkout, so the installed package (with selfdistill.kernels / .conf / .csrc mapped
# in) is the one imported. BUDGET_S bounds the whole run: a step is started only with at least
# MIN_STEP_S left and is cut at the budget, so one slow step cannot eat the device time of the rest.
set -uo pipefail
PART=${1:-all}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-570}
MIN_STEP_S=${MIN_STEP_S:-40}
SITE=${SITE:-/tmp/selfdistill_site}
WHEELS=${WHEELS:-$ROOT/.whl}  # set WHEELS=none to install nothing (a rehearsal where the packages are installed)
T0=$(date +%s)

log() { echo "== $(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s $*" | tee -a "$OUT/log.txt"; }
run() {  # run LIMIT_S NAME CMD...: time-limited (and within the budget), output appended to the log
  local limit=$1 name=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - T0) ))
  if [ "$left" -lt "$MIN_STEP_S" ]; then log "$name skipped: ${left}s of the budget left"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name (limit ${limit}s)"
  timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1
  log "$name exit $?"
}

setup() {
  cd /tmp || exit 1  # never import the checkout's selfdistill/ (it lacks the mapped subpackages)
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    log "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl >>"$OUT/log.txt" 2>&1
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  # always this checkout's code: a warm machine may still hold an earlier install in $SITE
  log "installing selfdistill from $ROOT into $SITE"
  rm -rf "$SITE"/selfdistill "$SITE"/selfdistill-*.dist-info
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" "$ROOT" >>"$OUT/log.txt" 2>&1 \
    || { log "installing selfdistill failed (see the log)"; exit 1; }
  case ":${PYTHONPATH:-}:" in *":$SITE:"*) ;; *) export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} ;; esac
  "$PY" - <<'PY' 2>&1 | tee -a "$OUT/log.txt"
import importlib, sys
import torch
mods = ("selfdistill.kernels", "selfdistill.conf", "hydra", "math_verify", "deepspeed", "triton", "transformers")
missing = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{m}: {type(e).__name__}: {e}")
import selfdistill
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "", "selfdistill from", selfdistill.__file__)
print("\n".join(missing) if missing else "all imports ok")
PY
  if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'" || exit 1
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv >>"$OUT/log.txt" 2>&1
  fi
}

kernels_part() {
  local preset=() && [ "$DEVICE" = cuda ] && preset=(--preset real)
  run 200 gpu_checks "$PY" "$ROOT/tests/gpu_checks.py" --device "$DEVICE" --json "$OUT/gpu_checks.json"
  for kernel in token_logprobs fused_linear contrast policy_loss; do
    run 90 "bench_$kernel" "$PY" "$ROOT/benchmarks/bench_$kernel.py" --device "$DEVICE" "${preset[@]}" --json "$OUT/bench_$kernel.json"
  done
}

steps_part() {
  local size=(--model-size full --sft-steps 60 --steps 6 --threads 0)
  [ "$DEVICE" = cpu ] && size=(--model-size small --sft-steps 4 --steps 2 --batch-size 2 --n 2 --max-new-tokens 16 --reps 1)
  for engine in fsdp2 deepspeed_zero3; do
    run 150 "bench_step_$engine" "$PY" "$ROOT/benchmarks/bench_step.py" --arms base,pmi --engine "$engine" "${size[@]}" \
      --json "$OUT/bench_step_$engine.json" "trainer.device=$DEVICE"
  done
}

case "$PART" in
  all) setup; kernels_part; steps_part ;;
  kernels) setup; kernels_part ;;
  steps) setup; steps_part ;;
  *) echo "usage: OUT=dir bash benchmarks/gpu_session.sh all|kernels|steps" >&2; exit 2 ;;
esac
log "done $PART; results: $(cd "$OUT" && ls | tr '\n' ' ')"
