r"""Regenerates experiments/RESULTS.md and its plots: the papers' claims at CPU scale.

  python -m experiments.reproduce            # everything, CPU-sized (2 cores)
  python -m experiments.reproduce --quick    # smoke version (a few minutes)

Sections (each table and plot in RESULTS.md is preceded by this command):

1. Training curves and held-out accuracy of ``bp``, ``pipelined_bp``,
   ``sideways`` and Skip-Sideways (two skip patterns) on the MovingDigits
   appearance and motion tasks, several seeds, mean ± std. The exact-gradient
   baselines for motion are ``pipelined_bp`` with the same skip edges and
   ``bp`` with a temporal stage (DESIGN.md §1: synchronous skips add no
   motion).
2. Next-frame prediction error of Sideways vs Skip-Sideways.
3. Memory, multigrid, PGT, mesh and input figures, read from the benchmarks'
   JSON in ``experiments/results/`` (run those scripts to refresh them).
4. Gradient fidelity: cosine similarity between the Sideways gradient and the
   exact (``pipelined_bp``) gradient, per stage, against the digits' speed in
   pixels per frame (0 = a still video).
"""

import argparse
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from experiments.configs import default  # noqa: E402
from flax import nnx  # noqa: E402

from skipside import checkpoints, data, engine, evaluation, network  # noqa: E402,E501
from skipside import config as config_lib  # noqa: E402
from skipside import fidelity as fidelity_lib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHAIN = ()
SKIPS_A = ((0, 2), (1, 3), (2, 4))  # Every stage also reads two below.
SKIPS_B = ((0, 3), (1, 4))  # Spans of three: two frames newer than the chain.
STAGES = 'conv:{0}:2,conv:{1}:2,res:{1},conv:{2}:2,res:{2}'
TEMPORAL_STAGES = 'conv:{0}:2,conv:{1}:2,res:{1},conv:{2}:2,tconv'


def _stages(template: str, width: int) -> str:
  """The row's stage string with channels width, 2 x width, 4 x width."""
  return template.format(width, 2 * width, 4 * width)

# (name, mode, stages, skips[, frames]): the rows of section 1; frames, when
# given, replaces the task's clip length (an ablation row).
ROWS = (
    ('bp', 'bp', STAGES, CHAIN),
    ('bp + temporal stage', 'bp', TEMPORAL_STAGES, CHAIN),
    ('pipelined_bp', 'pipelined_bp', STAGES, CHAIN),
    ('pipelined_bp + skips A', 'pipelined_bp', STAGES, SKIPS_A),
    ('sideways', 'sideways', STAGES, CHAIN),
    ('skip-sideways A', 'sideways', STAGES, SKIPS_A),
    ('skip-sideways B', 'sideways', STAGES, SKIPS_B),
    ('pipelined_bp + skips B', 'pipelined_bp', STAGES, SKIPS_B),
)
# Short clips: with 8 frames through 5 stages the bottom stages receive no
# Sideways message within a clip (gradient ticks per stage are printed).
SHORT_CLIP_ROWS = (
    ('skip-sideways A, 8 frames', 'sideways', STAGES, SKIPS_A, 8),
    ('skip-sideways B, 8 frames', 'sideways', STAGES, SKIPS_B, 8),
)
NEXT_FRAME_ROWS = (
    ('sideways', 'sideways', STAGES, CHAIN),
    ('skip-sideways A', 'sideways', STAGES, SKIPS_A),
    ('skip-sideways B', 'sideways', STAGES, SKIPS_B),
)

# Per task: first-stage width, clip length, batch, Adam learning rate, steps,
# standardized pixels. Appearance: a net twice as wide at lr 3e-3 on
# standardized pixels (bp was 44.5% held-out at width 8, lr 3e-4, 1000
# steps: underfit). Motion: 16-frame clips, so every stage of the 5-stage
# chain gets Sideways gradient on 8 ticks of each clip. The command-line
# flags, when given, override these for every task.
SETTINGS = {
    'appearance': dict(width=16, frames=12, batch=16, lr=3e-3, steps=600,
                       standardize=True),
    'motion': dict(width=8, frames=16, batch=16, lr=3e-4, steps=1000,
                   standardize=False),
    'next_frame': dict(width=8, frames=16, batch=16, lr=3e-4, steps=1000,
                       standardize=False),
}


