r"""Multigrid vs the fixed-shape baseline, same epoch budget, bp and sideways.

  python -m experiments.benchmarks.multigrid --epochs 16   # 64x64, ~22 min
  python -m experiments.benchmarks.multigrid [--out PATH] [--epochs 6]
      [--size 64|32] [--rows bp:baseline,bp:multigrid,...]
      [--set key=value ...]

MovingDigits *appearance* task (the digit's class; any frame shows it), the
``experiments/configs/multigrid.py`` network (4 stages, three with sub-batch
BN over 8 clips, a skip edge), 8-frame clips, batch 16, Adam. ``--size 64``
(the default): the ``large`` MovingDigits config (64x64 frames, the default
config scaled by 2), crops of 64 (short cycle 32 and 48), short side
jittered in [64, 72]; ``--size 32``: the ``default`` config and crops of 32
(16 and 24), the setting of the earlier runs in ``NOTES``. The baseline
trains ``--epochs`` epochs at that one shape with a stepwise LR (x0.1 at
50% and 75%); ``multigrid`` runs the long and short cycles of
``skipside/multigrid.py`` with the reference's factors on the same baseline
(1.5x its epochs, ~3x fewer steps). Ablations (bp): ``long_only`` (no short
cycle) and ``temporal_long_only`` (long cycle on frames only, crops stay at
the base size).

Every row uses the same loader (``multigrid_loader.MultigridIterator``; the
baseline's schedule has one shape), the same ahead-of-time compilation and
jitted step as ``train.train_and_evaluate`` (``programs.compile_ahead``),
so rows differ only in the schedule. ``compile_s`` (every bucket + eval,
before training) is reported apart from ``train_s`` (the step loop, loader
included), and the schedule is run a second time with the loader and the
steps apart (``load_s``, ``compute_s``: what multigrid saves in compute
alone; ``LOAD_CHUNK`` steps' batches at a time); one run per row, side by
side in one process. Accuracy: top-1 on the 500 test videos.
``sideways`` keeps clips of >= 6 frames (it masks its first ``depth = 3``
ticks), so its long cycle saves less time. The learning
rate is not scaled by the batch factor (Adam; see the config).

Writes ``experiments/results/multigrid.json`` with the configuration, the
device, every row and a ``headline``.
"""

import argparse
import ast
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import multigrid as mg_config
from experiments.benchmarks import common
from skipside import aot, checkpoints, engine, evaluation, multigrid, programs
from skipside import config as config_lib
from skipside import data as data_lib
from skipside.data import multigrid_loader

RESULTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'results')


OVERRIDES = {}  # Config overrides from the command line ('model.stages').
LOAD_CHUNK = 1000  # Steps whose batches are read at once for load_s.


# Schedule variants: config overrides on top of the multigrid config.
VARIANTS = {
    'baseline': {'multigrid.long_cycle': False, 'multigrid.short_cycle': False},
    'multigrid': {},  # Long + short cycles, the reference's factors.
    'long_only': {'multigrid.short_cycle': False},
    'temporal_long_only': {  # Long cycle on frames only: crops stay.
        'multigrid.short_cycle': False,
        'multigrid.long_cycle_factors': ((0.25, 1.0), (0.5, 1.0), (0.5, 1.0),
                                         (1.0, 1.0))},
}
# Runs made apart from the default rows (same script, 2-core CPU shared with
# other jobs), kept with the results; all but the first at 32x32 (--size 32,
# results/multigrid_32.json: before the batched in-memory loader).
NOTES = [
    '64x64, sideways baseline, --epochs 16, lr sweep (--set '
    'optimizer.learning_rate=...; the 2 cores shared, accuracies only): '
    '3e-4 32.8%, 1e-3 45.6%, 3e-3 42.0%, 1e-2 34.4%; 1e-3 with --set '
    'train.flush=3 44.4%. At --epochs 96 and lr 1e-3 '
    '(results/multigrid_sideways_96.json, quiet): baseline 73.2%, its train '
    'loss levelled off; multigrid 70.2% in 1.62x less wall time.',
    '64x64 (--size 64, --epochs 16): the sideways baseline reaches 42.0% '
    '(bp 96.6%): Sideways does not learn this appearance task at 64x64 in '
    '16 epochs at lr 3e-3, so its multigrid row compares two unconverged '
    'runs.',
    '32x32: bp, --epochs 16: baseline 2000 steps, 91.8%; multigrid 613 steps, '
    '76.6%: 15.2 points lower (vs 39.8 points at 6 epochs): the gap shrinks '
    'with the budget. (Its wall times, 2.74x, were taken before '
    'skipside/conv.py, when a per-step overhead dominated on CPU.)',
    '32x32: before the conv stages had sub-batch BN (model.stages '
    "'conv:8:2,conv:16:2,res:16,conv:32:2'), bp multigrid lost 39.8 points "
    '(long cycle only: 9.2), sideways 27.6. With BN and a conv bias ahead of '
    'it (a different init): 24.6 (long only 3.8), sideways 14.8; there, '
    'lr_scaling sqrt gave 50.2% (none: 49.0%), linear 28.8%. One run per '
    'row: the init alone moved the bp baseline from 73.6% to 79.4%, so '
    'differences of ~5 points are noise.',
    '32x32, the earlier loader: on the 2-core CPU it reads 1.5x the clips '
    '(1.5x the epochs) and takes as long as the steps: multigrid saves 2.9x '
    '(bp) and 1.6x '
    '(sideways) in compute_s but about nothing in train_s.',
    '32x32: bp, --epochs 8, lr 3e-3, multigrid only: lr_scaling none 50.4%, '
    'sqrt 29.8% (baseline 82.6%); SGD momentum + linear scaling (the '
    'reference): '
    'baseline 25.6% / multigrid 7.6% at lr 0.1, 19.0% / 9.8% at lr 0.03.',
    '32x32: short runs are update-starved: with Adam a multigrid step (8x '
    'batch, low resolution) is worth about one baseline step, not eight.',
]
# Rows run by default: (mode, variant).
DEFAULT_ROWS = ('bp:baseline,bp:multigrid,sideways:baseline,'
                'sideways:multigrid,bp:long_only,bp:temporal_long_only')


