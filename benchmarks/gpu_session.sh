#!/usr/bin/env bash
# One prepared GPU session for the open kernel / engine measurements (issues #5, #6 and #15): device
# correctness checks first, then every kernel benchmark at the real shapes (eager providers and the
# kernels), the scorer's LM-head work before / after the contrast kernels (bench_scoring), bench_step
# for the two sharded engines, and last the torch.compile provider of the kernel benchmarks (the
# slowest to start and only a comparison point). Results under $OUT (default gpu_out/), at most 8
# files (what the device tool brings back): gpu_checks.json; kernels.json, every kernel benchmark's
# document under its name ({"benchmarks": {"token_logprobs": {...}, ...}}; the scripts write their
# own files row by row under $WORK, merged into kernels.json after every step); scoring.json; one
# bench_step_<engine>.json per engine; log.txt.
#
#     bash benchmarks/gpu_wheels.sh                          # here, once: wheels the GPU machine may lack -> .whl/
#     OUT=/path bash benchmarks/gpu_session.sh all           # on the GPU machine (device run, carry=[".whl"])
#     OUT=/path bash benchmarks/gpu_session.sh kernels|steps # parts of it
#     DEVICE=cpu WHEELS=none OUT=/tmp/o bash benchmarks/gpu_session.sh all  # rehearsal of the flow here, tiny shapes
#
# The lent machine has CUDA torch and triton as `python3` but no package registry: `setup` asks
# `python3 -m pip show` which of the carried wheels' packages the machine already has and installs
# only the others, then selfdistill itself (always anew; no network), into $SITE, and everything
# runs from outside the checkout, so the installed package (with selfdistill.kernels / .conf /
# .csrc mapped in) is the one imported.
#
# Time: BUDGET_S (default 570, inside a 600 s device call) is split into per-step shares (SHARES,
# seconds of a 570 s budget, scaled to BUDGET_S and to the steps of the part run). Each step must end
# by its deadline, the sum of its and the earlier steps' shares, and is killed there, so the session
# ends within the budget; time an earlier step did not use passes to the next. Every JSON file is
# written row by row (gpu_checks: check by check), so a step cut at its deadline loses only the row
# it was measuring. One summary line per step (== step ...) goes to stdout and log.txt.
set -uo pipefail
PART=${1:-all}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-570}
MIN_STEP_S=${MIN_STEP_S:-10}
SITE=${SITE:-/tmp/selfdistill_site}
WHEELS=${WHEELS:-$ROOT/.whl}  # set WHEELS=none to install no wheels (a rehearsal where the packages are installed)
WORK=${WORK:-/tmp/selfdistill_session_work}  # the kernel benchmarks' own files, merged into $OUT/kernels.json
# the csrc JIT build's cache; torch leaves a `lock` file there when a build is killed, and every later
# load would wait on it for ever: the session removes those after each step (steps run one at a time)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/selfdistill_torch_extensions}
KERNELS=(token_logprobs fused_linear contrast policy_loss topk_distill)
ENGINES=(fsdp2 deepspeed_zero3)
declare -A SHARES=([setup]=30 [gpu_checks]=120 [bench_token_logprobs]=35 [bench_fused_linear]=60 [bench_contrast]=30
                   [bench_policy_loss]=25 [bench_topk_distill]=45 [bench_scoring]=40 [bench_step_fsdp2]=70
                   [bench_step_deepspeed_zero3]=70 [torch_compile]=45)
case "$PART" in
  all) STEPS=(setup gpu_checks "${KERNELS[@]/#/bench_}" bench_scoring "${ENGINES[@]/#/bench_step_}" torch_compile) ;;
  kernels) STEPS=(setup gpu_checks "${KERNELS[@]/#/bench_}" bench_scoring torch_compile) ;;
  steps) STEPS=(setup "${ENGINES[@]/#/bench_step_}") ;;
  compile-only) STEPS=() ;;  # internal: the torch_compile step's body (run under its time limit)
  *) echo "usage: OUT=dir bash benchmarks/gpu_session.sh all|kernels|steps" >&2; exit 2 ;;
esac
T0=$(date +%s)
declare -A DEADLINE
total=0 && for s in "${STEPS[@]}"; do total=$(( total + SHARES[$s] )); done
acc=0 && for s in "${STEPS[@]}"; do acc=$(( acc + SHARES[$s] )); DEADLINE[$s]=$(( T0 + BUDGET_S * acc / total )); done
SESSION_RC=0
if [ "$DEVICE" = cpu ]; then SHAPES=(--preset tiny --reps 1); else SHAPES=(--preset real --reps 10); fi

log() { echo "== $(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s $*" | tee -a "$OUT/log.txt"; }
left() { echo $(( DEADLINE[$1] - $(date +%s) )); }

