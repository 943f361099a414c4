r"""Input pipeline throughput vs the training step's consumption rate.

  python -m experiments.benchmarks.input [--out PATH] [--batch 32] [--repeats 5]

Clips per second delivered by `skipside.data.make_iterator` (float32 batches
ready for the step, read in this process with grain threads) on

  * MovingDigits (default config: 16 frames, 32x32x1), plain and augmented
    (scale jitter, random crop, flip): held in memory and cut a batch at a
    time (the default, `config.data.in_memory_gb`), and read clip by clip
    (`in_memory_gb=0`, the same batches) for comparison;
  * real video files written here with PyAV (mpeg4, 240x320 RGB, 48 frames),
    decoded with PyAV clip by clip: cut to the default net's 32x32x3, and to
    the usual 112x112x3 crop;
  * the multigrid loader (`multigrid_loader.MultigridIterator`,
    ``experiments/configs/multigrid.py``) at its coarsest bucket and at its
    base shape, in memory and clip by clip;

against clips per second consumed by the training loop's jitted step
(`programs.train_step`, donated state) of the default run
(``experiments/configs/default.py``: its Skip-Sideways net, mode, Adam with
clipping and schedule; 3 channels and 2 classes for the video rows) and of
the multigrid run at the same two bucket shapes, on the same batch and clip
shape. Runs are side by side in one process, warmed up, medians over
interleaved repeats (DESIGN.md §8). The pipeline and the step are timed
separately: in training they share the cores, so a ratio near 1 means the
input would be a bottleneck. Headline: `input_over_train_clips_per_s`
(MovingDigits, default shapes), the augmented and video ratios, and
`multigrid_loader_over_steps_*` (each bucket's loader over its step).
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
import tensorflow_datasets as tfds

from experiments.benchmarks import common
from skipside import aot, data
from skipside.data import moving_digits
from skipside.data import video_folder

PREFETCH = 4  # Elements read ahead by grain's threads.


def _time(fn, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    fn()
  return time.perf_counter() - start


def measure(rows: list[dict], repeats: int) -> None:
  """Interleaved timing: each repeat times every row once, so that a change
  of machine load hits all rows alike. Adds median clips/s to each row."""
  for row in rows:
    row['fn']()  # Warm-up: compilation, threads, file handles.
  for _ in range(repeats):
    for row in rows:
      seconds = _time(row['fn'], row['calls'])
      row.setdefault('clips_per_s_repeats', []).append(
          row['shape'][0] * row['calls'] / seconds)
  for row in rows:
    row['clips_per_s'] = statistics.median(row['clips_per_s_repeats'])


def pipeline_fn(config):
  """next() of a fresh iterator; the iterator rides along for its stats."""
  it = data.make_iterator(config)
  fn = lambda: next(it)
  fn.iterator = it
  return fn


def _step_fn(config, info, batch: int, frames: int, bucket=None):
  """One jitted step of the training loop (`programs.train_step`) for
  `config`'s net on host batches of (batch, frames, *bucket-or-info frame),
  synchronised; its donated state carried from call to call."""
  from skipside import checkpoints, engine, programs  # pylint: disable=g-import-not-at-top
  spec, optimizer, state = checkpoints.init_state(config, info)
  eng = engine.LocalEngine(spec)
  frame = tuple(bucket or info.element_shape[1:])
  if bucket is not None:  # A multigrid bucket: the net at its frame size.
    eng = programs.engine_at(eng, aot.abstract(state.params), frame)
  carry = {'params': eng.to_state(state.params),
           'opt': eng.to_state(state.opt_state)}
  step = programs.train_step_for(config, eng, optimizer)
  rng = np.random.default_rng(0)
  clip = rng.random((batch, frames, *frame), np.float32)
  labels = (np.arange(batch) % info.num_classes).astype(np.int32)

  def fn():
    carry['params'], carry['opt'], out = step(
        carry['params'], carry['opt'], clip, labels, None)
    jax.block_until_ready((carry['params'], out.metrics))

  return fn


def train_fn(channels: int, num_classes: int, batch: int, frames: int):
  """The default run's train step on (batch, frames, 32, 32, channels)."""
  from experiments.configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.data.batch_size, c.data.num_frames = batch, frames
  info = data.DataInfo(
      num_examples=batch, num_classes=num_classes, batch_size=batch,
      element_shape=(frames, 32, 32, channels), class_names=None,
      shard_index=0, shard_count=1, steps_per_epoch=1)
  return _step_fn(c, info, batch, frames)