# Frame side -> the MovingDigits config and the crops that go with it.
SIZES = {
    32: {'data.dataset_config': 'default'},
    # 'large' is 'default' scaled by 2; crops of 32, 48, 64 (short cycle).
    64: {'data.dataset_config': 'large', 'data.crop_size': 64,
         'data.scale_jitter': (64, 72), 'multigrid.crop_multiple': 16},
}


def _config(mode: str, variant: str, epochs: float, data_dir: str | None,
            size: int = 64):
  c = mg_config.get_config(','.join(['bp'] if mode == 'bp' else []))
  for key, value in SIZES[size].items():
    _set(c, key, value)
  c.data.num_frames = 8
  c.data.batch_size = 16
  c.data.num_threads = 2
  c.multigrid.min_frames = 1 if mode == 'bp' else 6
  c.train.num_steps = int(round(epochs * 2000 / c.data.batch_size))
  if data_dir:
    c.data.data_dir = data_dir
  for key, value in OVERRIDES.items():
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):  # A plain string.
      pass
    _set(c, key, value)
  for key, value in VARIANTS[variant].items():
    _set(c, key, value)
  return c


def _set(c, key: str, value) -> None:
  """``c.<key> = value`` for a dotted ``key`` ('multigrid.crop_multiple')."""
  *path, last = key.split('.')
  for part in path:
    c = c[part]
  c[last] = value


