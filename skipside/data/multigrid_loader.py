"""The multigrid data loader: training batches whose shape follows a schedule.

The schedule (``skipside.multigrid.Schedule``) says the shape ``(b, t, s)``
of step ``k``'s batch; this module cuts clips of that shape: frames ``t``,
crop ``s``, a random stride in ``[stride, stride·T/t]``, the scale-jitter
floor shrunk with the crop (``clip_params_for``), each process reading its
rows of one global record order (``MultigridIterator``). ``clip_spec`` is
the abstract batch a bucket's program is compiled for.

Example::

    sched = multigrid.schedule_from_config(config, num_examples, side)
    it = multigrid_loader.MultigridIterator(data_config, sched)
    batch = next(it)   # {'video': f32 (b, t, s, s, C), 'label', 'mask'}
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Iterator

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np

from skipside import multigrid
from skipside.data import memory
from skipside.data import pipeline
from skipside.data import sources
from skipside.data import transforms


def clip_params_for(schedule: multigrid.Schedule, shape: multigrid.Shape,
                    base: transforms.ClipParams) -> transforms.ClipParams:
  """The ``ClipParams`` of a batch of ``shape``.

  Frames ``t`` and crop ``s`` of the shape; the stride drawn per clip in
  ``[stride, stride · T / t]`` (a short clip spans the same time as the base
  one at the top of the range); the lower scale-jitter bound shrunk by
  ``s / S`` (a small crop then also sees the whole frame, downscaled).
  """
  max_stride = schedule.max_stride(shape)
  return dataclasses.replace(
      base, num_frames=shape.frames, crop_size=shape.crop,
      stride=schedule.stride,
      max_stride=max_stride if max_stride > schedule.stride else None,
      scale_jitter=schedule.scale_jitter_for(shape))


def clip_spec(shape: multigrid.Shape, channels: int, shard_count: int = 1
              ) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """Abstract per-process ``(clip, labels)`` of a batch of ``shape``."""
  b = shape.batch // shard_count
  return (jax.ShapeDtypeStruct((b, shape.frames, shape.crop, shape.crop,
                                channels), jnp.float32),
          jax.ShapeDtypeStruct((b,), jnp.int32))


class MultigridIterator:
  """Training batches whose shape follows a ``Schedule``, step by step.

  One global order of records, the same in every process: the split
  shuffled per epoch and repeated (grain's ``MapDataset``, ``config.seed``).
  Step ``k`` takes the next ``shape.batch`` positions of it, and process
  ``i`` of ``n`` reads only its rows of them, positions ``G + i·b .. G +
  (i+1)·b`` (``b = shape.batch / n``): so ``n`` processes train on exactly
  the batches one process reads. Clips are cut with ``pipeline.load_clip``
  at the step's ``ClipParams`` (``clip_params_for``) with a generator seeded
  by the global position, the next batch prepared while the current one
  trains. A split that fits in memory (``memory.in_memory``:
  MovingDigits, array_record sets of decoded frames) is read once, and each
  batch is gathered, cropped, flipped and resized at once (numpy, the same
  draws: the same batches); otherwise clips are read one by one in
  ``num_threads`` threads. An unreadable (or, with
  ``short_video='skip'``, too short) video is counted and replaced by the
  record at order position ``p + k·(N+1)`` (``k = 1, 2, ...``: the next
  epoch's next record, another record whether or not the order is
  shuffled), cut with its own generator, which every process would pick
  alike. The state is a few integers: ``get_state`` / ``set_state`` resume
  exactly.

  Each batch: ``{'video': float32 (b, t, s, s, C), 'label': int32 (b,) (or
  (b, K) multi-hot), 'mask': bool (b,)}``.
  """

  # Tries of one row before the run stops: a split this broken is an error.
  MAX_TRIES = 16

  def __init__(self, config, schedule: multigrid.Schedule, source=None):
    self.config = config
    self.schedule = schedule
    self.source = source or sources.make_source(config, config.split)
    self.shard_index, self.shard_count = pipeline.shard_of(config)
    for s in schedule.buckets():
      if s.batch % self.shard_count:
        raise ValueError(f'multigrid batch {s.batch} of shape {s} is not '
                         f'divisible by {self.shard_count} processes')
    records = grain.MapDataset.source(self.source.data)
    self._num_records = len(records)
    if config.shuffle:
      records = records.shuffle(seed=config.seed)
    self._records = records.repeat(None)
    self._base = pipeline.clip_params(config, train=True)
    # The split in memory if every bucket's clips can be cut from it; the
    # order then holds record numbers (the same permutation).
    self._store = memory.in_memory(self.source,
                                   pipeline.in_memory_gb(config))
    if not all(memory.fits_in_memory(
        self._store, clip_params_for(schedule, s, self._base))
               for s in schedule.buckets()):
      self._store = None
    order = grain.MapDataset.range(self._num_records)
    if config.shuffle:
      order = order.shuffle(seed=config.seed)
    self._order = order.repeat(None)
    self.stats = pipeline.DecodeStats()
    self.step, self.position = 0, 0
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max(1, config.num_threads))
    self._ahead = concurrent.futures.ThreadPoolExecutor(1)
    self._pending = None
    base = schedule.base
    self.info = pipeline.DataInfo(
        num_examples=len(self.source.data),
        num_classes=self.source.num_classes,
        batch_size=base.batch // self.shard_count,
        element_shape=(base.frames, base.crop, base.crop,
                       (self.source.frame_shape or (3,))[-1]),
        class_names=self.source.class_names, shard_index=self.shard_index,
        shard_count=self.shard_count,
        steps_per_epoch=self._num_records // base.batch)

  def _load_row(self, position: int, params: transforms.ClipParams):
    """The clip of global ``position``, or of the first readable
    replacement (class docstring): ``(element, [elements that failed])``."""
    bad = []
    for k in range(self.MAX_TRIES):
      p = position + k * (self._num_records + 1)
      rng = np.random.default_rng(
          (self.config.seed, position) + ((k,) if k else ()))
      e = pipeline.load_clip(self.source, self._records[p], rng, params)
      if e['_status'] == pipeline.OK:
        return e, bad
      bad.append(e)
    raise RuntimeError(
        f'{self.source.name}: {self.MAX_TRIES} records for order position '
        f'{position} (it and its replacements) could not be read; see the '
        'data/failed_videos warnings')

  def _from_memory(self, positions: range, params: transforms.ClipParams):
    """Clips of global ``positions`` gathered from the split in memory:
    ``(uint8 (b, t, s, s, C), labels, too-short count)``."""
    store = self._store
    _, length, h, w, _ = store.videos.shape
    records = np.array([self._order[p] for p in positions])
    plans = [transforms.plan_clip(length, (h, w), np.random.default_rng(
        (self.config.seed, p)), params) for p in positions]
    frames, spatial, short = zip(*plans)
    video = memory.gather_clips(store, records, np.stack(frames),
                                transforms.stack_plans(spatial),
                                params.crop_size)
    return video, store.labels[records], sum(short)

  def _from_files(self, positions: range, params: transforms.ClipParams):
    """Clips of global ``positions`` read one by one in threads: ``(uint8
    (b, t, s, s, C), labels, too-short count, failed, truncated)``."""
    rows = list(self._pool.map(lambda p: self._load_row(p, params),
                               positions))
    # Bad files by name: the stats count each file once.
    failed, truncated, short = pipeline.bad_reads(
        e for row, bad in rows for e in [row, *bad])
    video = np.stack([row['video'] for row, _ in rows])
    labels = np.stack([row['label'] for row, _ in rows])
    return video, labels, short, failed, truncated

  def _make(self, step: int, position: int):
    """This process's rows of ``step``'s global batch, which starts at global
    ``position``: ``(batch, next position, stats)``."""
    shape = self.schedule.shape(step)
    params = clip_params_for(self.schedule, shape, self._base)
    need = shape.batch // self.shard_count
    first = position + self.shard_index * need
    positions = range(first, first + need)
    failed, truncated = [], []
    if self._store is not None:
      video, labels, short = self._from_memory(positions, params)
    else:
      video, labels, short, failed, truncated = self._from_files(
          positions, params)
    batch = {'video': transforms.normalize(video, self.config.mean,
                                           self.config.std),
             'label': np.asarray(labels, np.int32),
             'mask': np.ones(need, bool)}
    return batch, position + shape.batch, (failed, truncated, short)

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    if self._pending is None:
      self._pending = self._ahead.submit(self._make, self.step, self.position)
    batch, position, (failed, truncated, short) = self._pending.result()
    self.step += 1
    self.position = position
    self.stats.update(failed=failed, truncated=truncated, too_short=short)
    self._pending = self._ahead.submit(self._make, self.step, self.position)
    return batch

  def get_state(self) -> dict:
    """JSON-able: the next step, the global order position it starts at,
    decode counters."""
    return {'multigrid': {'step': self.step,
                          'global_position': self.position},
            'stats': dataclasses.asdict(self.stats)}

  def set_state(self, state: dict) -> None:
    if self._pending is not None:
      self._pending.result()  # Let a prefetch in flight finish, then drop it.
      self._pending = None
    self.step = int(state['multigrid']['step'])
    if 'global_position' in state['multigrid']:
      self.position = int(state['multigrid']['global_position'])
    else:  # Saved before the loaders shared one order: records per process.
      self.position = int(state['multigrid']['position']) * self.shard_count
      logging.warning(
          'Multigrid data state from an older skipside (records read by '
          'this process): resuming at order position %d; the data order '
          'after the resume differs from an uninterrupted run.',
          self.position)
    self.stats = pipeline.DecodeStats(**state['stats'])

  def close(self) -> None:
    if self._pending is not None:
      self._pending.cancel()
    self._ahead.shutdown(wait=True)
    self._pool.shutdown(wait=True)
