#!/usr/bin/env bash
# The `1b` step's levers (issue 30) in one GPU call, each run guarded so that one failure or a
# timeout leaves the others: the PyTorch peers, then lmjax configurations in the order given.
#
#   bash benchmarks/train_step_levers.sh [JOB ...]   # each run's result line, also in $OUT/levers.log
#
# Jobs: `peers` (benchmarks/torch_peer.py: torch.compile alone at both shapes, then Liger Kernel with
# torch.compile and eager), and `lmjax:B<b>xT<t>:<name>[:profile]`, `<name>` one of LEVERS below (`head`
# is main before this issue, a copy of its tree in .baseline/, ignored by git:
# `mkdir .baseline && git archive edf5e49 | tar -x -C .baseline`).
# Jobs that would not finish by $DEADLINE seconds (default 570) are skipped and reported as such.
# LIGER_RUNS overrides the Liger runs (torch_peer.py --liger); VARIANT (1b) and ATTENTION (cudnn) the
# lmjax runs' (VARIANT=tiny ATTENTION=xla: a CPU smoke run).
set -u
VARIANT=${VARIANT:-1b}
ATTENTION=${ATTENTION:-cudnn}
OUT=${OUT:-/tmp/levers}
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT"
LOG="$OUT/levers.log"
declare -A LEVERS=(
  [bf16]=''                                        # this tree: custom-VJP RMSNorm/SwiGLU
  [fp8]='model.matmul_precision=fp8'
  [bf16mom]='optim.moments_dtype=bfloat16'
  [fp8_bf16mom]='model.matmul_precision=fp8;optim.moments_dtype=bfloat16'
  [unroll]='model.scan_unroll=16'
  [fp8_unroll]='model.matmul_precision=fp8;model.scan_unroll=16'
  [fp8_bf16mom_unroll]='model.matmul_precision=fp8;optim.moments_dtype=bfloat16;model.scan_unroll=16'
)
declare -A NEEDS=([peers]=420 [lmjax]=75)

run_job() {
  local job=$1 kind=${1%%:*}
  if (( SECONDS + NEEDS[$kind] > DEADLINE )); then
    echo "SKIPPED $job (t=${SECONDS}s)" | tee -a "$LOG"; return
  fi
  echo "=== $job (t=${SECONDS}s)" | tee -a "$LOG"
  local left=$(( DEADLINE - SECONDS ))
  if [[ $kind == peers ]]; then
    timeout "$left" python3 benchmarks/torch_peer.py --runs=B4xT4096:compile,B8xT2048:compile \
      --liger="${LIGER_RUNS:-B4xT4096:compile,B8xT2048:compile,B4xT4096:eager,B8xT2048:eager}" --out="$OUT" 2>&1 \
      | grep -E '^B[0-9]' | tee -a "$LOG"
    return
  fi
  IFS=: read -r _ shape name profile <<< "$job"
  local b=${shape%%xT*} t=${shape##*xT}
  b=${b#B}
  local dir=. extra=()
  [[ $name == head ]] && dir=.baseline
  [[ $name != head ]] && extra=(--set="${LEVERS[$name]}")
  [[ -n ${profile:-} ]] && extra+=(--profile=/tmp/prof_$name)
  (cd "$dir" && PYTHONPATH="$PWD:${PYTHONPATH:-}" timeout "$left" python3 benchmarks/train_throughput.py \
    --variant="$VARIANT" --batch="$b" --seq="$t" --steps=12 --attention="$ATTENTION" --loss=pallas \
    --peer="$OUT/torch_peer.json" --out=/tmp "${extra[@]}" 2>&1) \
    | grep -E '^\{' | sed "s/^/$name /" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
for job in "$@"; do run_job "$job"; done
echo "done at t=${SECONDS}s" | tee -a "$LOG"