def run(mode: str, variant: str, epochs: float, data_dir=None,
        size: int = 64) -> dict:
  """Trains one schedule; returns its row (times, steps, accuracy)."""
  c = _config(mode, variant, epochs, data_dir, size)
  data_config = config_lib.data_config(c)
  source = data_lib.make_source(data_config, data_config.split)
  # The baseline is the schedule with both cycles off: one shape, same LR.
  sched = multigrid.schedule_from_config(c, len(source.data))
  it = multigrid_loader.MultigridIterator(data_config, sched, source)
  spec, optimizer, state = checkpoints.init_state(c, it.info, sched)
  t0 = time.perf_counter()
  steps, evals, _ = programs.compile_ahead(
      c, engine.LocalEngine(spec), optimizer, aot.abstract(state.params),
      aot.abstract(state.opt_state), it.info, sched,
      tree_params=aot.abstract(state.params))
  compile_s = time.perf_counter() - t0
  # The compiled steps donate their state: each pass starts from a copy.
  params, opt_state = jax.tree.map(jnp.copy, (state.params, state.opt_state))
  start = it.get_state()
  next(it)  # Warm the loader (its first batch), then restart at step 0.
  it.set_state(start)
  losses = []
  with aot.CompileClock() as compiles:
    t0 = time.perf_counter()
    for _ in range(sched.num_steps):
      batch = next(it)
      params, opt_state, out = steps(params, opt_state, batch['video'],
                                     batch['label'], None)
      losses.append(out.metrics['loss'])
    jax.block_until_ready(params)
    train_s = time.perf_counter() - t0
    eval_it = data_lib.make_eval_iterator(data_config)
    metrics = evaluation.evaluate(spec, params, eval_it, mode=c.mode,
                                  forward=evals)
    eval_it.close()
    # The same schedule again, loader and steps apart, LOAD_CHUNK steps at
    # a time: the chunk's batches read first (load_s), then the steps alone
    # on them (compute_s). Whole schedules do not fit in host memory (96
    # epochs at 64x64: 25 GB of clips).
    it.set_state(start)
    params, opt_state = jax.tree.map(jnp.copy,
                                     (state.params, state.opt_state))
    load_s = compute_s = 0.0
    for first in range(0, sched.num_steps, LOAD_CHUNK):
      t0 = time.perf_counter()
      batches = [next(it) for _ in range(
          min(LOAD_CHUNK, sched.num_steps - first))]
      load_s += time.perf_counter() - t0
      t0 = time.perf_counter()
      for batch in batches:
        params, opt_state, _ = steps(params, opt_state, batch['video'],
                                     batch['label'], None)
      jax.block_until_ready(params)
      compute_s += time.perf_counter() - t0
      del batches
  it.close()
  losses = np.asarray([float(l) for l in losses])
  return {
      'mode': mode, 'schedule': variant,
      'steps': sched.num_steps,
      'epochs': sched.phases[-1].end_epoch,
      'buckets': [list(s) for s in sched.buckets()],
      'compile_s': compile_s, 'train_s': train_s, 'load_s': load_s,
      'compute_s': compute_s,
      'steps_per_s': sched.num_steps / train_s,
      'final_train_loss': float(np.mean(losses[-10:])),
      # Mean train loss over each tenth of the steps: has it levelled off?
      'train_loss_tenths': [float(np.mean(part))
                            for part in np.array_split(losses, 10)],
      'accuracy': metrics['eval/accuracy'],
      'eval_clips': metrics['eval/clips'],
      'compilations_after_compile': compiles.compilations,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(RESULTS, 'multigrid.json'))
  parser.add_argument('--epochs', type=float, default=6.0,
                      help="the baseline's epochs (multigrid: 1.5x)")
  parser.add_argument('--rows', default=DEFAULT_ROWS,
                      help='mode:variant,... (variants: '
                           f'{", ".join(VARIANTS)})')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--size', type=int, default=64, choices=sorted(SIZES),
                      help='frame side: 64 (MovingDigits large) or 32')
  parser.add_argument('--set', action='append', default=[],
                      help='config override key=value, e.g. '
                           'optimizer.learning_rate=3e-3')
  args = parser.parse_args()
  for item in args.set:
    key, value = item.split('=', 1)
    OVERRIDES[key] = value

  rows = []
  print(f'{"mode":9s} {"schedule":18s} {"steps":>6s} {"epochs":>6s} '
        f'{"compile_s":>9s} {"train_s":>8s} {"load_s":>7s} {"compute_s":>9s} '
        f'{"acc":>6s}', flush=True)
  for item in args.rows.split(','):
    mode, variant = item.split(':')
    r = run(mode, variant, args.epochs, args.data_dir, args.size)
    rows.append(r)
    print(f'{r["mode"]:9s} {r["schedule"]:18s} {r["steps"]:6d} '
          f'{r["epochs"]:6.2f} {r["compile_s"]:9.1f} {r["train_s"]:8.1f} '
          f'{r["load_s"]:7.1f} {r["compute_s"]:9.1f} {r["accuracy"]:6.3f}',
          flush=True)

  headline = {}
  for mode in ('bp', 'sideways'):
    for variant in VARIANTS:
      if variant == 'baseline':
        continue
      found = {r['schedule']: r for r in rows if r['mode'] == mode}
      if 'baseline' not in found or variant not in found:
        continue
      base, mg = found['baseline'], found[variant]
      suffix = mode if variant == 'multigrid' else f'{variant}_{mode}'
      headline[f'baseline_over_multigrid_wall_{suffix}'] = round(
          base['train_s'] / mg['train_s'], 3)
      headline[f'baseline_over_multigrid_compute_{suffix}'] = round(
          base['compute_s'] / mg['compute_s'], 3)
      headline[f'accuracy_drop_points_{suffix}'] = round(
          100 * (base['accuracy'] - mg['accuracy']), 2)
      if variant == 'multigrid':
        headline[f'baseline_over_multigrid_wall_with_compile_{mode}'] = round(
            (base['train_s'] + base['compile_s'])
            / (mg['train_s'] + mg['compile_s']), 3)
  print(json.dumps(headline, indent=2))
  c = _config('sideways', 'multigrid', args.epochs, args.data_dir,
              args.size)
  result = {
      'benchmark': 'multigrid',
      'task': f'MovingDigits appearance ({c.data.dataset_config} config: '
              f'2000 train / 500 test videos, 16 frames of {args.size}x'
              f'{args.size}; clips of 8)',
      'configuration': {
          'epochs_baseline': args.epochs, 'model': c.model.to_dict(),
          'data': {k: c.data[k] for k in ('num_frames', 'batch_size',
                                           'crop_size', 'scale_jitter')},
          'optimizer': c.optimizer.to_dict(), 'multigrid': {
              k: v for k, v in c.multigrid.to_dict().items()
              if k != 'compile_cache_dir'},
          'min_frames': {'bp': 1, 'sideways': 6},
          'timing': 'train_s: the step loop (loader included), after every '
                    'shape was compiled ahead of time (compile_s); then the '
                    'same schedule with every batch read first (load_s) and '
                    'the steps alone (compute_s); one run each, same '
                    'process',
      },
      'device': common.device_info(),
      'rows': rows, 'headline': headline,
      'notes': NOTES,
  }
  common.write_result(args.out, result)


if __name__ == '__main__':
  with tempfile.TemporaryDirectory():
    main()
