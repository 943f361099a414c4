r"""Gradient fidelity over one training run, as the training loop logs it.

  python -m experiments.benchmarks.fidelity            # ~3 min on 2 cores
  python -m experiments.benchmarks.fidelity --quick    # a smoke run
  python -m experiments.benchmarks.fidelity --mean_seeds 0,1,2,3,4

Trains Skip-Sideways (skips A of ``experiments/reproduce.py``: every stage
also reads two below) on the MovingDigits motion task with
``python -m launch.train``'s loop (``train.train_and_evaluate``) and
``config.train.fidelity_every``: every N steps the loop logs
``fidelity/cosine_stage_<l>``, the cosine between each stage's Sideways
gradient and the exact gradient of the same pipelined loss on a fixed probe
batch (the first eval batch; ``skipside/fidelity.py``). Reads them back
from the run's ``metrics.jsonl`` with the training loss and plots both
against the step (``plots/<name>_over_training.png`` beside ``--out``
``<name>.json``: ``experiments/results/plots/fidelity_over_training.png``).

``--mean_seeds 0,1,2,3,4`` measures instead, per seed, what one probe
batch cannot tell apart: over ``--probe_batches`` held-out batches, the
per-stage cosine of the *mean* Sideways gradient with the *mean* exact one
(the direction training follows on average), beside the mean of the
per-batch cosines (``fidelity/cosine_stage_<l>`` without its flush) and
each gradient's consistency ``|mean g| / mean |g|`` (1: every batch agrees;
independent noise gives about ``1/sqrt(probe_batches)``), at initialization
and after each of ``--after_steps`` steps of one ``--steps``-step Sideways
run (``engine.train_step`` with the run's Adam and learning-rate schedule,
as ``experiments/reproduce.py`` trains), with no flush (as training).
Writes ``fidelity_mean_gradients.json`` beside ``--out``.

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

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks import common  # noqa: E402
from experiments.configs import default  # noqa: E402
from skipside import checkpoints, engine, train  # noqa: E402
from skipside import config as config_lib  # noqa: E402
from skipside import data as data_lib  # noqa: E402
from skipside import fidelity  # noqa: E402

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


_stage_grads = jax.jit(fidelity.stage_grads,
                       static_argnames=('eng', 'flush', 'compute_dtype'))


def _probe(eng, params, batches) -> dict:
  """Per stage over ``batches``: cos of the mean gradients, mean per-batch
  cosine, and each mode's consistency ``|mean g| / mean |g|``."""
  sums, norms, per_batch = {}, {}, []
  for b in batches:
    g = _stage_grads(eng, params, b['video'], b['label'], flush=0)
    per_batch.append([float(fidelity.cosine(x, y))
                      for x, y in zip(g['sideways'], g['pipelined_bp'])])
    for mode, blocks in g.items():
      n = [_norm(x) for x in blocks]
      norms[mode] = np.add(norms.get(mode, 0), n)
      sums[mode] = blocks if mode not in sums else jax.tree.map(
          np.add, sums[mode], blocks)
  out = {'mean_gradient_cosine': [
      float(fidelity.cosine(x, y))
      for x, y in zip(sums['sideways'], sums['pipelined_bp'])],
         'per_batch_cosine_mean': np.mean(per_batch, axis=0).tolist()}
  for mode in sums:
    out[f'consistency_{mode}'] = [  # |sum g| / sum |g| = |mean| / mean||.
        _norm(x) / n if n else 0.0 for x, n in zip(sums[mode], norms[mode])]
  return out


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def mean_gradients(seeds, probe_batches: int, after_steps, args,
                   data_dir=None) -> list:
  """Per seed and training step: ``_probe`` on the first ``probe_batches``
  held-out batches (the same for every step)."""
  rows = []
  for seed in seeds:
    # The whole run's steps: its learning-rate schedule, not one ending at
    # the last probe.
    c = make_config(args.steps, 1, args.frames, args.batch, args.lr,
                    args.dataset_config, seed)
    c.data.data_dir = data_dir or c.data.data_dir
    dconfig = config_lib.data_config(c)
    eval_it = data_lib.make_eval_iterator(dconfig)
    probes = [next(eval_it) for _ in range(probe_batches)]
    eval_it.close()
    it = data_lib.make_iterator(dconfig)
    spec, optimizer, state = checkpoints.init_state(c, it.info)
    eng = engine.LocalEngine(spec)
    params, opt_state = state.params, state.opt_state
    step, losses = 0, []
    for target in sorted(after_steps):
      while step < target:
        batch = next(it)
        params, opt_state, out = engine.train_step(
            spec, optimizer, params, opt_state, batch['video'],
            batch['label'], mode='sideways')
        losses.append(float(out.metrics['loss']))
        step += 1
      row = dict(seed=seed, step=step, **_probe(eng, params, probes))
      row['train_loss_last_50'] = (float(np.mean(losses[-50:])) if losses
                                   else None)
      print(seed, step, {k: np.round(v, 3).tolist() if isinstance(v, list)
                         else v for k, v in row.items()}, flush=True)
      rows.append(row)
    it.close()
  return rows


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
  parser.add_argument('--mean_seeds', default='',
                      help='seeds for the mean-gradient study (comma list)')
  parser.add_argument('--probe_batches', type=int, default=16)
  parser.add_argument('--after_steps', default='0,200,400')
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.every, args.frames, args.batch = 6, 2, 8, 4
    args.dataset_config = 'small'
  if args.mean_seeds:
    seeds = [int(x) for x in args.mean_seeds.split(',')]
    steps = [int(x) for x in args.after_steps.split(',')]
    if max(steps) > args.steps:
      parser.error(f'--after_steps {max(steps)} is past --steps {args.steps}')
    with tempfile.TemporaryDirectory() as tmp:
      rows = mean_gradients(seeds, args.probe_batches, steps, args,
                            os.path.join(tmp, 'data') if args.quick else None)
    common.write_result(
        os.path.join(os.path.dirname(args.out),
                     'fidelity_mean_gradients.json'),
        dict(config=dict(vars(args), stages=STAGES, skips=SKIPS_A,
                         task='motion', mode='sideways', flush=0),
             device=common.device_info(), rows=rows))
    return
  config = make_config(args.steps, args.every, args.frames, args.batch,
                       args.lr, args.dataset_config, args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    config.data.data_dir = os.path.join(tmp, 'data') if args.quick else (
        config.data.data_dir)
    workdir = os.path.join(tmp, 'run')
    summary = train.train_and_evaluate(config, workdir)
    c = curves(workdir)
  name = os.path.splitext(os.path.basename(args.out))[0]
  png = os.path.join(os.path.dirname(args.out), 'plots',
                     f'{name}_over_training.png')
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
