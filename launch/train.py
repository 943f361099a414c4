r"""Trains a skipside network: the absl entry point.

  python -m launch.train                        # the default run (CPU, about 2 min)
  python -m launch.train --config=experiments/configs/default.py:bp \
      --workdir=workdir/bp --config.train.num_steps=2000

The config is an ``ml_collections`` file (``get_config(variant)``); any key can
be overridden with ``--config.<key>=<value>``; a bad flag, key or value is
one line on stderr, ``config error: <key>: <what is wrong> (<what is
allowed>)``, exit code 2, before anything is written (``launch/errors.py``).
Custom stages go in ``config.model.stages`` as ``package.module:Name(...)``
(README, "Your stages in a config run"). A run resumes from its
``--workdir``. Multi-host: every process runs the same command with
``--coordinator_address=host:port --num_processes=N --process_id=i`` (nothing
on Cloud TPU); see ``launch/distributed.py``. With ``config.mesh.data x
config.mesh.stage`` > 1 the run trains on the depth-parallel mesh engine.

Plan a TPU pod job without a TPU (needs the ``tpu`` extra: libtpu): compile
every program of the run for a topology and print per-chip memory and FLOPs
(``skipside/tpu_plan.py``) and the predicted step time and clips/s; exits
non-zero with one line per shape that would not fit in a chip's HBM
(``--plan_json=PATH``: the same as JSON, ``fits`` and per shape
``is_oom``). Needs shapes, not data: a video-folder config plans without
its dataset (``tpu_plan.data_shapes``)::

  python -m launch.train --config=experiments/configs/default.py \
      --config.mesh.stage=8 --compile_only --topology=v5e:16x16
  python -m launch.train --config=... --compile_only --topology=v5p:4x4x4 \
      --num_slices=2
"""

import dataclasses
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import distributed  # Defines the multi-host flags.
from launch import errors

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'experiments',
                               'configs', 'default.py')


try:  # config_flags loads the file and overrides here, at definition.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Training config file[:variant].',
      lock_config=True)
except Exception as e:  # pylint: disable=broad-except  (any: the file's own)
  errors.exit_with(errors.flag_error(e, sys.argv, _DEFAULT_CONFIG))
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Compile every program of the run for --topology '
    '(no TPU needed) and print per-chip memory, FLOPs and compile time.')
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, 'TPU topology for --compile_only: v4:AxBxC, v5e:AxB, '
    'v5p:AxBxC or v6e:AxB, e.g. v5e:16x16.')
_NUM_SLICES = flags.DEFINE_integer(
    'num_slices', 1, "Slices of --topology (multi-slice: 'data' spans them).")
_HBM_GIB = flags.DEFINE_float(
    'hbm_gib', None, 'HBM per chip for the --compile_only check (default: '
    'the chip\'s, skipside.tpu_plan.CHIPS).')
_PLAN_JSON = flags.DEFINE_string(
    'plan_json', None, 'With --compile_only: also write the plan as JSON '
    '(per program and shape: per-chip bytes, is_oom, predicted step time and '
    'clips/s; "fits" for the whole run) to this path.')
_RESTART = flags.DEFINE_bool(
    'restart', False, 'If --workdir holds a run of another config, move it '
    'aside (to <workdir>/replaced-<time>/) and train from scratch there; '
    'without it such a workdir is refused.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints, metrics and the config go; a run '
    'resumes from it. Default: workdir/<config name>[_<variant>].')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad flag, ``--config`` file or key as one line on
  stderr and exit code 2 (``launch/errors.py``; ml_collections raises
  tracebacks for those)."""
  try:
    args = flags.FLAGS(argv)
    _CONFIG.value.to_dict()  # A file that failed to load raises here.
    return args
  except Exception as e:  # pylint: disable=broad-except  (the file's own too)
    errors.exit_with(errors.flag_error(e, argv, _DEFAULT_CONFIG))


def default_workdir(config_flag: str) -> str:
  path, _, variant = config_flag.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('workdir', name + (f'_{variant}' if variant else ''))


def compile_only(config) -> None:
  """``--compile_only``: the table of every program on ``--topology``."""
  from skipside import tpu_plan  # pylint: disable=g-import-not-at-top
  from skipside import config as config_lib  # pylint: disable=g-import-not-at-top
  if not _TOPOLOGY.value:
    raise app.UsageError('--compile_only needs --topology, e.g. v5e:16x16')
  try:
    chip = tpu_plan.chip_of(_TOPOLOGY.value)
    if _HBM_GIB.value:
      chip = dataclasses.replace(chip, hbm_bytes=int(_HBM_GIB.value * 2**30))
    print(f'Compiling for {_TOPOLOGY.value} x{_NUM_SLICES.value} '
          '(compile only, no TPU needed)...', flush=True)
    reports = tpu_plan.plan(config, _TOPOLOGY.value,
                            num_slices=_NUM_SLICES.value, check=False,
                            log=lambda s: print(s, flush=True))
    print(tpu_plan.table(reports, chip), flush=True)
    if _PLAN_JSON.value:
      with open(_PLAN_JSON.value, 'w') as f:
        json.dump(tpu_plan.plan_json(reports, chip, topology=_TOPOLOGY.value,
                                     num_slices=_NUM_SLICES.value), f,
                  indent=1)
    tpu_plan.check_memory(reports, chip)
  except tpu_plan.MemoryExceededError as e:  # One line per shape, exit 1.
    sys.exit('\n'.join(f'does not fit: {line}'
                       for line in str(e).splitlines()))
  except (ValueError, config_lib.ConfigError) as e:
    errors.exit_with(str(e))


# sysexits.h's EX_IOERR: a checkpoint could not be written (disk full, no
# permission); the run stopped there, the checkpoints before it are intact.
CHECKPOINT_FAILED_EXIT_CODE = 74


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO.
  if _COMPILE_ONLY.value:  # One process, no TPU: nothing to initialize.
    return compile_only(_CONFIG.value)
  try:  # Before any backend starts; no-op single-host.
    distributed.initialize()
  except ValueError as e:  # The three multi-host flags go together.
    errors.exit_with(f'--num_processes: {e} (all three flags, or none)')
  # After absl parsed flags (jax flags included).
  from skipside import train  # pylint: disable=g-import-not-at-top
  from skipside import config as config_lib  # pylint: disable=g-import-not-at-top
  from skipside import checkpoints  # pylint: disable=g-import-not-at-top
  config_flag = flags.FLAGS['config'].config_filename or _DEFAULT_CONFIG
  workdir = _WORKDIR.value or default_workdir(
      flags.FLAGS['config'].value and config_flag)
  logging.info('workdir: %s', workdir)
  try:
    summary = train.train_and_evaluate(_CONFIG.value, workdir,
                                       restart=_RESTART.value)
  except config_lib.ConfigError as e:  # One line, exit code 2 (usage).
    errors.exit_with(str(e))
  except checkpoints.CheckpointSaveError as e:  # The earlier ones are kept.
    errors.exit_now(f'error: {" ".join(str(e).split())}',
                    CHECKPOINT_FAILED_EXIT_CODE)
  print('Summary: ' + json.dumps(
      {k: round(v, 4) if isinstance(v, float) else v
       for k, v in summary.items()}, sort_keys=True), flush=True)
  if summary['preempted']:  # Saved and stopped early: rerun to resume.
    sys.exit(train.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
