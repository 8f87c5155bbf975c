#!/usr/bin/env bash
# The main job: UTKFace -> TFRecords -> training -> test-split metrics.
#
#   ./run_training.sh                                   # Kaggle's UTKFace, 10 epochs
#   ./run_training.sh --source=synthetic --epochs=1     # offline, generated faces
#
# Each --flag=value goes to the step that defines it (make_records, train, or
# both, like --records_dir); a flag no step knows is an error.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [[ ! -x .venv/bin/python ]]; then
  echo "run_training: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
extra=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extra=gpu
fi
echo "run_training: installing agegender[$extra] into .venv" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$extra]"

# Ask each entry point which flags it defines, and split the arguments.
mapfile -d '' -t routed < <(.venv/bin/python - "$@" <<'PY'
import subprocess, sys, xml.etree.ElementTree as ET
steps = ('agegender.make_records', 'agegender.train')
own = {}
for step in steps:
  # absl exits 1 after printing --helpxml; the XML is what matters.
  xml = subprocess.run([sys.executable, '-m', step, '--helpxml'],
                       capture_output=True, text=True).stdout
  own[step] = {f.findtext('name') for f in ET.fromstring(xml).iter('flag')
               if '/agegender/' in (f.findtext('file') or '').replace('\\', '/')}
for arg in sys.argv[1:]:
  name = arg.lstrip('-').split('=', 1)[0]
  bare = name[2:] if name.startswith('no') else name
  targets = [s for s in steps if name in own[s] or bare in own[s]]
  if not arg.startswith('--') or not targets:
    sys.exit(f'run_training: error: unknown flag {arg!r}; see '
             f'`python -m agegender.make_records --help` and `python -m agegender.train --help`')
  for step in targets:
    sys.stdout.write(f'{step}:{arg}\0')
sys.stdout.write('ok\0')
PY
)
if [[ ${#routed[@]} -eq 0 || ${routed[-1]} != ok ]]; then exit 2; fi
make_records_args=()
train_args=()
for item in "${routed[@]:0:${#routed[@]}-1}"; do
  case "$item" in
    agegender.make_records:*) make_records_args+=("${item#*:}") ;;
    agegender.train:*) train_args+=("${item#*:}") ;;
  esac
done

.venv/bin/python -m agegender.make_records --skip_if_done "${make_records_args[@]}"
.venv/bin/python -m agegender.train "${train_args[@]}"
