r"""Gradient fidelity over one training run, as the training loop logs it.

  python -m experiments.benchmarks.fidelity            # ~3 min on 2 cores
  python -m experiments.benchmarks.fidelity --quick    # a smoke run

Trains Skip-Sideways (skips A of ``experiments/reproduce.py``: every stage
also reads two below) on the MovingDigits motion task with
``python -m launch.train``'s loop (``train.train_and_evaluate``) and
``config.train.fidelity_every``: every N steps the loop logs
``fidelity/cosine_stage_<l>``, the cosine between each stage's Sideways
gradient and the exact gradient of the same pipelined loss on a fixed probe
batch (the first eval batch; ``skipside/fidelity.py``). Reads them back
from the run's ``metrics.jsonl`` with the training loss and plots both
against the step (``experiments/results/plots/fidelity_over_training.png``).

Writes ``experiments/results/fidelity.json``: the curves, the staleness
of each stage's gradient in ticks (the run summary's), and the headline:
``cosine_stage_<l>_start`` / ``_end`` (the first and last logged value),
``eval_accuracy``.
"""

import argparse
import json
import os
import tempfile

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from experiments.benchmarks import common  # noqa: E402
from experiments.configs import default  # noqa: E402
from skipside import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, '..', 'results')
STAGES = 'conv:8:2,conv:16:2,res:16,conv:32:2,res:32'
SKIPS_A = ((0, 2), (1, 3), (2, 4))


def make_config(steps: int, every: int, frames: int, batch: int, lr: float,
                dataset_config: str, seed: int):
  c = default.get_config('')
  c.seed = c.data.seed = seed
  c.mode, c.model.stages, c.model.skips = 'sideways', STAGES, SKIPS_A
  c.data.task, c.data.dataset_config = 'motion', dataset_config
  c.data.num_frames, c.data.batch_size = frames, batch
  c.optimizer.learning_rate = lr
  c.train.num_steps, c.train.fidelity_every = steps, every
  c.train.log_every = every
  c.train.eval_every = c.train.checkpoint_every = steps
  return c


def curves(workdir: str) -> dict:
  """Per logged step: the fidelity cosines and the training loss."""
  fid, loss = {}, {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      cos = {k: v for k, v in row.items() if k.startswith('fidelity/cosine')}
      if cos:
        fid[row['step']] = [cos[f'fidelity/cosine_stage_{l}']
                            for l in range(len(cos))]
      if 'train/loss' in row:
        loss[row['step']] = row['train/loss']
  steps = sorted(fid)
  return {'steps': steps, 'cosine_per_stage': [fid[s] for s in steps],
          'loss_steps': sorted(loss),
          'loss': [loss[s] for s in sorted(loss)]}


def plot(c: dict, path: str) -> None:
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for l in range(len(c['cosine_per_stage'][0])):
    ax.plot(c['steps'], [v[l] for v in c['cosine_per_stage']], marker='.',
            label=f'stage {l}')
  ax.set(xlabel='training step', ylabel='cosine(sideways, exact)',
         title='Gradient fidelity during training (probe batch)')
  ax.axhline(0, color='gray', lw=0.5)
  ax.legend(fontsize=8)
  ax2.plot(c['loss_steps'], c['loss'])
  ax2.set(xlabel='training step', ylabel='train loss',
          title='Skip-Sideways A, motion')
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--every', type=int, default=50)
  parser.add_argument('--frames', type=int, default=16)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--lr', type=float, default=3e-4)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dataset_config', default='default')
  parser.add_argument('--out', default=os.path.join(RESULTS, 'fidelity.json'))
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.every, args.frames, args.batch = 6, 2, 8, 4
    args.dataset_config = 'small'
  config = make_config(args.steps, args.every, args.frames, args.batch,
                       args.lr, args.dataset_config, args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    config.data.data_dir = os.path.join(tmp, 'data') if args.quick else (
        config.data.data_dir)
    workdir = os.path.join(tmp, 'run')
    summary = train.train_and_evaluate(config, workdir)
    c = curves(workdir)
  png = os.path.join(os.path.dirname(args.out), 'plots',
                     'fidelity_over_training.png')
  plot(c, png)
  stages = len(c['cosine_per_stage'][0])
  headline = {'eval_accuracy': summary['eval/accuracy']}
  for l in range(stages):
    headline[f'cosine_stage_{l}_start'] = c['cosine_per_stage'][0][l]
    headline[f'cosine_stage_{l}_end'] = c['cosine_per_stage'][-1][l]
  staleness = [summary[f'fidelity/staleness_ticks_stage_{l}']
               for l in range(stages)]
  print('step  ' + '  '.join(f'stage {l}' for l in range(stages)))
  for s, v in zip(c['steps'], c['cosine_per_stage']):
    print(f'{s:5d}  ' + '  '.join(f'{x:7.3f}' for x in v))
  print('staleness in ticks per stage:', staleness)
  print('headline:', headline)
  common.write_result(args.out, dict(
      config=dict(vars(args), stages=STAGES, skips=SKIPS_A, task='motion',
                  mode='sideways'),
      device=common.device_info(), curves=c, staleness_ticks=staleness,
      plot=os.path.relpath(png, os.path.dirname(args.out)),
      headline=headline))


if __name__ == '__main__':
  main()