def settings(task: str, args, frames=None) -> dict:
  """The task's settings with the command line's overrides applied."""
  out = dict(SETTINGS[task])
  for key in out:
    if getattr(args, key, None) is not None:
      out[key] = getattr(args, key)
  if frames is not None and not args.quick:
    out['frames'] = frames
  return out


def run_config(task: str, row, *, seed: int, args):
  _, mode, stages, skips, *frames = row
  s = settings(task, args, *frames)
  c = default.get_config('next_frame' if task == 'next_frame' else '')
  c.seed = seed
  c.mode = mode
  c.model.stages = _stages(stages, s['width'])
  c.model.skips = skips
  c.data.task = task
  c.data.seed = seed
  c.data.num_frames = s['frames']
  c.data.batch_size = s['batch']
  c.data.dataset_config = args.dataset_config
  if s['standardize']:
    c.data.mean, c.data.std = _pixel_stats(args.dataset_config, task)
  c.optimizer.learning_rate = s['lr']
  c.train.num_steps = s['steps']
  return c


_PIXEL_STATS = {}


def _pixel_stats(dataset_config: str, task: str) -> tuple[float, float]:
  """Mean and std of the training pixels in [0, 1] (64 clips).

  MovingDigits frames are mostly black background; standardized inputs let
  every mode leave the initial plateau within the step budget.
  """
  key = (dataset_config, task)
  if key not in _PIXEL_STATS:
    dconfig = data.get_config()
    dconfig.update(dataset_config=dataset_config, task=task, batch_size=64,
                   seed=0)
    it = data.make_iterator(dconfig)
    video = np.asarray(next(it)['video'], np.float64)
    it.close()
    _PIXEL_STATS[key] = (float(video.mean()), float(video.std()))
  return _PIXEL_STATS[key]


def train_run(config, args, step=None) -> dict:
  """Trains with the engine directly; returns the curve and held-out metrics.

  ``step(spec, optimizer, params, opt_state, clip, targets) -> (params,
  opt_state, ClipOutput)`` replaces ``engine.train_step`` in
  ``config.mode`` (the benchmarks' hybrid gradients).
  """
  dconfig = config_lib.data_config(config)
  it = data.make_iterator(dconfig)
  spec, optimizer, state = checkpoints.init_state(config, it.info)
  params, opt_state = state.params, state.opt_state
  step = step or functools.partial(engine.train_step, mode=config.mode,
                                   flush=args.flush)
  curve, t0 = [], time.time()
  for _ in range(config.train.num_steps):
    batch = next(it)
    targets = batch['target'] if spec.loss == 'mse' else batch['label']
    params, opt_state, out = step(spec, optimizer, params, opt_state,
                                  batch['video'], targets)
    curve.append(float(out.metrics['loss']))
  wall = time.time() - t0
  it.close()
  eval_it = data.make_eval_iterator(dconfig)
  metrics = evaluation.evaluate(spec, params, eval_it, mode=config.mode,
                                max_batches=args.eval_batches)
  eval_it.close()
  return {'curve': curve, 'wall_s': wall, **metrics}


def _mean_std(values):
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std())


# --quick trains only these rows (one per mode family): a smoke test.
QUICK_ROWS = ('bp', 'sideways', 'skip-sideways B')


def _jobs(args):
  """Every training run of sections 1 and 2: (task, row index, seed)."""
  out = []
  for task in ('appearance', 'motion', 'next_frame'):
    out += [(task, i, seed) for i in range(len(_rows_of(task, args.quick)))
            for seed in range(args.seeds)]
  return out


def _rows_of(task, quick=False):
  rows = {'appearance': ROWS, 'motion': ROWS + SHORT_CLIP_ROWS,
          'next_frame': NEXT_FRAME_ROWS}[task]
  return tuple(r for r in rows if r[0] in QUICK_ROWS) if quick else rows


def run_job(job, args) -> dict:
  task, i, seed = job
  return train_run(run_config(task, _rows_of(task, args.quick)[i], seed=seed,
                              args=args), args)


