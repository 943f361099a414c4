r"""Skip-Sideways on motion over seeds: the ablations of RESULTS section 6.

  python -m experiments.benchmarks.motion_seeds            # ~10 min, 2 cores
  python -m experiments.benchmarks.motion_seeds --quick    # a smoke run

Every row trains the MovingDigits motion task exactly as
``experiments/reproduce.py`` does (its ``SETTINGS``: 16-frame clips, batch
16, Adam 3e-4, 1000 steps; its nets and ``train_run``) for seeds
``0 .. --seeds-1`` and scores the whole test split. Each row changes one
thing against section 1's Skip-Sideways A (2 pixels per frame, no flush):

- ``skip-sideways A, 1 px/frame``: MovingDigits ``smooth`` (half the
  motion per frame: the video Sideways assumes);
- ``pipelined_bp + skips A, 1 px/frame``: the exact gradient of the same
  net on it;
- ``skip-sideways A, flush 4``: four flush ticks, so that every message
  lands before the update;
- ``sideways + temporal stage``: the chain with a ``tconv`` top stage, so
  the motion can be read inside one stage's input cache rather than across
  pipeline delays.

Writes ``experiments/results/motion_seeds.json``: per row the accuracies,
mean, std, worst, the seeds at >= 95%, and each run's final and lowest
training loss (mean of the last / lowest 50-step window).
"""

import argparse
import copy
import os

import numpy as np

from experiments import reproduce
from experiments.benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
# (name, mode, stages, skips, dataset_config, flush)
ROWS = (
    ('skip-sideways A, 1 px/frame', 'sideways', reproduce.STAGES,
     reproduce.SKIPS_A, 'smooth', 0),
    ('pipelined_bp + skips A, 1 px/frame', 'pipelined_bp', reproduce.STAGES,
     reproduce.SKIPS_A, 'smooth', 0),
    ('skip-sideways A, flush 4', 'sideways', reproduce.STAGES,
     reproduce.SKIPS_A, 'default', 4),
    ('sideways + temporal stage', 'sideways', reproduce.TEMPORAL_STAGES,
     reproduce.CHAIN, 'default', 0),
)


def _windows(curve, size=50) -> np.ndarray:
  c = np.asarray(curve, np.float64)
  size = min(size, len(c))
  return np.convolve(c, np.ones(size) / size, mode='valid')


def run_row(row, seeds: int, base) -> dict:
  """One row over ``seeds`` seeds with ``reproduce.train_run``."""
  name, mode, stages, skips, dataset_config, flush = row
  args = copy.copy(base)
  args.flush = flush
  if not base.quick:
    args.dataset_config = dataset_config
  runs = []
  for seed in range(seeds):
    r = reproduce.train_run(reproduce.run_config(
        'motion', (name, mode, stages, skips), seed=seed, args=args), args)
    w = _windows(r['curve'])
    runs.append({'seed': seed, 'accuracy': r['eval/accuracy'],
                 'final_train_loss': float(w[-1]),
                 'lowest_train_loss': float(w.min()), 'wall_s': r['wall_s']})
    print(f'{name:36s} seed {seed}: {100 * r["eval/accuracy"]:.1f}%', flush=True)
  acc = np.array([r['accuracy'] for r in runs])
  return {'row': name, 'mode': mode, 'stages': stages,
          'skips': [list(e) for e in skips],
          'dataset_config': args.dataset_config, 'flush': flush,
          'settings': reproduce.settings('motion', args), 'runs': runs,
          'mean': float(acc.mean()), 'std': float(acc.std()),
          'worst': float(acc.min()),
          'seeds_at_95': int((acc >= 0.95).sum())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--rows', default=','.join(map(str, range(len(ROWS)))),
                      help='indices into ROWS')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=os.path.join(
      HERE, '..', 'results', 'motion_seeds.json'))
  args = parser.parse_args(argv)
  base = reproduce.parse_args(['--quick'] if args.quick else [])
  seeds = 1 if args.quick else args.seeds
  rows = [run_row(ROWS[int(i)], seeds, base) for i in args.rows.split(',')]
  headline = {r['row']: {k: r[k] for k in ('mean', 'std', 'worst',
                                            'seeds_at_95')} for r in rows}
  print('headline:', headline)
  common.write_result(args.out, dict(
      config=dict(vars(args), task='motion', seeds=seeds),
      device=common.device_info(), rows=rows, headline=headline))


if __name__ == '__main__':
  main()
