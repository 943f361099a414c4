r"""Evaluates the latest checkpoint of a run: the absl entry point.

  python -m launch.eval --workdir=workdir/default
  python -m launch.eval --workdir=workdir/default --config.mode=sideways \
      --config=experiments/configs/default.py   # override the run's config

Without ``--config`` the run's own ``workdir/config.json`` is used (custom
stages included: it names them). Prints the metrics as JSON (top-1 accuracy,
and mAP or next-frame MSE where they apply). A bad flag or config is one line
on stderr, ``config error: <key>: <what is wrong> (<what is allowed>)``, exit
code 2 (``launch/errors.py``).
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import errors

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'experiments',
                               'configs', 'default.py')

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run to evaluate.',
                               required=True)
try:  # config_flags loads a file given on the command line at definition.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'Optional config file[:variant] replacing the run\'s own.')
except Exception as e:  # pylint: disable=broad-except  (any: the file's own)
  errors.exit_with(errors.flag_error(e, sys.argv, _DEFAULT_CONFIG))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; a bad flag or config as one line, exit code 2."""
  try:
    args = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.to_dict()  # A file that failed to load raises here.
    return args
  except Exception as e:  # pylint: disable=broad-except  (the file's own too)
    errors.exit_with(errors.flag_error(e, argv, _DEFAULT_CONFIG))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  if not os.path.exists(os.path.join(workdir, 'config.json' if _CONFIG.value
                                     is None else 'checkpoints')):
    errors.exit_with(f'--workdir: {workdir} holds no '
                     f'{"config.json" if _CONFIG.value is None else "checkpoints"}'
                     ' (the workdir of a python -m launch.train run)')
  from skipside import config as config_lib  # pylint: disable=g-import-not-at-top
  from skipside import evaluation  # pylint: disable=g-import-not-at-top
  try:
    metrics = evaluation.evaluate_workdir(workdir, _CONFIG.value)
  except config_lib.ConfigError as e:  # One line, exit code 2 (usage).
    errors.exit_with(str(e))
  except FileNotFoundError as e:  # No readable checkpoint: not a usage error.
    sys.exit(f'error: {e}')
  print(json.dumps(metrics, sort_keys=True), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
