"""Packages a trained run as agegender's built-in model, with a model card measured on the spot.

  python benchmarks/package_model.py --model_dir=runs/packaged --records_dir=/work/records_utk \
      --command="python -m agegender.train ..." --wall_time="52 min"

Copies the run's model.keras and writes its float16 TFLite model into
agegender/models/, evaluates the copied model on the records' test split
(agegender.serving.evaluate, the same code `python -m agegender.evaluate` runs)
and writes card.json (every figure, the records' manifest hash, the commit,
the machine) and MODEL_CARD.md (the same, for people). tests/test_packaged.py
evaluates the packaged model again and checks the card's figures against that.
The model is trained on UTKFace: non-commercial research use only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=wrong-import-position

from agegender import contract  # pylint: disable=wrong-import-position
from agegender import files  # pylint: disable=wrong-import-position
from agegender.serving import evaluate  # pylint: disable=wrong-import-position
from agegender.serving import export  # pylint: disable=wrong-import-position
from agegender.serving import lite  # pylint: disable=wrong-import-position
from agegender.serving import predictor  # pylint: disable=wrong-import-position

flags.DEFINE_string('model_dir', None, 'The trained run to package.', required=True)
flags.DEFINE_string('records_dir', 'records', 'The records it was trained on (its test split '
                    'is evaluated).')
flags.DEFINE_string('command', '', 'The exact command that trained the run.')
flags.DEFINE_string('wall_time', '', 'How long that command took, and on what.')
FLAGS = flags.FLAGS
LICENCE = ('Trained on UTKFace (https://susanqq.github.io/UTKFace/), which is available for '
           'non-commercial research purposes only: so are these weights. The code\'s own '
           'licence (Apache-2.0) is unchanged.')
CARD_JSON = 'card.json'
CARD_MD = 'MODEL_CARD.md'


def manifest_hash(records_dir: str) -> str:
  manifest = contract.read_manifest(records_dir)
  path = os.path.join(manifest['directory'], contract.MANIFEST_NAME)
  return hashlib.sha256(files.read_bytes(path)).hexdigest()


def commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def _rows(groups: dict, name: str) -> list[str]:
  lines = [f'| {name} | images | gender accuracy | age MAE |', '|---|---:|---:|---:|']
  for key, group in groups.items():
    accuracy = group.get('gender_accuracy')
    accuracy = '' if accuracy is None else f'{accuracy:.3f}'
    lines.append(f'| {key} | {group["count"]} | {accuracy} | {group["age_mae"]:.2f} |')
  return lines


def card_markdown(card: dict) -> str:
  metrics = card['metrics']
  lines = ['# agegender packaged model', '', card['licence'], '',
           f'- Recipe: `{card["config"]["model"]["model"]}` at {card["config"]["data"]["image_size"]} '
           f'px, {card["config"]["optim"]["epochs"]} epochs; command: `{card["command"]}`',
           f'- Trained in {card["wall_time"]}; packaged at commit {card["commit"]} on '
           f'{card["machine"]}',
           f'- Records: manifest sha256 `{card["manifest_sha256"]}`; test split, '
           f'{metrics.get("count", "")} images',
           f'- Files: {", ".join(f"{name} ({size / 2**20:.1f} MB)" for name, size in card["files"].items())}',
           '', '## Test split (UTKFace, non-commercial research use only)', '',
           '```', evaluate.format_table(metrics, 'test'), '```', '']
  for key, name in (('by_gender', 'gender'), ('by_race', 'race')):
    if key in metrics:
      lines += _rows(metrics[key], name) + ['']
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  started = time.time()
  target = predictor.PACKAGED_DIR
  os.makedirs(target, exist_ok=True)
  run = FLAGS.model_dir
  files.write_bytes(os.path.join(target, contract.MODEL_FILE),
                    files.read_bytes(export.keras_model_path(run)))
  model = export.load_keras_model(target)
  with files.quiet():
    paths = lite.convert_tflite(model, target)
  os.remove(paths['float32'])  # Only the float16 model ships: half the size, the same figures.
  metrics = evaluate.evaluate_model(model, FLAGS.records_dir, split='test')
  with open(os.path.join(run, contract.CONFIG_FILE)) as f:
    config = json.load(f)
  shipped = sorted(name for name in os.listdir(target) if name not in (CARD_JSON, CARD_MD))
  card = {'licence': LICENCE, 'command': FLAGS.command, 'wall_time': FLAGS.wall_time,
          'commit': commit(), 'machine': machine.describe_cpu(),
          'records_dir': os.path.abspath(FLAGS.records_dir),
          'manifest_sha256': manifest_hash(FLAGS.records_dir), 'config': config,
          'files': {name: os.path.getsize(os.path.join(target, name)) for name in shipped},
          'metrics': metrics}
  files.write_text(os.path.join(target, CARD_JSON), json.dumps(card, indent=2) + '\n')
  files.write_text(os.path.join(target, CARD_MD), card_markdown(card))
  print(card_markdown(card))
  print(f'packaged into {target} in {time.time() - started:.0f} s')
  return 0


if __name__ == '__main__':
  app.run(main)
