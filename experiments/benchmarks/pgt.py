r"""PGT vs clip vs whole-video training on MovingDigits' majority task.

  python -m experiments.benchmarks.pgt [--out PATH] [--steps N] [--quick]

The task (``moving_digits/majority``, 128 frames; ``skipside/data/
moving_digits.py``): 16 segments of 8 frames, each one digit of class 0, 1
or 2 moving in its own direction; the label is the class shown in the most
segments, ahead of the second by exactly 4 (no ties). Every segment is
evidence, and little of it: an observer who recognises every digit is right
52.3% of the time from one aligned 16-frame clip (2 segments), 59.3% from a
clip at a random start (2 or 3 segments), 81.1% from half the video and
always from the whole video (exact, ``moving_digits.majority_bayes_accuracy``;
chance 33.3%).

The same network (``experiments/configs/pgt.py:cpu``: three stride-2 conv
stages each followed by a causal temporal conv of 3 taps, exact backprop
``bp``) from the same initial parameters, trained three ways on the same
2000 training videos, with the same optimizer (Adam 3e-3, 20 warmup steps,
cosine decay over each method's own steps, global-norm clip 1), batch 16 and
the same number of *frame-passes* (forward evaluations of the network on one
frame of one video; none of the three rematerialises, and each takes exactly
one backward per forward frame):

- ``pgt``: every 128-frame video as 8 serial fragments of 16 frames in one
  jitted step (``progressive.train_step``): carried stream, temporal caches
  with the 'max' policy and momentum 0.25, gradients truncated at fragment
  boundaries, the 8 fragments' losses summed, one optimizer step per video
  batch (PGT's settings). ``steps`` steps.
- ``clip``: one 16-frame clip per video, at a uniformly random start
  (``engine.train_step``), labelled with the video's label: 8x the steps.
- ``whole``: the whole 128-frame video, exact backprop through all 128 ticks
  (``engine.train_step``, ``bp``): ``steps`` steps. Its compiled temp memory
  is in ``memory_rows`` (about 7x PGT's at 128 frames, 27x at 512).

Evaluation protocols, fixed before running, each on the same test videos
(unseen handwriting):

- ``full`` (the headline ``*_accuracy`` of every method): one forward pass
  over the whole 128-frame video, the head's logits averaged over every
  tick (``engine.forward``). Same network, same protocol: only the training
  differs.
- ``mean`` / ``max`` / ``last`` / ``ticks``: PGT's progressive evaluation
  (``progressive.predict``, the 'max' caches carried): the mean, max or last
  of the 8 fragments' predictions, or the logits averaged over every tick.
- ``centre_clip``: frames 56-71 alone (2 aligned segments): bounded by the
  single-clip Bayes accuracy, 52.3%. It shows how much of ``full`` comes from
  evidence spread over the video.

Each tick of this network sees 7 frames (three 3-tap causal convs), so what
makes a whole-video decision is the averaging of the logits over the ticks
(and, for PGT, the pooled caches it carries); the training methods differ in
what they feed that per-tick classifier (whole videos or clips, truncated or
exact gradients through the temporal caches).

One standard error of an accuracy near 50% on ``test`` videos is
``sqrt(0.25 / test)`` (1.6 points at 1000); differences between methods need
about three of them. The default sizes (``--steps`` from the config:
``cpu`` = 600 PGT steps, 600 whole-video steps, 4800 clip steps, 1,228,800
frame-passes each, 2000 training videos seen about 5 times) were sized to
fit about 20 minutes on the 2 shared CPU cores this was run on (measured
first: about 0.3 s per PGT step, 0.06 s per clip step); the measured wall
time is in the JSON. The learning rate was chosen on one probe of the clip
method on this task (71% with 1e-3, 96% with 3e-3 after 1600 clip steps),
then used for all three. ``--quick``: 32-frame videos
(4 segments), 4 steps, batch 4: a smoke run for the tests.

Result (2026-12-06, 2 shared CPU cores, 685 s; ``experiments/results/
pgt.json``): all three learn; at 1,228,800 frame-passes each, ``full``
accuracy clip 99.4%, pgt 83.3%, whole 66.9%; ``centre_clip`` 55.6%, 50.0%,
48.5% (the Bayes rule scores 53.1-55.0% on these test videos, by how it
breaks a tie). ``--seed 1`` and ``--seed 2`` (initial parameters and
sampling; ``pgt_seed1.json``, ``pgt_seed2.json``): clip 98.1 / 95.3%, pgt
54.2 / 55.6%, whole 33.9 / 56.9%. Clip training wins in every seed; PGT
against whole-video training moves by 30 points with the seed and is
undecided. With this per-tick network the whole-video decision is the
logit average, so the gradient of a whole video adds little to a clip's,
and at equal frame-passes clip training gets 8x the optimizer steps (final
training losses: clip 1.007-1.021, pgt and whole 1.057-1.096; chance's
1.099: still in their slow start).

Memory: compiled temp bytes (``memory_analysis``) of one training step:
PGT on 64-, 128- and 512-frame videos, the clip step, and whole-video ``bp`` at
128 and 512 frames. Nothing there depends on machine load.
"""