def run_all(args, argv, log) -> dict:
  """Runs every job, in this process or in ``args.jobs`` subprocesses."""
  jobs, done = _jobs(args), {}
  if args.jobs <= 1:
    for job in jobs:
      done[job] = run_job(job, args)
      _log_run(job, done[job], args, log)
    return done
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp()
  pending, running = list(jobs), {}
  while pending or running:
    while pending and len(running) < args.jobs:
      job = pending.pop(0)
      path = os.path.join(tmp, '%s_%d_%d.json' % job)
      cmd = [sys.executable, '-m', 'experiments.reproduce', *argv,
             '--job', '%s:%d:%d' % job, '--job_out', path]
      running[job] = (subprocess.Popen(cmd), path)
    for job, (proc, path) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[job]
      if proc.returncode:
        raise RuntimeError(f'run {job} failed with code {proc.returncode}')
      with open(path) as f:
        done[job] = json.load(f)
      _log_run(job, done[job], args, log)
    time.sleep(0.5)
  return done


def _log_run(job, r, args, log):
  task, i, seed = job
  key = 'eval/accuracy' if task != 'next_frame' else 'eval/next_frame_mse'
  log(f'  {task:>10} {_rows_of(task, args.quick)[i][0]:<24} seed {seed}: '
      f'{key}={r[key]:.4f} ({r["wall_s"]:.0f}s)')


def collect(task: str, done: dict, args) -> list[dict]:
  results = []
  for i, row in enumerate(_rows_of(task, args.quick)):
    name, mode, stages, skips, *frames = row
    s = settings(task, args, *frames)
    results.append({'task': task, 'row': name, 'mode': mode,
                    'stages': _stages(stages, s['width']),
                    'skips': [list(e) for e in skips], 'settings': s,
                    'runs': [done[task, i, s] for s in range(args.seeds)]})
  return results


def fidelity(args, log) -> list[dict]:
  """Per-stage cosine(sideways, exact) vs speed, at init and after bp."""
  from skipside.data import moving_digits
  rows = []
  for speed in args.speeds:
    cfg = moving_digits.MovingDigitsConfig(
        name=f'speed{speed}', num_frames=args.fidelity_frames, speed=speed)
    examples = [moving_digits.generate_example(cfg, 'train', i)
                for i in range(settings('motion', args)['batch'])]
    clip = jnp.asarray(np.stack([e['video'] for e in examples]),
                       jnp.float32) / 255.0
    labels = jnp.asarray([e['direction'] for e in examples], jnp.int32)
    c = run_config('motion', ROWS[5], seed=0, args=args)
    net = config_lib.build_network(c, tuple(clip.shape[2:]), 4,
                                   nnx.Rngs(0))
    spec, params = network.split(net)
    # A flush of L-1 ticks (the default) lets every in-flight message land.
    cos = [float(v) for v in fidelity_lib.stage_cosines(
        engine.LocalEngine(spec), params, clip, labels)]
    rows.append({'speed': speed, 'cosine_per_stage': cos})
    log(f'  speed {speed}: ' + ' '.join(f'{v:.3f}' for v in cos))
  return rows


def read_benchmarks() -> dict:
  """Headlines of every benchmark JSON (CPU runs, and ``*_h100`` runs)."""
  out = {}
  results = os.path.join(HERE, 'results')
  for name in ('conv', 'memory', 'mesh', 'mpmd', 'multigrid', 'pgt', 'input',
               'fidelity', 'scale'):
    for suffix in ('', '_h100'):
      path = os.path.join(results, f'{name}{suffix}.json')
      if os.path.exists(path):
        with open(path) as f:
          blob = json.load(f)
        out[name + suffix] = {'headline': blob.get('headline', {}),
                              'device': blob.get('device', {})}
  return out


# -- Report. -----------------------------------------------------------------

def _plot_curves(results, path, smooth=20):
  tasks = sorted({r['task'] for r in results})
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4),
                           squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for r in (r for r in results if r['task'] == task):
      curves = np.asarray([run['curve'] for run in r['runs']])
      k = max(1, min(smooth, curves.shape[1]))
      kernel = np.ones(k) / k
      sm = np.stack([np.convolve(c, kernel, mode='valid') for c in curves])
      m, s = sm.mean(0), sm.std(0)
      ax.plot(m, label=r['row'])
      ax.fill_between(np.arange(len(m)), m - s, m + s, alpha=0.15)
    ax.set(title=f'{task}: train loss (mean ± std over seeds)',
           xlabel='step', ylabel='loss')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_fidelity(rows, path):
  fig, ax = plt.subplots(figsize=(6, 4))
  stages = len(rows[0]['cosine_per_stage'])
  for l in range(stages):
    ax.plot([r['speed'] for r in rows],
            [r['cosine_per_stage'][l] for r in rows], marker='o',
            label=f'stage {l}')
  ax.set(xlabel='digit speed (pixels per frame)',
         ylabel='cosine(sideways, exact)',
         title='Sideways gradient fidelity vs smoothness and depth')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _lowest(curve, k=20):
  """The lowest k-step running mean of a loss curve."""
  k = max(1, min(k, len(curve)))
  return float(np.convolve(curve, np.ones(k) / k, mode='valid').min())


