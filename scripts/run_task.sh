#!/usr/bin/env bash
# Launch a training run from a task's preset.
#
#   bash scripts/run_task.sh TASK [--preset NAME] [--nproc N] [section.option=value ...]
#
# The preset is the bundled TASK (gpg-vl presets lists them), or TASK_NAME with --preset NAME.
# A preset line "# launcher: zero2|zero3|ddp" picks scripts/accelerate/<launcher>.yaml on GPUs.
# On GPUs: accelerate launch over all visible GPUs (or --nproc N).
# Without GPUs: one process, or N CPU processes (gloo) through torchrun with --nproc N.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
task=$1; shift
preset=""; nproc=""
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
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

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  launcher=$(sed -n 's/^# launcher: *\([a-z0-9]*\).*/\1/p' "$config" | head -n 1)
  gpus=${nproc:-$(nvidia-smi -L | wc -l)}
  exec accelerate launch --config_file "scripts/accelerate/${launcher:-ddp}.yaml" --num_processes "$gpus" \
    -m gpg_vl.cli train --config "$config" ${overrides[@]+"${overrides[@]}"}
elif [ "${nproc:-1}" -gt 1 ]; then
  # Real multi-process data parallel on CPU (an accelerate MULTI_CPU config runs one process).
  ACCELERATE_USE_CPU=1 exec torchrun --standalone --nproc_per_node "$nproc" \
    -m gpg_vl.cli train --config "$config" ${overrides[@]+"${overrides[@]}"}
else
  exec python -m gpg_vl.cli train --config "$config" ${overrides[@]+"${overrides[@]}"}
fi
