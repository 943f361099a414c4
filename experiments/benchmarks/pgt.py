r"""PGT vs clip-based training on long-range MovingDigits: accuracy, memory.

  python -m experiments.benchmarks.pgt [--out PATH] [--steps N] [--exact]

The task (``moving_digits/long_range``, 128 frames): is the digit class of
the first 8 frames the same as that of the last 8? (50/50; distractor digits
in between.) The same network (``experiments/configs/pgt.py:cpu``: three
conv stages each followed by a causal temporal conv, exact backprop ``bp``)
is trained two ways with the same compute budget in frame-passes:

- ``pgt``: every 128-frame video as 8 serial fragments of 16 frames in one
  jitted step (``progressive.train_step``): carried stream, temporal caches
  with the 'max' policy and momentum 0.25, gradients truncated at fragment
  boundaries, summed, one optimizer step per video batch (PGT's settings).
- ``clip``: 16-frame clips sampled at random from the long videos
  (``engine.train_step``), 8x as many steps at the same batch size.
- ``pgt_exact`` (``--exact``): PGT with gradients through all fragments
  (``truncate_gradients=False``, fragments rematerialised).

Both are evaluated on the 200 whole test videos: one full pass (logits
averaged over all 128 ticks) and PGT's progressive ensembles over the
fragments' predictions (mean, max, last). The headline compares each method
under its own protocol, fixed before running: PGT with its 'max' ensemble
(PGT's Kinetics config), the clip baseline with one full pass. Chance is
50%; with 200 test videos one standard error is about 3.5 points.

Memory: compiled temp bytes (``memory_analysis``) of one training step:
PGT on 64- and 512-frame videos, the clip step, and whole-video ``bp`` at 128
and 512 frames. Nothing there depends on machine load.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.configs import pgt as pgt_config
from experiments.benchmarks import common
from skipside import engine, network, optim, progressive
from skipside import config as config_lib
from skipside.data import moving_digits

CLIP = 16


def load(split: str, count: int):
  """``(videos uint8 (N, 128, 32, 32, 1), labels int32 (N,))``, generated
  exactly as the ``moving_digits/long_range`` TFDS builder does."""
  cfg = next(c for c in moving_digits.MovingDigits.BUILDER_CONFIGS
             if c.name == 'long_range')
  examples = [moving_digits.generate_example(cfg, split, i)
              for i in range(count)]
  return (np.stack([e['video'] for e in examples]),
          np.asarray([e['same'] for e in examples], np.int32))


def _video(x: np.ndarray) -> jax.Array:
  return jnp.asarray(x, jnp.float32) / 255.0


def train_pgt(spec, params, optimizer, opts, videos, labels, *, steps,
              batch, seed):
  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed)
  losses = []
  t0 = time.time()
  for _ in range(steps):
    idx = rng.choice(len(videos), batch, replace=False)
    params, opt_state, out = progressive.train_step(
        spec, optimizer, params, opt_state, _video(videos[idx]),
        jnp.asarray(labels[idx]), mode='bp', options=opts)
    losses.append(float(out.metrics['loss']))
  return params, losses, time.time() - t0


def train_clip(spec, params, optimizer, videos, labels, *, steps, batch,
               seed):
  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed)
  losses = []
  t0 = time.time()
  span = videos.shape[1] - CLIP
  for _ in range(steps):
    idx = rng.choice(len(videos), batch, replace=False)
    starts = rng.integers(0, span + 1, batch)
    clips = np.stack([videos[i, s:s + CLIP] for i, s in zip(idx, starts)])
    params, opt_state, out = engine.train_step(
        spec, optimizer, params, opt_state, _video(clips),
        jnp.asarray(labels[idx]), mode='bp')
    losses.append(float(out.metrics['loss']))
  return params, losses, time.time() - t0


def accuracy(spec, params, opts, videos, labels, batch=50) -> dict:
  """Accuracy of every protocol on whole videos."""
  correct = {'full': 0, 'mean': 0, 'max': 0, 'last': 0}
  for s in range(0, len(videos), batch):
    v, y = _video(videos[s:s + batch]), jnp.asarray(labels[s:s + batch])
    full, _ = engine.forward(spec, params, v, y, mode='bp')
    preds = progressive.predict(spec, params, v, y, mode='bp', options=opts)
    for name, p in [('full', full.predictions), ('mean', preds.mean),
                    ('max', preds.max), ('last', preds.last)]:
      correct[name] += int((np.asarray(p).argmax(-1) == np.asarray(y)).sum())
  return {k: v / len(videos) for k, v in correct.items()}


def _temp(fn, *args, **kw) -> int:
  return int(fn.lower(*args, **kw).compile().memory_analysis()
             .temp_size_in_bytes)


def memory_rows(spec, params, optimizer, opts, batch) -> list[dict]:
  opt_state = jax.eval_shape(optimizer.init, params)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)

  def video(frames):
    return jax.ShapeDtypeStruct((batch, frames, *spec.frame_shape),
                                jnp.float32)
  rows = []
  for frames in (64, 512):
    rows.append({'what': 'pgt_step', 'T': frames, 'temp_bytes': _temp(
        progressive.train_step, spec, optimizer, params, opt_state,
        video(frames), labels, mode='bp', options=opts)})
  rows.append({'what': 'clip_step', 'T': CLIP, 'temp_bytes': _temp(
      engine.train_step, spec, optimizer, params, opt_state, video(CLIP),
      labels, mode='bp')})
  for frames in (128, 512):
    rows.append({'what': 'whole_video_bp_step', 'T': frames,
                 'temp_bytes': _temp(engine.train_step, spec, optimizer,
                                     params, opt_state, video(frames), labels,
                                     mode='bp')})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), '..', 'results', 'pgt.json'))
  parser.add_argument('--steps', type=int, default=None,
                      help='PGT steps (clip: 8x); default from the config')
  parser.add_argument('--train', type=int, default=1000)
  parser.add_argument('--test', type=int, default=200)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--exact', action='store_true',
                      help='also train PGT with untruncated gradients')
  args = parser.parse_args()

  t_start = time.time()
  config = pgt_config.get_config('cpu')
  steps = args.steps or config.train.num_steps
  batch = config.data.batch_size
  opts = progressive.Options.from_config(config.progressive)
  config.train.num_steps = steps
  optimizer = optim.make_optimizer(config)
  clip_config = pgt_config.get_config('cpu_clip')
  clip_config.train.num_steps = steps * (128 // CLIP)
  clip_optimizer = optim.make_optimizer(clip_config)

  print(f'Generating long-range MovingDigits ({args.train} train, '
        f'{args.test} test videos of 128 frames)...', flush=True)
  train_x, train_y = load('train', args.train)
  test_x, test_y = load('test', args.test)
  frames = train_x.shape[1]

  net = config_lib.build_network(config, train_x.shape[2:], 2,
                                 nnx.Rngs(config.seed))
  spec, params0 = network.split(net)
  runs = [('pgt', opts), ('clip', None)]
  if args.exact:
    runs.insert(1, ('pgt_exact', progressive.Options(
        **{**opts.__dict__, 'truncate_gradients': False})))

  rows = []
  for name, run_opts in runs:
    if run_opts is None:
      n = steps * (frames // CLIP)
      params, losses, wall = train_clip(
          spec, params0, clip_optimizer, train_x, train_y, steps=n,
          batch=batch, seed=args.seed)
      frame_passes = n * batch * CLIP
    else:
      n = steps
      params, losses, wall = train_pgt(
          spec, params0, optimizer, run_opts, train_x, train_y, steps=n,
          batch=batch, seed=args.seed)
      frame_passes = n * batch * frames
    acc = accuracy(spec, params, opts, test_x, test_y)
    row = {'method': name, 'steps': n, 'batch': batch,
           'frame_passes': frame_passes, 'train_wall_s': round(wall, 1),
           'final_train_loss': float(np.mean(losses[-20:])),
           **{f'accuracy_{k}': v for k, v in acc.items()}}
    rows.append(row)
    print(f'{name:>9}: {n} steps, {frame_passes} frame-passes, '
          f'{wall:.0f} s, loss {row["final_train_loss"]:.3f}; accuracy '
          + ', '.join(f'{k} {100 * v:.1f}%' for k, v in acc.items()),
          flush=True)

  mem = memory_rows(spec, params0, optimizer, opts, batch)
  print(f'{"step":>20} {"T":>4} {"temp KiB":>10}')
  for r in mem:
    print(f'{r["what"]:>20} {r["T"]:>4} {r["temp_bytes"] / 1024:>10.1f}')
  temp = {(r['what'], r['T']): r['temp_bytes'] for r in mem}

  by = {r['method']: r for r in rows}
  headline = {
      'pgt_minus_clip_accuracy_points': round(
          100 * (by['pgt']['accuracy_max'] - by['clip']['accuracy_full']), 1),
      'pgt_memory_512_over_64': round(
          temp[('pgt_step', 512)] / temp[('pgt_step', 64)], 4),
      'pgt_accuracy_max_ensemble': by['pgt']['accuracy_max'],
      'clip_accuracy_full_pass': by['clip']['accuracy_full'],
      'whole_bp_512_over_pgt_512_temp': round(
          temp[('whole_video_bp_step', 512)] / temp[('pgt_step', 512)], 1),
      'chance': 0.5,
      'one_standard_error_points': round(
          100 * float(np.sqrt(0.25 / args.test)), 1),
  }
  result = {
      'benchmark': 'pgt',
      'config': {
          'config_file': 'experiments/configs/pgt.py:cpu',
          'model.stages': config.model.stages, 'mode': 'bp',
          'frames': frames, 'fragment_frames': opts.fragment_frames,
          'overlap': opts.overlap, 'cache_policy': opts.cache_policy,
          'momentum': opts.momentum, 'step_per': opts.step_per,
          'truncate_gradients': opts.truncate_gradients,
          'loss_weighting': opts.loss_weighting, 'clip_frames': CLIP,
          'batch': batch, 'pgt_steps': steps, 'optimizer': 'adam',
          'learning_rate': config.optimizer.learning_rate,
          'train_videos': args.train, 'test_videos': args.test,
          'seed': args.seed},
      'device': common.device_info(),
      'rows': rows, 'memory_rows': mem, 'headline': headline,
      'wall_s': round(time.time() - t_start, 1),
  }
  common.write_result(args.out, result)
  print('headline:', json.dumps(headline))
  print(f'wrote {os.path.abspath(args.out)} ({result["wall_s"]:.0f} s)')


if __name__ == '__main__':
  main()
