#!/usr/bin/env bash
# One prepared GPU session for the open kernel / engine measurements (issues #5 and #6): device
# correctness checks first, then every kernel benchmark at the real shapes, then bench_step per
# engine. Each command has its own time limit so one hang cannot eat the session; every result is
# a JSON file under $OUT (default gpu_out/), plus log.txt. Needs selfdistill installed with a CUDA
# torch and a visible GPU. Run from the repository root, in parts that each fit one 10-minute
# device command (worst case, every limit hit: checks+kernels 540 s, steps 450 s):
#     OUT=/path/to/out bash benchmarks/gpu_session.sh kernels   # gpu_checks + the four kernel benchmarks
#     OUT=/path/to/out bash benchmarks/gpu_session.sh steps     # bench_step for single, fsdp2, deepspeed_zero3
set -uo pipefail
PART=${1:-kernels}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/log.txt"; }
run() {  # run LIMIT_S NAME CMD...: time-limited, output appended to the log
  local limit=$1 name=$2; shift 2
  log "$name"
  timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1
  log "$name exit $?"
}
python -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/log.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv >>"$OUT/log.txt" 2>&1
if [ "$PART" = kernels ]; then
  run 140 gpu_checks python tests/gpu_checks.py --device cuda --json "$OUT/gpu_checks.json"
  for kernel in token_logprobs fused_linear contrast policy_loss; do
    run 100 "bench_$kernel" python benchmarks/bench_$kernel.py --preset real --json "$OUT/bench_$kernel.json"
  done
elif [ "$PART" = steps ]; then
  for engine in single fsdp2 deepspeed_zero3; do
    run 150 "bench_step_$engine" python benchmarks/bench_step.py --arms base,pmi --engine "$engine" --model-size full \
      --sft-steps 60 --steps 6 --threads 0 --json "$OUT/bench_step_$engine.json"
  done
else
  echo "usage: OUT=dir bash benchmarks/gpu_session.sh kernels|steps" >&2
  exit 2
fi
log "done $PART"
