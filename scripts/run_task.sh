#!/usr/bin/env bash
# Launch a training run from a task's preset.
#
#   bash scripts/run_task.sh TASK [--preset NAME] [--launcher NAME] [--nproc N]
#                            [--nnodes M --node-rank K --master HOST:PORT] [section.option=value ...]
#
# The preset is the bundled TASK (gpg-vl presets lists them), or TASK_NAME with --preset NAME.
# The launcher is scripts/accelerate/<NAME>.yaml: ddp, zero2, zero3 or zero3_offload; by default
# the one the preset names in a line "# launcher: NAME" (ddp if none).
# --nproc N: processes on this machine (default: every visible GPU; without GPUs, 1).
# Several machines: the same command on each, with --nnodes M, its own --node-rank K (0..M-1) and
# the address of machine 0 as --master HOST:PORT; train.output_dir on a file system all share.
# On GPUs: accelerate launch with the launcher's config. Without GPUs: ddp runs one plain process,
# or torchrun (gloo); the DeepSpeed launchers run accelerate launch on DeepSpeed's CPU accelerator.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
task=$1; shift
preset=""; launcher=""; nproc=""; nnodes=1; node_rank=0; master=""
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --launcher) launcher=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --master) master=$2; shift 2 ;;
    -h|--help) usage ;;
    *) overrides+=("$1"); shift ;;
  esac
done

presets=$(python -c 'from gpg_vl.resources import PRESETS; print(PRESETS)')
config=$presets/${task}${preset:+_$preset}.yaml
if [ ! -f "$config" ]; then
  echo "no preset ${task}${preset:+_$preset} ($config); presets of '$task':" >&2
  ls "$presets" | sed -n "s/^\(${task}\(_.*\)\{0,1\}\)\.yaml$/  \1/p" | grep . >&2 || echo "  (none: gpg-vl presets lists them)" >&2
  exit 2
fi
launcher=${launcher:-$(sed -n 's/^# launcher: *\([a-z0-9_]*\).*/\1/p' "$config" | head -n 1)}
launcher=${launcher:-ddp}
if [ ! -f "scripts/accelerate/$launcher.yaml" ]; then
  echo "no launcher scripts/accelerate/$launcher.yaml; launchers: $(cd scripts/accelerate && ls *.yaml | sed 's/\.yaml//' | tr '\n' ' ')" >&2
  exit 2
fi
if [ "$nnodes" -gt 1 ] && [[ "$master" != *:* ]]; then
  echo "--nnodes $nnodes needs --master HOST:PORT (machine 0's address) and --node-rank on each machine" >&2
  exit 2
fi
train=(-m gpg_vl.cli train --config "$config" ${overrides[@]+"${overrides[@]}"})

accelerate_launch() {  # $1: processes on this machine
  local machines=()
  if [ "$nnodes" -gt 1 ]; then
    # c10d rendezvous: an agent learns when a worker on another machine stops, and stops its own.
    machines=(--num_machines "$nnodes" --machine_rank "$node_rank" --main_process_ip "${master%:*}"
              --main_process_port "${master##*:}" --rdzv_backend c10d)
  fi
  exec accelerate launch --config_file "scripts/accelerate/$launcher.yaml" --num_processes $(($1 * nnodes)) \
    ${machines[@]+"${machines[@]}"} "${train[@]}"
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  accelerate_launch "${nproc:-$(nvidia-smi -L | wc -l)}"
elif [ "$launcher" != ddp ]; then
  accelerate_launch "${nproc:-1}"
elif [ "$nnodes" -gt 1 ]; then
  # Real multi-process data parallel on CPU (an accelerate MULTI_CPU config runs one process).
  ACCELERATE_USE_CPU=1 exec torchrun --nnodes "$nnodes" --nproc_per_node "${nproc:-1}" --node_rank "$node_rank" \
    --rdzv_backend c10d --rdzv_endpoint "$master" "${train[@]}"
elif [ "${nproc:-1}" -gt 1 ]; then
  ACCELERATE_USE_CPU=1 exec torchrun --standalone --nproc_per_node "$nproc" "${train[@]}"
else
  exec python "${train[@]}"
fi