def multigrid_fns(data_dir: str, in_memory_gb: float):
  """Loader and step of the multigrid run at its coarsest and base buckets:
  [(name, loader fn, step fn | None, shape)]."""
  from experiments.configs import multigrid as mg_config  # pylint: disable=g-import-not-at-top
  from skipside import config as config_lib  # pylint: disable=g-import-not-at-top
  from skipside import multigrid  # pylint: disable=g-import-not-at-top
  from skipside.data import multigrid_loader  # pylint: disable=g-import-not-at-top
  c = mg_config.get_config('bp')
  c.data.data_dir = data_dir
  c.data.shard_index, c.data.shard_count = 0, 1
  c.data.in_memory_gb = in_memory_gb
  c.data.prefetch = PREFETCH
  dc = config_lib.data_config(c)
  source = data.make_source(dc, dc.split)
  sched = multigrid.schedule_from_config(c, len(source.data))
  steps = range(sched.num_steps)
  coarse = min(steps, key=lambda k: sched.shape(k).crop * sched.shape(k).frames)
  base = next(k for k in steps if sched.shape(k) == sched.base)
  out = []
  for name, first in (('coarsest', coarse), ('base', base)):
    shape = sched.shape(first)
    it = multigrid_loader.MultigridIterator(dc, sched, source)
    # The loader's work for one batch of the bucket (what the loop's
    # read-ahead thread does while a step runs), at the global order
    # position the step starts at.
    position = sum(sched.shape(k).batch for k in range(first))

    def load(it=it, first=first, position=position):
      it._make(first, position)  # pylint: disable=protected-access

    load.iterator = it
    step = None
    if in_memory_gb:  # The steps once (they do not depend on the loader).
      step = _step_fn(c, it.info, shape.batch, shape.frames,
                      (shape.crop, shape.crop, 1))
    out.append((name, load, step, list(shape)))
  return out