def _fmt(m, s, pct=False):
  return f'{100 * m:.1f} ± {100 * s:.1f}' if pct else f'{m:.4f} ± {s:.4f}'


def write_report(out_path, args, results, next_frame, fid, bench, env):
  cmd = ' '.join(['python -m experiments.reproduce', *args.argv])
  plots = os.path.join(os.path.dirname(out_path), 'results', 'plots')
  os.makedirs(plots, exist_ok=True)
  rel = os.path.relpath(plots, os.path.dirname(out_path))
  curves_png = os.path.join(plots, 'training_curves.png')
  fid_png = os.path.join(plots, 'gradient_fidelity.png')
  _plot_curves(results, curves_png)
  _plot_fidelity(fid, fid_png)

  lines = [
      '# Results', '',
      'Every table and plot below was made by the command written above it, '
      f'on {env["device"]} (jax {env["jax"]}, {env["host"]}), '
      f'{env["date"]}: flush {args.flush}, {args.seeds} seed(s) per row, '
      f'MovingDigits `{args.dataset_config}`, held-out '
      f'evaluation on {"at most " + str(args.eval_batches) + " batches" if args.eval_batches else "the whole test split"}, '
      'Adam with the default schedule (warm-up, cosine, gradient clipping '
      'at norm 1).'
      + (f' Training and evaluating every run took {env["wall_s"] / 60:.1f} '
         'min.' if 'wall_s' in env else ''),
      '', '| task | first-stage width | clip frames | batch | lr | steps | '
      'standardized pixels |', '| --- | --- | --- | --- | --- | --- | --- |']
  for task in ('appearance', 'motion', 'next_frame'):
    t = settings(task, args)
    lines.append(f'| {task} | {t["width"]} | {t["frames"]} | {t["batch"]} | '
                 f'{t["lr"]:g} | {t["steps"]} | {t["standardize"]} |')
  lines += [
      '',
      '## 1. Accuracy of the modes (MovingDigits)', '',
      f'```bash\n{cmd}\n```', '',
      '| task | row | mode | skips | frames | held-out top-1 % | worst seed % '
      '| final train loss | lowest train loss | train wall s |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in results:
    accs = [run['eval/accuracy'] for run in r['runs']]
    loss = _mean_std([np.mean(run['curve'][-20:]) for run in r['runs']])
    low = _mean_std([_lowest(run['curve']) for run in r['runs']])
    wall = np.mean([run['wall_s'] for run in r['runs']])
    frames = r.get('settings', {}).get('frames', '')
    lines.append(f'| {r["task"]} | {r["row"]} | `{r["mode"]}` | '
                 f'{r["skips"] or "none"} | {frames} | '
                 f'{_fmt(*_mean_std(accs), pct=True)} | {100 * min(accs):.1f} '
                 f'| {_fmt(*loss)} | {_fmt(*low)} | {wall:.0f} |')
  lines += ['', 'Lowest train loss: the lowest 20-step mean of the curve; '
            'well below the final loss, it means the run learnt and then '
            'lost it.']
  lines += ['', 'Chance is 10% (appearance, 10 digits) and 25% (motion, 4 '
            'directions).', '', f'```bash\n{cmd}\n```', '',
            f'![training curves]({rel}/training_curves.png)', '',
            '## 2. Next-frame prediction', '', f'```bash\n{cmd}\n```', '',
            '| row | skips | held-out next-frame MSE |', '| --- | --- | --- |']
  for r in next_frame:
    mse = _mean_std([run['eval/next_frame_mse'] for run in r['runs']])
    lines.append(f'| {r["row"]} | {r["skips"] or "none"} | {_fmt(*mse)} |')
  lines += ['', '## 3. Benchmarks', '',
            'Headline figures from `experiments/results/<name>.json`, made by '
            '`python -m experiments.benchmarks.<name>` (the device is the '
            "benchmark's own).", '',
            '| benchmark | device | headline |', '| --- | --- | --- |']
  for name, b in sorted(bench.items()):
    dev = b['device']
    if isinstance(dev, dict):
      dev = dev.get('kind') or dev.get('device_kind') or dev.get('platform')
    head = ', '.join(f'`{k}` = {v:.3g}' if isinstance(v, (int, float))
                     else f'`{k}` = {v}' for k, v in b['headline'].items()
                     if not isinstance(v, dict))  # (Nested: in the JSON.)
    lines.append(f'| {name} | {dev} | {head} |')
  missing = sorted({'memory', 'mesh', 'multigrid', 'pgt', 'input'} -
                   {name.split('_')[0] for name in bench})
  if missing:
    lines += ['', f'Not yet measured (no JSON): {", ".join(missing)}.']
  lines += ['', '## 4. Gradient fidelity', '', f'```bash\n{cmd}\n```', '',
            'Cosine similarity between the Sideways gradient and the exact '
            'gradient of the same pipelined loss (`pipelined_bp`), per stage, '
            f'at initialization, on {args.fidelity_frames}-frame motion clips '
            'with a flush of L-1 ticks, Skip-Sideways A network.', '',
            '| speed (px/frame) | ' + ' | '.join(
                f'stage {l}' for l in range(len(fid[0]['cosine_per_stage'])))
            + ' |',
            '| --- |' + ' --- |' * len(fid[0]['cosine_per_stage'])]
  for r in fid:
    lines.append(f'| {r["speed"]} | ' + ' | '.join(
        f'{v:.3f}' for v in r['cosine_per_stage']) + ' |')
  lines += ['', f'![gradient fidelity]({rel}/gradient_fidelity.png)', '']
  lines += _fidelity_over_training(rel)
  lines += _failing_seeds(rel, results)
  with open(out_path, 'w') as f:
    f.write('\n'.join(lines))


def _fidelity_over_training(rel: str) -> list[str]:
  """Section 5 from ``experiments/results/fidelity.json`` (its own
  command: ``python -m experiments.benchmarks.fidelity``)."""
  path = os.path.join(HERE, 'results', 'fidelity.json')
  if not os.path.exists(path):
    return ['## 5. Gradient fidelity during training', '',
            'Not yet measured: run `python -m experiments.benchmarks.fidelity`.',
            '']
  with open(path) as f:
    blob = json.load(f)
  c, cfg = blob['curves'], blob['config']
  stages = len(c['cosine_per_stage'][0])
  lines = ['## 5. Gradient fidelity during training', '',
           '```bash\npython -m experiments.benchmarks.fidelity\n```', '',
           f'Skip-Sideways A on motion ({cfg["frames"]}-frame clips, batch '
           f'{cfg["batch"]}, lr {cfg["lr"]:g}, {cfg["steps"]} steps, seed '
           f'{cfg["seed"]}) trained by the training loop with '
           f'`train.fidelity_every={cfg["every"]}`: per stage, the cosine '
           'between the Sideways gradient and the exact gradient of the same '
           'pipelined loss on a fixed probe batch (the first eval batch), as '
           'the loop logs it (`fidelity/cosine_stage_<l>`). Staleness in '
           'ticks per stage: ' + ', '.join(map(str, blob['staleness_ticks']))
           + f'. Held-out accuracy at the end: '
           f'{100 * blob["headline"]["eval_accuracy"]:.1f}%.', '',
           '| step | ' + ' | '.join(f'stage {l}' for l in range(stages)) +
           ' | train loss |', '| --- |' + ' --- |' * (stages + 1)]
  loss = dict(zip(c['loss_steps'], c['loss']))
  every = max(1, len(c['steps']) // 10)  # About ten rows of the curve.
  for i, (step, cos) in enumerate(zip(c['steps'], c['cosine_per_stage'])):
    if i % every and i != len(c['steps']) - 1:
      continue
    lines.append(f'| {step} | ' + ' | '.join(f'{v:.3f}' for v in cos) +
                 f' | {loss[step]:.4f} |' if step in loss else
                 f'| {step} | ' + ' | '.join(f'{v:.3f}' for v in cos) +
                 ' | - |')
  lines += ['', f'![fidelity over training]({rel}/{os.path.basename(blob["plot"])})',
            '']
  return lines


def _lowest_cosines(blob: dict, every: int) -> list[float]:
  """Per stage, the lowest logged cosine at steps that are multiples of
  ``every`` (curves logged at different rates compare on the same steps)."""
  c = blob['curves']
  rows = [v for s, v in zip(c['steps'], c['cosine_per_stage'])
          if s % every == 0]
  return [min(v[l] for v in rows) for l in range(len(rows[0]))]


def _failing_seeds(rel: str, results) -> list[str]:
  """Section 6: ``results/fidelity_seed1.json`` (a seed where Skip-Sideways
  does not learn motion) beside section 5's seed,
  ``results/motion_seeds.json`` (``_motion_ablations``) and
  ``results/fidelity_mean_gradients.json`` (the mean-gradient study, each
  seed's section 1 accuracy from ``results``), each under the command that
  made it (from its own ``config``); absent files are named, not invented."""
  lines = ['## 6. Skip-Sideways on motion: seeds that do not learn', '']
  path = os.path.join(HERE, 'results', 'fidelity_seed1.json')
  learning = os.path.join(HERE, 'results', 'fidelity.json')
  if os.path.exists(path) and os.path.exists(learning):
    blobs = []
    for p in (path, learning):
      with open(p) as f:
        blobs.append(json.load(f))
    bad, good = blobs
    every = max(b['config']['every'] for b in blobs)

    def fmt(values):
      return ', '.join(f'{x:.2f}' for x in values)
    cfg, loss = bad['config'], bad['curves']['loss']
    lines += [
        '```bash\npython -m experiments.benchmarks.fidelity --seed '
        f'{cfg["seed"]} --every {cfg["every"]} --out {cfg["out"]}\n```', '',
        f'Seed {cfg["seed"]}, otherwise the run of section 5: held-out '
        f'accuracy {100 * bad["headline"]["eval_accuracy"]:.1f}%, train loss '
        f'between {min(loss):.3f} and {max(loss):.3f} at every logged step. '
        'Lowest per-batch cosine per stage over training (the loop\'s '
        f'metric, flushed; at steps that are multiples of {every}): '
        f'{fmt(_lowest_cosines(bad, every))}; at the end '
        f'{fmt(bad["curves"]["cosine_per_stage"][-1])}. Section 5\'s seed '
        f'{good["config"]["seed"]} '
        f'({100 * good["headline"]["eval_accuracy"]:.1f}%): lowest '
        f'{fmt(_lowest_cosines(good, every))}.', '',
        f'![fidelity, seed {cfg["seed"]}]'
        f'({rel}/{os.path.basename(bad["plot"])})', '']
  else:
    lines += ['Not yet measured: `python -m experiments.benchmarks.fidelity '
              '--seed 1 --every 25 --out '
              'experiments/results/fidelity_seed1.json` (and section 5).', '']
  lines += _motion_ablations(os.path.join(HERE, 'results',
                                          'motion_seeds.json'))
  lines += _motion_hybrid(os.path.join(HERE, 'results', 'motion_hybrid.json'))
  path = os.path.join(HERE, 'results', 'fidelity_mean_gradients.json')
  if not os.path.exists(path):
    return lines + ['Mean-gradient study not yet measured: `python -m '
                    'experiments.benchmarks.fidelity --mean_seeds '
                    '0,1,2,3,4`.', '']
  with open(path) as f:
    blob = json.load(f)
  cfg = blob['config']
  k = cfg['probe_batches']
  accuracy = {}  # Seed -> section 1's Skip-Sideways A accuracy on motion.
  for r in results:
    if r['task'] == 'motion' and r['row'] == 'skip-sideways A':
      accuracy = dict(enumerate(run['eval/accuracy'] for run in r['runs']))
  lines += [
      '```bash\npython -m experiments.benchmarks.fidelity --mean_seeds '
      f'{cfg["mean_seeds"]} --probe_batches {k} '
      f'--after_steps {cfg["after_steps"]}\n```', '',
      f'Per seed, on the same {k} held-out batches at each step of a '
      f'{cfg["steps"]}-step Skip-Sideways A run (section 1\'s runs, '
      'retrained): `mean cos` is the cosine of the *mean* Sideways gradient '
      'with the *mean* exact one (the direction training follows on '
      'average), `batch cos` the mean of the per-batch cosines (no flush, '
      'as training; the metric the loop logs flushes), `consistency` |mean '
      'g| / mean |g| (1: every batch agrees; independent noise gives about '
      f'1/sqrt({k}) = {k ** -0.5:.2f}, where the mean exact direction is '
      'itself mostly noise). Per stage, bottom first; `accuracy` is the '
      'seed\'s held-out accuracy in section 1.', '',
      '| seed | accuracy | step | train loss (last 50) | mean cos | '
      'batch cos | consistency (exact) | consistency (sideways) |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in blob['rows']:
    loss, acc = r['train_loss_last_50'], accuracy.get(r['seed'])
    lines.append(
        f'| {r["seed"]} | ' + ('-' if acc is None else f'{100 * acc:.1f}%')
        + f' | {r["step"]} | ' + ('-' if loss is None else f'{loss:.3f}')
        + ' | ' + ' | '.join(
            ' '.join(f'{v:.2f}' for v in r[key]) for key in (
                'mean_gradient_cosine', 'per_batch_cosine_mean',
                'consistency_pipelined_bp', 'consistency_sideways')) + ' |')
  return lines + ['']


def _motion_ablations(path: str) -> list[str]:
  """Section 6's table of ``experiments.benchmarks.motion_seeds``'s JSON."""
  if not os.path.exists(path):
    return ['Ablations not yet measured: `python -m '
            'experiments.benchmarks.motion_seeds`.', '']
  with open(path) as f:
    blob = json.load(f)
  seeds = blob['config']['seeds']
  lines = ['```bash\npython -m experiments.benchmarks.motion_seeds '
           f'--seeds {seeds}\n```', '',
           'Skip-Sideways and its controls on motion, section 1\'s settings '
           f'otherwise, seeds 0-{seeds - 1}. Read `1 px/frame` against '
           'section 1\'s `skip-sideways A` (2 pixels per frame) and the '
           'exact gradient on the same video (the next row), `flush 4` '
           'against `skip-sideways A`, `sideways + temporal stage` (chain, '
           'no skips) against section 1\'s chain `sideways` and `bp + '
           'temporal stage`. Train losses: mean of the last 50 steps and '
           'lowest 50-step mean.', '']
  return lines + _seed_table(blob['rows'])


def _motion_hybrid(path: str) -> list[str]:
  """Section 6's table of ``experiments.benchmarks.motion_hybrid``'s JSON."""
  if not os.path.exists(path):
    return ['Hybrid gradients not yet measured: `python -m '
            'experiments.benchmarks.motion_hybrid`.', '']
  with open(path) as f:
    blob = json.load(f)
  cfg = blob['config']
  seeds = cfg['seeds']
  lines = ['```bash\npython -m experiments.benchmarks.motion_hybrid '
           f'--rows {cfg["rows"]} --seeds {seeds}\n```', '',
           'Section 1\'s `skip-sideways A` run (same seeds 0-'
           f'{seeds - 1}, init, batches and settings) with a hybrid gradient: '
           'the stages named Sideways take their Sideways gradient, frozen '
           'ones none (they keep their init: '
           '`--config.optimizer.frozen_stages`), every other stage and the '
           'head the exact `pipelined_bp` gradient of the same forward. '
           'Every stage Sideways is section 1\'s `skip-sideways A`, none its '
           '`pipelined_bp + skips A` (100.0 on every seed).', '']
  return lines + _seed_table(blob['rows'])


def _seed_table(rows) -> list[str]:
  """Rows of ``motion_seeds.run_row``: accuracy over seeds, train losses."""
  lines = ['| row | held-out accuracy, mean +- std | worst | seeds >= 95% | '
           'per seed | final train loss | lowest train loss |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    runs = r['runs']
    lines.append(
        f'| {r["row"]} | {100 * r["mean"]:.1f} +- {100 * r["std"]:.1f} | '
        f'{100 * r["worst"]:.1f} | {r["seeds_at_95"]} of {len(runs)} | '
        + ', '.join(f'{100 * x["accuracy"]:.1f}' for x in runs) + ' | '
        + ', '.join(f'{x["final_train_loss"]:.2f}' for x in runs) + ' | '
        + ', '.join(f'{x["lowest_train_loss"]:.2f}' for x in runs) + ' |')
  return lines + ['']


def _strip(argv, names):
  """``argv`` without the flags ``names`` (``--f=v`` and ``--f v`` forms)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in names:
      skip = True
    elif not a.startswith(tuple(n + '=' for n in names)):
      out.append(a)
  return out


def parse_args(argv=None) -> argparse.Namespace:
  """The command line (``argv``, default ``sys.argv[1:]``), ``--quick``
  applied."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--seeds', type=int, default=5)
  # None: the task's own setting (SETTINGS); given: every task uses it.
  parser.add_argument('--steps', type=int)
  parser.add_argument('--batch', type=int)
  parser.add_argument('--frames', type=int)
  parser.add_argument('--flush', type=int, default=0)
  parser.add_argument('--lr', type=float)
  parser.add_argument('--width', type=int,
                      help='channels of the first stage (then 2x, 4x)')
  parser.add_argument('--standardize', action=argparse.BooleanOptionalAction,
                      help='inputs (x - mean) / std with training pixel stats')
  parser.add_argument('--eval_batches', type=int, default=0)
  parser.add_argument('--dataset_config', default='default')
  parser.add_argument('--fidelity_frames', type=int, default=16)
  parser.add_argument('--out', default=os.path.join(HERE, 'RESULTS.md'))
  parser.add_argument('--jobs', type=int, default=1,
                      help='training runs at once, in subprocesses')
  parser.add_argument('--report_only', metavar='RESULTS_JSON',
                      help='rewrite the report from a previous run\'s JSON '
                      '(refreshing the benchmark headlines), no training')
  parser.add_argument('--job', help=argparse.SUPPRESS)  # task:row:seed
  parser.add_argument('--job_out', help=argparse.SUPPRESS)
  if argv is None:
    import sys  # pylint: disable=g-import-not-at-top
    argv = sys.argv[1:]
  args = parser.parse_args(argv)
  args.argv = _strip(argv, ('--out', '--jobs'))
  args.speeds = (0, 1, 2, 3, 4)
  if args.quick:
    args.seeds, args.steps, args.batch = 1, 3, 4
    args.frames, args.eval_batches = 6, 1
    args.dataset_config, args.fidelity_frames = 'small', 8
    args.speeds = (0, 2)
  args.eval_batches = args.eval_batches or None
  return args


def main(argv=None):
  args = parse_args(argv)
  log = lambda s: print(s, flush=True)

  if args.job:  # A subprocess of run_all: one run, its result as JSON.
    task, i, seed = args.job.split(':')
    with open(args.job_out, 'w') as f:
      json.dump(run_job((task, int(i), int(seed)), args), f)
    return

  if args.report_only:
    with open(args.report_only) as f:
      blob = json.load(f)
    saved = argparse.Namespace(**blob['args'])
    saved.report_only, saved.quick = None, blob['args'].get('quick', False)
    write_report(args.out, saved, blob['modes'], blob['next_frame'],
                 blob['fidelity'], read_benchmarks(), blob['env'])
    log(f'rewrote {args.out} from {args.report_only}')
    return

  t0 = time.time()
  log('1-2. modes on appearance, motion and next-frame prediction')
  forwarded = _strip(argv, ('--jobs', '--out'))  # For the workers.
  done = run_all(args, forwarded, log)
  results = collect('appearance', done, args) + collect('motion', done, args)
  next_frame = collect('next_frame', done, args)
  log('4. gradient fidelity')
  fid = fidelity(args, log)
  bench = read_benchmarks()
  dev = jax.devices()[0]
  env = {'device': f'{dev.device_kind} ({dev.platform})', 'jax': jax.__version__,
         'host': f'{platform.machine()}, {os.cpu_count()} cores',
         'date': time.strftime('%Y-%m-%d')}
  env['wall_s'] = round(time.time() - t0)
  write_report(args.out, args, results, next_frame, fid, bench, env)
  raw = os.path.splitext(args.out)[0] + '.json'
  with open(raw, 'w') as f:
    json.dump({'args': {k: v for k, v in vars(args).items()},
               'env': env, 'modes': results, 'next_frame': next_frame,
               'fidelity': fid, 'benchmarks': bench}, f, indent=1)
  log(f'wrote {args.out} and {raw} in {time.time() - t0:.0f}s')


if __name__ == '__main__':
  main()
