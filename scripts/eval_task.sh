#!/usr/bin/env bash
# Evaluate a checkpoint on a task's test split(s): the paper's metrics (gpg-vl eval --help).
#
#   bash scripts/eval_task.sh TASK MODEL [--nproc N] [gpg-vl eval options]
#
# On GPUs: accelerate launch over all visible GPUs (or --nproc N), each holding the whole model.
# Without GPUs: one process, or N CPU processes (gloo) through torchrun with --nproc N.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 2 ] || usage
task=$1; model=$2; shift 2
nproc=""
options=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) nproc=$2; shift 2 ;;
    -h|--help) usage ;;
    *) options+=("$1"); shift ;;
  esac
done
args=(eval --task "$task" --model "$model" ${options[@]+"${options[@]}"})

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=${nproc:-$(nvidia-smi -L | wc -l)}
  exec accelerate launch --config_file scripts/accelerate/ddp.yaml --num_processes "$gpus" -m gpg_vl.cli "${args[@]}"
elif [ "${nproc:-1}" -gt 1 ]; then
  ACCELERATE_USE_CPU=1 exec torchrun --standalone --nproc_per_node "$nproc" -m gpg_vl.cli "${args[@]}"
else
  exec python -m gpg_vl.cli "${args[@]}"
fi