import argparse
import json
import os
import sys
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
PROTOCOLS = ('full', 'mean', 'max', 'last', 'ticks', 'centre_clip')


def task_config(quick: bool) -> moving_digits.MovingDigitsConfig:
  """The ``majority`` config (or, ``quick``, a 32-frame one of 4 segments)."""
  cfg = next(c for c in moving_digits.MovingDigits.BUILDER_CONFIGS
             if c.name == 'majority')
  if quick:
    cfg = moving_digits.MovingDigitsConfig(
        name='majority_quick', num_frames=32, num_train=32, num_test=16,
        majority_classes=cfg.majority_classes, majority_margin=2)
  return cfg


def load(cfg, split: str, count: int):
  """``(videos uint8 (N, T, 32, 32, 1), labels int32 (N,))``, generated
  exactly as the ``moving_digits`` TFDS builder does for ``cfg``."""
  examples = [moving_digits.generate_example(cfg, split, i)
              for i in range(count)]
  return (np.stack([e['video'] for e in examples]),
          np.asarray([e['majority'] for e in examples], np.int32))


def _video(x: np.ndarray) -> jax.Array:
  return jnp.asarray(x, jnp.float32) / 255.0


def _train(step_fn, optimizer, params, videos, labels, *, steps, batch,
           seed, clip=None):
  """Runs ``steps`` steps of ``step_fn`` on batches drawn without
  replacement within a step; ``clip``: a random ``clip``-frame window of
  each video. Returns ``(params, losses, wall_s, frame_passes)``."""
  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed)
  losses, passes = [], 0
  t0 = time.time()
  for _ in range(steps):
    idx = rng.choice(len(videos), batch, replace=False)
    if clip is None:
      x = videos[idx]
    else:
      starts = rng.integers(0, videos.shape[1] - clip + 1, batch)
      x = np.stack([videos[i, s:s + clip] for i, s in zip(idx, starts)])
    params, opt_state, out = step_fn(optimizer, params, opt_state, _video(x),
                                     jnp.asarray(labels[idx]))
    passes += x.shape[0] * x.shape[1]  # Every frame of x is run once.
    losses.append(float(out.metrics['loss']))
  return params, losses, time.time() - t0, passes