def write_videos(root: str, num_per_class: int = 8, frames: int = 48,
                 size=(240, 320)) -> None:
  """2 classes of moving-noise videos (mpeg4 .avi), UCF101-like frame size."""
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (size[0] + 64, size[1] + 64, 3), np.uint8)
  for label, name in enumerate(('left', 'right')):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(num_per_class):
      dx = 1 if label else -1
      y0, x0 = rng.integers(0, 32, 2)
      video = np.stack([np.roll(base, dx * 2 * t, axis=1)
                        [y0:y0 + size[0], x0:x0 + size[1]]
                        for t in range(frames)])
      video_folder.write_video(os.path.join(root, name, f'v{i}.avi'), video)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), '..', 'results', 'input.json'))
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--frames', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--data_dir', default=None,
                      help='TFDS dir for MovingDigits (default: a temp dir).')
  args = parser.parse_args()
  tfds.disable_progress_bar()
  tmp = tempfile.mkdtemp(prefix='skipside_input_')
  data_dir = args.data_dir or os.path.join(tmp, 'tfds')
  moving_digits.build('default', data_dir=data_dir)
  video_dir = os.path.join(tmp, 'videos')
  write_videos(video_dir)

  def config(**kw):
    c = data.get_config()
    # A short read-ahead: it refills while other rows are timed, so it
    # inflates a rate by at most (clips read ahead) / (clips timed): <= 3%
    # clip by clip; in memory a read is a batch, one per thread ahead
    # (2 of the 20 batches timed, <= 10%).
    c.update(data_dir=data_dir, batch_size=args.batch, num_frames=args.frames,
             shard_index=0, shard_count=1, prefetch=PREFETCH)
    c.update(kw)
    return c

  def video_config(**kw):
    return config(dataset='video_folder', data_dir=video_dir, task='appearance',
                  stride=2, flip=True, **kw)

  augment = dict(scale_jitter=(32, 40), crop_size=32, flip=True)
  pipelines = [
      ('moving_digits', config(), 20),
      ('moving_digits_augmented', config(**augment), 10),
      ('moving_digits_per_clip', config(in_memory_gb=0), 20),
      ('moving_digits_augmented_per_clip',
       config(in_memory_gb=0, **augment), 10),
      ('video_files_32x32x3',
       video_config(scale_jitter=(36, 44), crop_size=32), 4),
      ('video_files_112x112x3',
       video_config(scale_jitter=(128, 160), crop_size=112), 4),
  ]
  b, t = args.batch, args.frames
  rows = [dict(kind='input', name=name, calls=calls, fn=pipeline_fn(c),
               shape=[b, t, c.crop_size or 32, c.crop_size or 32,
                      1 if c.dataset == 'moving_digits' else 3])
          for name, c, calls in pipelines]
  rows += [dict(kind='train', name=f'train_step_sideways_32x32x{ch}', calls=3,
                fn=train_fn(ch, k, b, t), shape=[b, t, 32, 32, ch])
           for ch, k in ((1, 4), (3, 2))]
  for gb, suffix in ((data.get_config().in_memory_gb, ''), (0, '_per_clip')):
    for name, load, step, shape in multigrid_fns(data_dir, gb):
      bt, tt, s = shape
      rows.append(dict(kind='input', name=f'multigrid_loader_{name}{suffix}',
                       calls=3, fn=load, shape=[bt, tt, s, s, 1]))
      if step is not None:
        rows.append(dict(kind='train', name=f'multigrid_step_{name}',
                         calls=3, fn=step, shape=[bt, tt, s, s, 1]))
  measure(rows, args.repeats)
  print(f'{"what":>28} {"shape (B,T,H,W,C)":>22} {"clips/s":>9}')
  for row in rows:
    fn = row.pop('fn')
    if hasattr(fn, 'iterator'):
      row['failed_videos'] = fn.iterator.stats.failed
      fn.iterator.close()
    print(f'{row["name"]:>28} {str(tuple(row["shape"])):>22} '
          f'{row["clips_per_s"]:>9.1f}')

  rate = {r['name']: r['clips_per_s'] for r in rows}
  headline = {
      'input_over_train_clips_per_s':
          rate['moving_digits'] / rate['train_step_sideways_32x32x1'],
      'augmented_input_over_train_clips_per_s':
          rate['moving_digits_augmented'] /
          rate['train_step_sideways_32x32x1'],
      'video_input_over_train_clips_per_s':
          rate['video_files_32x32x3'] / rate['train_step_sideways_32x32x3'],
      'per_clip_input_over_train_clips_per_s':
          rate['moving_digits_per_clip'] /
          rate['train_step_sideways_32x32x1'],
      'augmented_per_clip_input_over_train_clips_per_s':
          rate['moving_digits_augmented_per_clip'] /
          rate['train_step_sideways_32x32x1'],
      **{f'multigrid_loader_over_steps_{k}{s}':
         rate[f'multigrid_loader_{k}{s}'] / rate[f'multigrid_step_{k}']
         for k in ('coarsest', 'base') for s in ('', '_per_clip')},
      'moving_digits_clips_per_s': rate['moving_digits'],
      'video_files_112_clips_per_s': rate['video_files_112x112x3'],
      'train_clips_per_s': rate['train_step_sideways_32x32x1'],
  }
  for k, v in headline.items():
    print(f'{k}: {v:.2f}')
  result = {
      'benchmark': 'input',
      'config': {
          'batch': args.batch, 'frames': args.frames,
          'repeats': args.repeats, 'num_threads': data.get_config().num_threads,
          'num_workers': 0, 'prefetch': PREFETCH,
          'moving_digits': 'default (16x32x32x1)',
          'videos': '16 mpeg4 .avi, 48 frames 240x320 RGB, stride 2',
          'train': 'programs.train_step of experiments/configs/default.py '
                   '(its net, sideways, adam + clip + cosine)',
          'multigrid': 'experiments/configs/multigrid.py:bp, MultigridIterator '
                       'and programs.train_step at the coarsest and base buckets',
          'in_memory_gb': data.get_config().in_memory_gb,
      },
      'device': common.device_info(load_average_1min=os.getloadavg()[0]),
      'rows': rows,
      'headline': headline,
  }
  common.write_result(args.out, result)
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
