r"""Evaluates the latest checkpoint of a run: the absl entry point.

  python -m launch.eval --workdir=workdir/default
  python -m launch.eval --workdir=workdir/default --config.mode=sideways \
      --config=experiments/configs/default.py   # override the run's config

Without ``--config`` the run's own ``workdir/config.json`` is used. Prints the
metrics as JSON (top-1 accuracy, and mAP or next-frame MSE where they apply).
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run to evaluate.',
                               required=True)
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Optional config file[:variant] replacing the run\'s own.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from skipside import evaluation
  metrics = evaluation.evaluate_workdir(_WORKDIR.value, _CONFIG.value)
  print(json.dumps(metrics, sort_keys=True), flush=True)


if __name__ == '__main__':
  app.run(main)