summary() {  # summary FILE: rows / checks in a results file and whether its last run ended
  [ -f "$1" ] || { echo "no $(basename "$1")"; return; }
  "$PY" - "$1" <<'PY'
import json, os, sys
try:
    doc = json.load(open(sys.argv[1]))
except ValueError as e:
    print(f"{os.path.basename(sys.argv[1])}: not JSON ({e})"); sys.exit()
name = os.path.basename(sys.argv[1])
runs = doc.get("runs") or [{}]
cut = "" if runs[-1].get("complete", True) else ", last run cut short"
if "benchmarks" in doc:
    parts = []
    for kernel, sub in doc["benchmarks"].items():
        sub_runs = sub.get("runs") or [{}]
        parts.append(f"{kernel} {len(sub.get('rows', []))} rows ({sum('error' in r for r in sub.get('rows', []))} errors"
                     + ("" if sub_runs[-1].get("complete", True) else ", cut") + ")")
    print(f"{name}: " + (", ".join(parts) or "no benchmark yet"))
elif "checks" in doc:
    bad = [c["check"] for c in doc["checks"] if not c["ok"]]
    print(f"{name}: {len(doc['checks']) - len(bad)}/{len(doc.get('planned') or doc['checks'])} checks passed"
          + (f", failed: {' '.join(bad)}" if bad else "") + cut)
elif isinstance(doc.get("rows"), list):
    errors = sum("error" in r for r in doc["rows"])
    print(f"{name}: {len(doc['rows'])} rows, {errors} with an error{cut}")
else:
    print(f"{name}: keys {' '.join(sorted(doc)[:12])}")
PY
}

step() {  # step NAME "FILE..." CMD...: run CMD until NAME's deadline, output to the log; one summary line
  local name=$1 files=$2; shift 2
  local limit; limit=$(left "$name")
  if [ "$limit" -lt "$MIN_STEP_S" ]; then log "step $name: SKIPPED, ${limit}s left before its deadline"; SESSION_RC=1; return; fi
  log "$name: started, limit ${limit}s"
  local t=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >>"$OUT/log.txt" 2>&1  # the whole process group, children included
  local rc=$? verdict=ok
  [ "$rc" -ne 0 ] && verdict="FAIL (exit $rc)" && SESSION_RC=1
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="CUT at its deadline"
  find "$TORCH_EXTENSIONS_DIR" -name lock -type f -delete 2>/dev/null
  local f sums=""
  for f in $files; do sums+="; $(summary "$f")"; done
  log "step $name: $verdict in $(( $(date +%s) - t ))s of ${limit}s$sums"
}

setup() {
  cd /tmp || exit 1  # never import the checkout's selfdistill/ (it lacks the mapped subpackages)
  local carried=() wanted=() have=""
  [ "$WHEELS" != none ] && compgen -G "$WHEELS/*.whl" >/dev/null && carried=("$WHEELS"/*.whl)
  # what the machine has already, by distribution name (-, _ and . equal, any case), as pip sees it
  local names=() w
  for w in "${carried[@]}"; do names+=("$(basename "$w" | cut -d- -f1)"); done
  have=$("$PY" -m pip show "${names[@]}" ninja psutil msgpack einops 2>/dev/null \
         | awk '/^Name: /{n=tolower($2); gsub(/[-_.]+/, "-", n)} /^Version: /{printf "%s==%s ", n, $2}')
  for w in "${carried[@]}"; do
    local dist; dist=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z' | sed 's/[-_.]\+/-/g')
    case " $have" in *" $dist=="*) ;; *) wanted+=("$w") ;; esac
  done
  log "setup: the machine has ${have:-none of the carried packages}"
  if [ ${#wanted[@]} -gt 0 ]; then
    log "setup: installing ${#wanted[@]} of ${#carried[@]} carried wheels into $SITE: $(for w in "${wanted[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wanted[@]}" >>"$OUT/log.txt" 2>&1 \
      || { log "step setup: FAIL installing the wheels (see log.txt)"; exit 1; }
  else
    log "setup: no wheel to install (${#carried[@]} carried)"
  fi
  # always this checkout's code: a warm machine may still hold an earlier install in $SITE
  rm -rf "$SITE"/selfdistill "$SITE"/selfdistill-*.dist-info
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" "$ROOT" >>"$OUT/log.txt" 2>&1 \
    || { log "step setup: FAIL installing selfdistill from $ROOT (see log.txt)"; exit 1; }
  # the installed csrc sources keep the checkout's times, so an unchanged csrc/ reuses an earlier JIT
  # build (ninja rebuilds what is newer than its objects; a changed file is newer, and renames the build)
  local f && for f in "$ROOT"/csrc/*; do [ -f "$SITE/selfdistill/csrc/${f##*/}" ] && touch -r "$f" "$SITE/selfdistill/csrc/${f##*/}"; done
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  local imports
  imports=$("$PY" - <<'PY' 2>&1
import importlib, sys
import torch
missing = []
for m in ("selfdistill.kernels", "selfdistill.conf", "hydra", "math_verify", "deepspeed", "triton", "transformers"):
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{m} ({type(e).__name__}: {e})")
import selfdistill
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {gpu}, selfdistill from {selfdistill.__file__}; "
      + ("imports ok" if not missing else "MISSING: " + "; ".join(missing)))
PY
)
  echo "$imports" >>"$OUT/log.txt"
  if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'" || { log "step setup: FAIL, no GPU visible"; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv >>"$OUT/log.txt" 2>&1
  fi
  log "step setup: ok in $(( $(date +%s) - T0 ))s; $(echo "$imports" | tail -1)"
}