def accuracy(spec, params, opts, videos, labels, batch=50) -> dict:
  """Accuracy of every protocol (``PROTOCOLS``) on whole test videos."""
  correct = dict.fromkeys(PROTOCOLS, 0)
  centre = (videos.shape[1] - CLIP) // 2
  for s in range(0, len(videos), batch):
    v, y = _video(videos[s:s + batch]), jnp.asarray(labels[s:s + batch])
    full, _ = engine.forward(spec, params, v, y, mode='bp')
    clip, _ = engine.forward(spec, params, v[:, centre:centre + CLIP], y,
                             mode='bp')
    preds = progressive.predict(spec, params, v, y, mode='bp', options=opts)
    for name, p in [('full', full.predictions), ('mean', preds.mean),
                    ('max', preds.max), ('last', preds.last),
                    ('ticks', preds.ticks),
                    ('centre_clip', clip.predictions)]:
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
  for frames in (64, 128, 512):
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), '..', 'results', 'pgt.json'))
  parser.add_argument('--steps', type=int, default=None,
                      help='PGT and whole-video steps (clip: 8x); default '
                      'from the config (cpu variant)')
  parser.add_argument('--train', type=int, default=None,
                      help='training videos (default: the config\'s 2000)')
  parser.add_argument('--test', type=int, default=None,
                      help='test videos (default: the config\'s 1000)')
  parser.add_argument('--seed', type=int, default=0,
                      help='added to the config seed (initial params); '
                      'also seeds the batch and clip sampling')
  parser.add_argument('--methods', default='pgt,clip,whole',
                      help='comma-separated subset of pgt,clip,whole')
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes (32-frame videos, 4 steps): smoke run')
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  methods = args.methods.split(',')
  if set(methods) - {'pgt', 'clip', 'whole'}:
    parser.error(f'--methods: unknown method in {args.methods!r}')

  t_start = time.time()
  task = task_config(args.quick)
  config = pgt_config.get_config('cpu')
  if args.quick:
    config.train.num_steps = 4
    config.data.batch_size = 4
    config.optimizer.warmup_steps = 1
  steps = args.steps or config.train.num_steps
  batch = config.data.batch_size
  num_train = args.train or task.num_train
  num_test = args.test or task.num_test
  opts = progressive.Options.from_config(config.progressive)
  ratio = task.num_frames // CLIP
  optimizers = {}
  for name, clip_steps in [('pgt', steps), ('whole', steps),
                           ('clip', steps * ratio)]:
    config.train.num_steps = clip_steps
    optimizers[name] = optim.make_optimizer(config)
  config.train.num_steps = steps

  print(f'Generating MovingDigits {task.name} ({num_train} train, {num_test} '
        f'test videos of {task.num_frames} frames)...', flush=True)
  train_x, train_y = load(task, 'train', num_train)
  test_x, test_y = load(task, 'test', num_test)
  frames = train_x.shape[1]
  num_classes = len(task.majority_classes)
  num_segments = frames // task.segment_frames

  net = config_lib.build_network(config, train_x.shape[2:], num_classes,
                                 nnx.Rngs(config.seed + args.seed))
  spec, params0 = network.split(net)

  def pgt_step(optimizer, params, opt_state, video, labels):
    return progressive.train_step(spec, optimizer, params, opt_state, video,
                                  labels, mode='bp', options=opts)

  def bp_step(optimizer, params, opt_state, video, labels):
    return engine.train_step(spec, optimizer, params, opt_state, video,
                             labels, mode='bp')

  runs = {'pgt': (pgt_step, steps, None), 'whole': (bp_step, steps, None),
          'clip': (bp_step, steps * ratio, CLIP)}
  rows = []
  for name in methods:
    step_fn, n, clip = runs[name]
    params, losses, wall, passes = _train(
        step_fn, optimizers[name], params0, train_x, train_y, steps=n,
        batch=batch, seed=args.seed, clip=clip)
    acc = accuracy(spec, params, opts, test_x, test_y)
    row = {'method': name, 'steps': n, 'batch': batch,
           'frames_per_example': clip or frames, 'frame_passes': passes,
           'train_wall_s': round(wall, 1),
           'first_train_loss': float(np.mean(losses[:max(1, n // 20)])),
           'final_train_loss': float(np.mean(losses[-max(1, n // 20):])),
           **{f'accuracy_{k}': v for k, v in acc.items()}}
    rows.append(row)
    print(f'{name:>6}: {n} steps, {passes} frame-passes, {wall:.0f} s, loss '
          f'{row["first_train_loss"]:.3f} -> {row["final_train_loss"]:.3f}; '
          'accuracy ' + ', '.join(f'{k} {100 * v:.1f}%'
                                  for k, v in acc.items()), flush=True)

  mem = memory_rows(spec, params0, optimizers['pgt'], opts, batch)
  print(f'{"step":>20} {"T":>4} {"temp KiB":>10}')
  for r in mem:
    print(f'{r["what"]:>20} {r["T"]:>4} {r["temp_bytes"] / 1024:>10.1f}')
  temp = {(r['what'], r['T']): r['temp_bytes'] for r in mem}

  by = {r['method']: r for r in rows}
  bayes = moving_digits.majority_bayes_accuracy
  headline = {
      'pgt_memory_512_over_64': round(
          temp[('pgt_step', 512)] / temp[('pgt_step', 64)], 4),
      'whole_bp_512_over_pgt_512_temp': round(
          temp[('whole_video_bp_step', 512)] / temp[('pgt_step', 512)], 1),
      'whole_bp_128_over_pgt_128_temp': round(
          temp[('whole_video_bp_step', 128)] / temp[('pgt_step', 128)], 1),
  }
  for name in methods:
    headline[f'{name}_accuracy'] = by[name]['accuracy_full']
  for name in methods:
    headline[f'{name}_frame_passes'] = by[name]['frame_passes']
  headline.update({
      'chance': round(1 / num_classes, 4),
      'one_standard_error_points': round(
          100 * float(np.sqrt(0.25 / num_test)), 1),
      'bayes_accuracy_one_aligned_clip': round(bayes(task, CLIP // 8), 4),
      'bayes_accuracy_whole_video': round(bayes(task, num_segments), 4),
  })
  result = {
      'benchmark': 'pgt',
      'command': 'python -m experiments.benchmarks.pgt' + (
          ' ' + ' '.join(argv) if argv else ''),
      'config': {
          'config_file': 'experiments/configs/pgt.py:cpu',
          'task': task.name, 'classes': list(task.majority_classes),
          'margin_segments': task.majority_margin,
          'segments': num_segments,
          'model.stages': config.model.stages, 'mode': 'bp',
          'frames': frames, 'fragment_frames': opts.fragment_frames,
          'overlap': opts.overlap, 'cache_policy': opts.cache_policy,
          'momentum': opts.momentum, 'step_per': opts.step_per,
          'truncate_gradients': opts.truncate_gradients,
          'loss_weighting': opts.loss_weighting, 'clip_frames': CLIP,
          'batch': batch, 'pgt_steps': steps, 'whole_steps': steps,
          'clip_steps': steps * ratio, 'optimizer': 'adam',
          'learning_rate': config.optimizer.learning_rate,
          'train_videos': num_train, 'test_videos': num_test,
          'seed': args.seed, 'quick': args.quick,
          'headline_protocol': 'full (one pass over the whole test video, '
                               'logits averaged over every tick)'},
      'device': common.device_info(),
      'rows': rows, 'memory_rows': mem, 'headline': headline,
      'wall_s': round(time.time() - t_start, 1),
  }
  common.write_result(args.out, result)
  print('headline:', json.dumps(headline))
  print(f'wrote {os.path.abspath(args.out)} ({result["wall_s"]:.0f} s)')
  return result


if __name__ == '__main__':
  main()
