r"""Skip-Sideways on motion over seeds: the ablations of RESULTS section 6.

  python -m experiments.benchmarks.motion_seeds            # ~11 min, 2 cores
  python -m experiments.benchmarks.motion_seeds --quick    # a smoke run

Every row trains the MovingDigits motion task exactly as
``experiments/reproduce.py`` does (its ``SETTINGS``: 16-frame clips, batch
16, Adam 3e-4, 1000 steps; its nets and ``train_run``) for seeds
``0 .. --seeds-1`` and scores the whole test split. Each row is read
against the row of section 1 (2 pixels per frame, no flush) or of this
table named here:

- ``skip-sideways A, 1 px/frame``: MovingDigits ``smooth``, half the motion
  per frame (the slower video Sideways assumes); against section 1's
  ``skip-sideways A``;
- ``pipelined_bp + skips A, 1 px/frame``: the exact gradient of the same
  net on the same video; against the row above;
- ``skip-sideways A, flush 4``: four flush ticks, so that every message
  lands before the update; against section 1's ``skip-sideways A``;
- ``sideways + temporal stage``: the chain with a ``tconv`` top stage (no
  skips), so the motion can be read inside one stage's input cache; against
  section 1's chain ``sideways`` (and ``bp + temporal stage``).

Writes ``experiments/results/motion_seeds.json``: per row the accuracies,
mean, std, worst, the seeds at >= 95%, and each run's final and lowest
training loss (the mean of the last 50 steps and the lowest 50-step mean;
section 1 uses 20-step windows).
"""

import argparse
import copy
import json
import os

import numpy as np

from experiments import reproduce
from experiments.benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
LOSS_WINDOW = 50  # Steps averaged for the final and lowest training loss.
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


def run_row(row, seeds: int, base, step=None) -> dict:
  """One row over ``seeds`` seeds with ``reproduce.train_run`` (``step``:
  as there)."""
  name, mode, stages, skips, dataset_config, flush = row
  args = copy.copy(base)
  args.flush = flush
  if not base.quick:
    args.dataset_config = dataset_config
  runs = []
  for seed in range(seeds):
    r = reproduce.train_run(reproduce.run_config(
        'motion', (name, mode, stages, skips), seed=seed, args=args), args,
        step)
    runs.append({'seed': seed, 'accuracy': r['eval/accuracy'],
                 'final_train_loss': float(np.mean(r['curve'][-LOSS_WINDOW:])),
                 'lowest_train_loss': reproduce._lowest(r['curve'],
                                                        LOSS_WINDOW),
                 'wall_s': r['wall_s']})
    print(f'{name:36s} seed {seed}: {100 * r["eval/accuracy"]:.1f}%',
          flush=True)
  acc = [r['accuracy'] for r in runs]
  mean, std = reproduce._mean_std(acc)
  s = reproduce.settings('motion', args)
  return {'row': name, 'mode': mode,
          'stages': reproduce._stages(stages, s['width']),
          'skips': [list(e) for e in skips],
          'dataset_config': args.dataset_config, 'flush': args.flush,
          'settings': s, 'runs': runs, 'mean': mean, 'std': std,
          'worst': min(acc), 'seeds_at_95': sum(a >= 0.95 for a in acc)}


def earlier_rows(path: str, names: list, seeds: int, quick: bool) -> list:
  """The rows of the result already at ``path`` that a run of some
  ``--rows`` keeps: only from a result with the same ``--seeds`` and
  ``--quick`` (its rows would not compare otherwise), and only rows still
  in ``names``. Read before anything runs, so a bad file costs no run."""
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      earlier = json.load(f)
    config, rows = earlier['config'], earlier['rows']
  except (OSError, ValueError, KeyError, TypeError) as e:
    print(f'{path}: unreadable ({type(e).__name__}: {e}); replaced')
    return []
  if (config.get('seeds'), bool(config.get('quick'))) != (seeds, quick):
    print(f'{path}: its rows ran with other --seeds/--quick; replaced')
    return []
  gone = [r['row'] for r in rows if r['row'] not in names]
  if gone:
    print(f'{path}: rows no longer defined, dropped: {gone}')
  return [r for r in rows if r['row'] in names]


def with_earlier_rows(earlier: list, done: list) -> list:
  """``earlier``'s rows, each replaced by its new run in ``done``, then
  ``done``'s other rows."""
  new = {r['row']: r for r in done}
  rows = [new.pop(r['row'], r) for r in earlier]
  return rows + [r for r in done if r['row'] in new]


def main(argv=None, rows=ROWS, run=run_row, name='motion_seeds',
         description=__doc__):
  """The command line of a benchmark of rows over seeds: ``run(rows[i],
  seeds, base)`` for each ``--rows`` index, written to
  ``results/<name>.json`` (``motion_hybrid`` runs its own rows here)."""
  parser = argparse.ArgumentParser(description=description.split('\n')[0])
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--rows', default=','.join(map(str, range(len(rows)))),
                      help='indices into ROWS; rows already in --out '
                      '(same --seeds and --quick) and not run are kept')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=os.path.join(
      HERE, '..', 'results', f'{name}.json'))
  args = parser.parse_args(argv)
  base = reproduce.parse_args(['--quick'] if args.quick else [])
  seeds = 1 if args.quick else args.seeds
  names = [r[0] for r in rows]
  earlier = earlier_rows(args.out, names, seeds, args.quick)
  done = [run(rows[int(i)], seeds, base) for i in args.rows.split(',')]
  done = with_earlier_rows(earlier, done)
  headline = {r['row']: {k: r[k] for k in ('mean', 'std', 'worst',
                                            'seeds_at_95')} for r in done}
  print('headline:', headline)
  args.rows = ','.join(str(names.index(r['row'])) for r in done)
  common.write_result(args.out, dict(
      config=dict(vars(args), task='motion', seeds=seeds),
      device=common.device_info(), rows=done, headline=headline))


if __name__ == '__main__':
  main()