collect() {  # the kernel benchmarks' files under $WORK -> $OUT/kernels.json, one document per kernel (atomic)
  "$PY" - "$WORK" "$OUT/kernels.json" "${KERNELS[@]}" <<'PY'
import json, os, sys
work, out, kernels = sys.argv[1], sys.argv[2], sys.argv[3:]
merged = {"benchmarks": {}}
for kernel in kernels:
    path = os.path.join(work, f"bench_{kernel}.json")
    try:
        merged["benchmarks"][kernel] = json.load(open(path))
    except (OSError, ValueError):
        pass  # not run yet (or cut before its first write)
tmp = f"{out}.tmp"
json.dump(merged, open(tmp, "w"), indent=1)
os.replace(tmp, out)
PY
}

csrc_built() {  # did gpu_checks build the csrc extension?
  "$PY" -c "import json, sys; sys.exit(not any(c['check'] == 'csrc/build' and c['ok'] for c in json.load(open(sys.argv[1]))['checks']))" \
    "$OUT/gpu_checks.json" 2>/dev/null
}

kernel_benches() {  # eager providers and the kernels; torch.compile comes in its own step, last
  local kernel exclude=torch_compile
  if ! csrc_built; then
    exclude+=,cuda,after_cuda  # a build that failed or ran out of time would be tried again, and cut again, in every step
    log "csrc/build did not pass in gpu_checks: the benchmarks run without the cuda provider"
  fi
  for kernel in "${KERNELS[@]}"; do
    step "bench_$kernel" "$WORK/bench_$kernel.json" "$PY" "$ROOT/benchmarks/bench_$kernel.py" --device "$DEVICE" "${SHAPES[@]}" \
      --exclude "$exclude" --json "$WORK/bench_$kernel.json"
    collect
  done
  step bench_scoring "$OUT/scoring.json" "$PY" "$ROOT/benchmarks/bench_scoring.py" --device "$DEVICE" "${SHAPES[@]}" \
    --exclude "$exclude" --json "$OUT/scoring.json"
}

compile_benches() {  # the torch_compile step's body: its rows added to each kernel's file, in order, until cut
  local kernel
  for kernel in "${KERNELS[@]}"; do
    "$PY" "$ROOT/benchmarks/bench_$kernel.py" --device "$DEVICE" "${SHAPES[@]}" --providers torch_compile --append \
      --json "$WORK/bench_$kernel.json" || return
  done
}

step_benches() {
  local size=(--model-size full --sft-steps 60 --steps 6 --threads 0)
  [ "$DEVICE" = cpu ] && size=(--model-size small --sft-steps 4 --steps 2 --batch-size 2 --n 2 --max-new-tokens 16 --reps 1)
  local engine
  for engine in "${ENGINES[@]}"; do
    step "bench_step_$engine" "$OUT/bench_step_$engine.json" "$PY" "$ROOT/benchmarks/bench_step.py" --arms base,pmi \
      --engine "$engine" "${size[@]}" --json "$OUT/bench_step_$engine.json" "trainer.device=$DEVICE"
  done
}

if [ "$PART" = compile-only ]; then compile_benches; exit; fi
[ "$PART" != steps ] && rm -rf "$WORK" && mkdir -p "$WORK"  # a warm machine may hold an earlier session's files
log "session $PART on $DEVICE: budget ${BUDGET_S}s; deadlines: $(for s in "${STEPS[@]}"; do echo -n "$s +$(( DEADLINE[$s] - T0 ))s "; done)"
setup
if [ "$PART" != steps ]; then
  step gpu_checks "$OUT/gpu_checks.json" "$PY" "$ROOT/tests/gpu_checks.py" --device "$DEVICE" --json "$OUT/gpu_checks.json"
  kernel_benches
fi
if [ "$PART" != kernels ]; then step_benches; fi
if [ "$PART" != steps ]; then
  step torch_compile "$(for k in "${KERNELS[@]}"; do echo -n "$WORK/bench_$k.json "; done)" \
    env OUT="$OUT" WORK="$WORK" DEVICE="$DEVICE" PYTHON="$PY" bash "$ROOT/benchmarks/gpu_session.sh" compile-only
  collect
  log "step torch_compile: merged; $(summary "$OUT/kernels.json")"
fi
log "done $PART in $(( $(date +%s) - T0 ))s (budget ${BUDGET_S}s); results: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $SESSION_RC
