#!/usr/bin/env bash
# Does the input keep a GPU busy? One command, prepared for one H100 or H200 with 16 cores,
# that finishes in under 8 minutes there:
#
#   benchmarks/gpu_check.sh            # the GPU check: benchmarks/results/gpu_check.{json,txt}
#   benchmarks/gpu_check.sh --quick    # a few steps on a tiny synthetic set, on the CPU
#
# Options: --out=DIR (default benchmarks/results), --source=PATH (images to convert; default
# ../shared/data/UTKFace.tar or shared/data/UTKFace.tar when present, else synthetic faces),
# --work_dir=DIR (the records, kept there so that a second run converts nothing; default a
# temporary folder), --budget_s=SECONDS (the whole run; default 450, under 8 minutes).
# PYTHON picks the interpreter (default .venv/bin/python, else python3); GPU figures need
# TensorFlow with GPU support (pip install -e '.[gpu]').
#
# It converts the images into records in three storages, as make_records --image_format and
# --image_size would (source JPEG bytes; JPEG re-encoded at 128; raw uint8 pixels at 128), and
# runs benchmarks/training_throughput.py over them: the default model and seed_cnn (one model
# while they are the same), each in mixed precision and float32, without and with XLA;
# training fed by the pipeline and by one in-memory batch repeated, their ratio, the input
# alone and the bytes per batch. Why one script: only a GPU says whether the input holds
# training back, a GPU is at hand rarely and briefly, so the check is prepared as one command
# whose CPU twin (--quick) a test runs, so it cannot rot. The JSON is rewritten after every
# cell, and cells that would end past the budget are listed as skipped, so a run cut short
# still leaves figures.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$SECONDS

quick=0
out=benchmarks/results
source=
work_dir=
budget_s=450
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    --out=*) out=${arg#*=} ;;
    --source=*) source=${arg#*=} ;;
    --work_dir=*) work_dir=${arg#*=} ;;
    --budget_s=*) budget_s=${arg#*=} ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Looked up, not imported: importing TensorFlow costs seconds.
has_tensorflow='import importlib.util, sys; sys.exit(not importlib.util.find_spec("tensorflow"))'
if ! "$PYTHON" -c "$has_tensorflow"; then
  echo "gpu_check.sh: $PYTHON has no tensorflow; install the project with" \
       "pip install -e '.[gpu]' ('.[cpu]' for --quick), or set PYTHON" >&2
  exit 2
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

models=default,seed_cnn
if (( quick )); then
  # Two shared cores: the default model only, 32px, batches of 8, two timed steps, one round;
  # the two variants between them take every path (float32; mixed precision's loss scaling;
  # XLA). Another model takes the same paths: the full check runs both.
  models=default
  name=gpu_check_quick
  size=32
  source=${source:-synthetic}
  variants=float32,mixed_float16+xla
  settings=(--synthetic_count=120 --batch_size=8 --warmup=1 --steps=2 --input_steps=2
            --rounds=1)
else
  name=gpu_check
  size=128
  if [[ -z $source ]]; then
    source=synthetic
    for candidate in ../shared/data/UTKFace.tar shared/data/UTKFace.tar; do
      if [[ -f $candidate ]]; then source=$candidate; break; fi
    done
  fi
  # Mixed precision first: the goal is stated for it, and a run cut short keeps it.
  variants=mixed_float16,float32,mixed_float16+xla,float32+xla
  settings=(--synthetic_count=10000 --batch_size=128 --warmup=10 --steps=60 --input_steps=60
            --rounds=2)
fi
if [[ -n $work_dir ]]; then settings+=(--work_dir="$work_dir"); fi

mkdir -p "$out"
echo "gpu_check: $source as source, jpeg@$size and raw@$size records; budget $budget_s s"
"$PYTHON" benchmarks/training_throughput.py --source="$source" \
    --storages="source,jpeg@$size,raw@$size" --image_size="$size" \
    --models="$models" --variants="$variants" "${settings[@]}" \
    --budget_s="$(( budget_s - (SECONDS - started) ))" \
    --json="$out/$name.json" --table="$out/$name.txt"
echo "gpu_check: wrote $out/$name.json and $out/$name.txt in $((SECONDS - started)) s"
