"""Input pipeline: from a data config to batches (grain over TFDS
array_record sources or video folders).

This module holds the config (`get_config`), one clip's loading
(`load_clip`: read, sample, transform; bad files named and counted), the
grain assembly of both paths below and the iterator (`DataIterator`). The
sampling law and the transforms are `transforms.py` (pure numpy); a split
held in memory is `memory.py`.

Two paths, the same batches (the same draws, one transform):

Clip by clip (`_file_batches`; video folders, and any split too big for
`config.in_memory_gb`), one element's path, top to bottom (train):

    record (source[i], shuffled, repeated: one global order)
      -> this process's rows of each global batch     `global_index`
      -> read + clip sampling   uint8 (T, H0, W0, C)   `clip_frames`
      -> resize / crop / flip   uint8 (T, h, w, C)     `spatial_transform`
      -> unreadable, truncated or (with short_video='skip') too-short videos
         dropped; counted, bad files once each, and
         logged once per file                           `DecodeStats`
      -> batch                  uint8 (B, T, h, w, C)
      -> float32 in [0, 1] (optionally (x - mean) / std), optional fragments
         (B, F, Tf, h, w, C), next-frame targets.

In memory (`_memory_batches`; MovingDigits and any split of decoded frames
of one shape, `memory.in_memory`): the split is decoded once per process
into one uint8 array (N, L, H, W, C); grain draws each element's frames,
scale, crop and flip (`transforms.plan_clip`, the same rng as above), and
each batch is gathered and transformed at once (`memory.gather_clips`:
fancy indexing, resizes grouped by size), in grain's read threads. Iterator
states count elements on both paths, so a checkpoint of one resumes on the
other.

Per-element randomness comes from grain's `random_map`, seeded by
(config.seed, global index), so a pipeline is deterministic given its seed,
independent of threads, workers and processes, and its iterator state
(`get_state`) is a few integers that restore it exactly.

Multi-process: every process builds the same global order (records and
augmentation) and reads only its rows [p * b, (p + 1) * b) of each global
batch of B = b * shard_count (`DataInfo.rows`), so n processes feed the
batches one process would read (`skipside.mesh.global_batch` puts the
rows together). Only a dropped bad video shifts this process's
later rows (it reads its next one), no other process's.

Eval (`train=False`): one pass in index order, fixed (centre) start, centre crop,
no flip; each process reads its rows of the global batches, so every process
gets the same number of batches, the last ones padded; `mask` (B,) is False
on padding and on unreadable or truncated videos.

Bad files are counted where batches are delivered (`DataIterator`): each
element carries the names of the bad files read for it (with `_DropBad`, those
of the elements dropped before it), so the counts are exact and checkpointed
with the iterator whether elements come from grain's read threads or its
worker processes (`num_workers`). The warning is logged where the file is read,
once per process: once per file in this process (default, num_workers=0),
at most once per worker process with workers.

The clip parameters (`transforms.ClipParams`: frames, stride, crop, ...)
are arguments of the element transform, not globals, so multigrid can vary
them per batch: `load_clip(source, record, rng, params)`.

Example:

    from skipside import data
    config = data.get_config()        # MovingDigits, motion task
    it = data.make_iterator(config)   # builds MovingDigits on first use
    batch = next(it)                  # {'video': f32 (32,16,32,32,1),
                                      #  'label': i32 (32,), 'mask': bool (32,)}
    state = it.get_state()            # JSON-able; it.set_state(state) resumes
    metrics = it.stats.metrics()      # {'data/failed_videos': 0, ...}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from typing import Any, Iterator, Sequence

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from skipside.data import memory
from skipside.data import transforms
from skipside.data import video_folder
from skipside.data.sources import Source, make_source

Batch = dict[str, np.ndarray]
# An element's '_status' (`load_clip`): a clip, an unreadable video, a video
# too short to cut (short_video='skip'), a truncated video.
OK, FAILED, SHORT, TRUNCATED = 0, 1, 2, 3


def get_config() -> ml_collections.ConfigDict:
  """Default data config: MovingDigits motion task, no download.

  Fields:
    dataset: 'moving_digits' | 'video_folder' | 'ucf101'.
    dataset_config: TFDS config name (MovingDigits: 'default', 'small',
      'long_range', ...; None picks 'long_range' for that task, else 'default';
      UCF101: 'ucf101_1_256', ...).
    data_dir: TFDS data dir (None: TFDS default) or the video folder's root.
    prepare: build MovingDigits into data_dir if it is missing.
    task: 'appearance' | 'motion' | 'long_range' | 'majority' |
      'next_frame' | 'multi_label' (MovingDigits: digit and direction as one multi-hot
      label (B, 10 + directions), trained with a sigmoid loss and evaluated
      by mAP; other datasets have one label, use 'appearance').
    split, eval_split: split names (video folders: subfolder names).
    num_frames: T, frames per clip.
    stride: temporal stride between sampled frames.
    max_stride: if set, each train clip draws its stride in [stride,
      max_stride] (multigrid).
    short_video: policy for videos shorter than the clip span: 'loop' (wrap
      around, default), 'pad' (repeat the last frame) or 'skip' (drop, count).
    resize: shorter side after resizing (None: native size).
    scale_jitter: (lo, hi) random shorter side for training (None: off).
    crop_size: square crop, random in training, centre in eval (None: none).
    flip: random horizontal flips in training (off: flipping changes the
      MovingDigits direction label).
    mean, std: if set, video = (x - mean) / std with x in [0, 1].
    fragment_frames, fragment_overlap: if fragment_frames > 0, 'video' becomes
      (B, F, fragment_frames, h, w, C), consecutive fragments sharing
      `fragment_overlap` frames (progressive training).
    batch_size: global batch size; each process reads its rows of each
      global batch, batch_size / shard_count of them.
    shuffle, seed, num_epochs: record shuffling (per epoch), seed of
      everything random, epochs (None: forever) for training.
    shard_index, shard_count: this process reads rows block shard_index of
      shard_count of each global batch (None: jax.process_index() /
      jax.process_count(); processes that share rows share an index).
    num_threads, prefetch: grain read threads and elements read ahead.
    num_workers: grain worker processes (0: read in this process).
    in_memory_gb: a split whose records hold decoded frames of one shape
      (MovingDigits, any array_record set of decoded frames) and that takes
      at most this many GiB is decoded once per process into one uint8
      array; clips are then gathered, cropped, flipped and resized a batch
      at a time (numpy) instead of read one by one: the same batches, many
      times faster. 0: always read clip by clip (video folders always are:
      decoding bounds them; use num_workers).
  """
  c = ml_collections.ConfigDict()
  c.dataset = 'moving_digits'
  c.dataset_config = ml_collections.config_dict.placeholder(str)
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.prepare = True
  c.task = 'motion'
  c.split = 'train'
  c.eval_split = 'test'
  c.num_frames = 16
  c.stride = 1
  c.max_stride = ml_collections.config_dict.placeholder(int)
  c.short_video = 'loop'
  c.resize = ml_collections.config_dict.placeholder(int)
  c.scale_jitter = ml_collections.config_dict.placeholder(tuple)
  c.crop_size = ml_collections.config_dict.placeholder(int)
  c.flip = False
  c.mean = ml_collections.config_dict.placeholder(float)
  c.std = ml_collections.config_dict.placeholder(float)
  c.fragment_frames = 0
  c.fragment_overlap = 0
  c.batch_size = 32
  c.shuffle = True
  c.seed = 0
  c.num_epochs = ml_collections.config_dict.placeholder(int)
  c.shard_index = ml_collections.config_dict.placeholder(int)
  c.shard_count = ml_collections.config_dict.placeholder(int)
  c.num_threads = 2
  c.prefetch = 64
  c.num_workers = 0
  c.in_memory_gb = 4.0
  return c


def in_memory_gb(config) -> float:
  """`config.in_memory_gb`; configs saved before it existed: the default."""
  return config.get('in_memory_gb', get_config().in_memory_gb)


# --------------------------------------------------------------------------
# Elements: one clip read, sampled and transformed (`transforms`); bad files
# named, logged once and counted.


# Files already warned about, per process: each grain worker has its own.
_warned: set[tuple[int, str]] = set()
_warned_lock = threading.Lock()  # grain's read threads share the set.


def _warn_once(status: int, name: str, message: str, *args) -> None:
  """Logs `message % args` the first time `name` is bad in this process."""
  with _warned_lock:
    if (status, name) in _warned:
      return
    _warned.add((status, name))
  logging.warning(message, *args)


def _encode_names(names: Sequence[str]) -> str:
  """File names as one string, so that they batch like any leaf ('': none)."""
  return json.dumps(list(names)) if names else ''


def _decode_names(encoded: str) -> list[str]:
  """Inverse of `_encode_names`; batch padding ('0') holds none."""
  return json.loads(encoded) if str(encoded).startswith('[') else []


def bad_reads(elements) -> tuple[list[str], list[str], int]:
  """What `load_clip` met reading `elements`: (failed files, truncated files
  (names, once per read), reads of videos shorter than the clip span)."""
  failed, truncated, short = [], [], 0
  for e in elements:
    short += int(e['_short'])
    failed += _decode_names(e['_failed'])
    truncated += _decode_names(e['_truncated'])
  return failed, truncated, short


def _element(video, label, status, short=0, failed=(), truncated=()):
  """An element of the stream before batching; names of bad files encoded."""
  return {'video': video, 'label': label, '_status': status, '_short': short,
          '_failed': _encode_names(failed),
          '_truncated': _encode_names(truncated)}


def _read(source: Source, record: Any, select):
  """source.read -> (frames | None, status, bad file's name | None).

  A bad file is logged the first time this process reads it.
  """
  try:
    got = source.read(record, select)
  except video_folder.DecodeError as e:
    name = e.path or str(e)
    _warn_once(FAILED, name, 'Skipping unreadable video %s: %s (counted once '
               'in data/failed_videos).', name, e.cause)
    return None, FAILED, name
  if not isinstance(got, video_folder.Decoded):
    return got, OK, None
  if got.truncated:
    _warn_once(TRUNCATED, got.path, 'Truncated video %s: %d frames decodable '
               'of the %d its container states; clips reaching the cut are '
               'skipped (counted once in data/truncated_videos).', got.path,
               got.decoded, got.expected)
    return None, TRUNCATED, got.path
  return got.frames, OK, None


def load_clip(source: Source, record: Any, rng: np.random.Generator | None,
              params: transforms.ClipParams) -> dict[str, Any]:
  """Reads, samples and transforms one clip; never raises on a bad video.

  Returns:
    {'video': uint8 (T, h, w, C) (None if not ok), 'label': int32,
     '_status': OK | FAILED | SHORT | TRUNCATED, '_short': 1 if the video
     was shorter than the clip span, '_failed' / '_truncated': the bad file's
     name (encoded, see `_encode_names`) or ''}.
  """
  stride = transforms.clip_stride(rng, params)
  shorts = []  # Per call of `select` (a reader may call it again).

  def select(length):
    frames, short = transforms.clip_frames(length, rng, params, stride)
    shorts.append(short)
    return frames

  label = np.int32(source.label(record))
  frames, status, name = _read(source, record, select)
  if status == FAILED:
    return _element(None, label, FAILED, failed=[name])
  if status == TRUNCATED:
    return _element(None, label, TRUNCATED, truncated=[name])
  short = shorts[-1] if shorts else 0
  if frames is None:
    return _element(None, label, SHORT, short)
  frames = transforms.spatial_transform(frames, rng,
                                        **transforms.spatial_args(params))
  return _element(frames, label, OK, short)


def _train_element(record, rng, *, source, params):
  return load_clip(source, record, rng, params)


def global_index(index: int, *, rows: int, shard_index: int,
                 shard_count: int) -> int:
  """Index in the global stream of this process's element `index`.

  Process `shard_index` reads rows [shard_index * rows, (shard_index + 1) *
  rows) of every global batch of rows * shard_count elements.
  """
  batch, row = divmod(index, rows)
  return (batch * shard_count + shard_index) * rows + row


class _Rows(grain.MapDataset):
  """This process's rows of each global batch of a global MapDataset."""

  def __init__(self, parent: grain.MapDataset, *, rows: int,
               shard_index: int, shard_count: int):
    super().__init__(parent)
    self._index = functools.partial(global_index, rows=rows,
                                    shard_index=shard_index,
                                    shard_count=shard_count)
    self._length = len(parent) // (rows * shard_count) * rows  # Full batches.

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._index(index)]

  def __str__(self) -> str:
    return 'RowsMapDataset'


def _eval_element(index, *, source, params, rows, shard_index, shard_count,
                  out_shape):
  """Element `index` of this process's eval rows; padding past the end."""
  i = global_index(index, rows=rows, shard_index=shard_index,
                   shard_count=shard_count)
  if i < len(source.data):
    e = load_clip(source, source.data[i], None, params)
  else:
    e = dict(_element(None, np.int32(0), OK), _pad=True)
  ok = e['_status'] == OK and not e.pop('_pad', False)
  if e['video'] is None:
    e['video'] = np.zeros(out_shape, np.uint8)
  e['mask'] = np.bool_(ok)
  return e


class _DropBadIterator(grain.DatasetIterator):
  """Drops failed / skipped elements; their counts ride on the next element."""

  def __next__(self):
    read = [next(self._parent)]
    while read[-1]['_status'] != OK:
      read.append(next(self._parent))
    failed, truncated, short = bad_reads(read)
    e = dict(read[-1], _failed=_encode_names(failed),
             _truncated=_encode_names(truncated), _short=np.int32(short),
             mask=np.bool_(True))
    del e['_status']
    return e

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _DropBad(grain.IterDataset):

  def __iter__(self):
    return _DropBadIterator(self._parent.__iter__())


# --------------------------------------------------------------------------
# Elements of a split held in memory (`memory`): the draws only; the pixels
# are gathered a batch at a time.


def _planned_element(record, rng, *, length, frame_hw, params):
  """In-memory train element: `load_clip`'s draws for `record`, no pixels."""
  frames, spatial, short = transforms.plan_clip(length, frame_hw, rng, params)
  return {'_record': np.int64(record), '_frames': frames,
          '_spatial': spatial, '_short': np.int32(short),
          'mask': np.bool_(True)}


def _planned_eval_element(index, *, length, frame_hw, params, num_records,
                          rows, shard_index, shard_count):
  """In-memory eval element `index` of this process's rows; padding past
  the end (mask False, zero video)."""
  i = global_index(index, rows=rows, shard_index=shard_index,
                   shard_count=shard_count)
  e = _planned_element(min(i, num_records - 1), None, length=length,
                       frame_hw=frame_hw, params=params)
  e['mask'] = np.bool_(i < num_records)
  return e


def _gather_batch(batch: Batch, *, store: memory.InMemory,
                  crop_size: int | None) -> Batch:
  """A batch of planned elements -> uint8 clips and labels from memory, in
  the layout `_finish_batch` takes (no bad files in memory)."""
  records, mask = batch['_record'], batch['mask']
  video = memory.gather_clips(store, records, batch['_frames'],
                              batch['_spatial'], crop_size)
  labels = store.labels[records]
  if not mask.all():  # Eval padding: zeros, as the file path pads.
    video[~mask] = 0
    labels[~mask] = 0
  none = np.full(len(records), '')
  return {'video': video, 'label': labels, 'mask': mask, '_short':
          batch['_short'], '_failed': none, '_truncated': none}


class _ElementStateIterator(grain.DatasetIterator):
  """Iterator state counted in elements, as the per-clip pipeline counts
  it, over a dataset of whole batches of `rows`: a checkpoint restores on
  either path."""

  def __init__(self, parent: grain.DatasetIterator, rows: int):
    super().__init__(parent)
    self._rows = rows

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    state = dict(self._parent.get_state())
    state['next_index'] *= self._rows
    return state

  def set_state(self, state):
    state = dict(state)
    state['next_index'], rest = divmod(state['next_index'], self._rows)
    if rest:
      raise ValueError(f'Iterator state at element {state["next_index"]} is '
                       f'not at a batch of {self._rows} (a pipeline that '
                       'dropped bad videos); it does not resume from memory.')
    self._parent.set_state(state)


class _ElementState(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, rows: int):
    super().__init__(parent)
    self._rows = rows

  def __iter__(self):
    return _ElementStateIterator(self._parent.__iter__(), self._rows)


def _finish_batch(batch: Batch, *, mean, std, fragment_frames,
                  fragment_overlap, next_frame) -> Batch:
  """uint8 batch -> float32 model input; counters -> '_stats' scalars."""
  out = {'label': batch['label'].astype(np.int32), 'mask': batch['mask']}
  out['video'] = transforms.normalize(batch['video'], mean, std)
  if next_frame:
    out = transforms.next_frame_targets(out)
  for k in ('video', 'target'):
    if k in out and fragment_frames:
      out[k] = transforms.split_fragments(out[k], fragment_frames,
                                          fragment_overlap)
  names = lambda key: [n for s in batch[key] for n in _decode_names(s)]
  out['_stats'] = {'failed': names('_failed'), 'truncated': names('_truncated'),
                   'too_short': np.int64(np.sum(batch['_short']))}
  return out


# --------------------------------------------------------------------------
# Datasets and iterators.


@dataclasses.dataclass
class DecodeStats:
  """Bad input seen so far by an iterator (checkpointed with it, JSON-able).

  Attributes:
    failed: distinct files that could not be decoded (skipped in training,
      masked out in eval), however often they are drawn.
    too_short: reads of videos shorter than the clip span (looped, padded or,
      with short_video='skip', skipped); a video drawn again counts again.
    failed_reads: reads that failed (every draw of a bad file).
    truncated: distinct files found cut (`video_folder.Decoded.truncated`);
      reads that reach the cut are skipped / masked out.
    failed_files, truncated_files: those files, in the order first seen.
  """
  failed: int = 0
  too_short: int = 0
  failed_reads: int = 0
  truncated: int = 0
  failed_files: list[str] = dataclasses.field(default_factory=list)
  truncated_files: list[str] = dataclasses.field(default_factory=list)

  def update(self, failed: Sequence[str] = (), truncated: Sequence[str] = (),
             too_short: int = 0) -> None:
    """Adds one batch: names of bad files read (repeats allowed), short reads."""
    self.failed_reads += len(failed)
    self.too_short += int(too_short)
    self.failed += _add_new(self.failed_files, failed)
    self.truncated += _add_new(self.truncated_files, truncated)

  def metrics(self, prefix: str = 'data/') -> dict[str, int]:
    return {f'{prefix}failed_videos': self.failed,
            f'{prefix}failed_reads': self.failed_reads,
            f'{prefix}truncated_videos': self.truncated,
            f'{prefix}too_short_videos': self.too_short}


def _add_new(seen: list[str], names: Sequence[str]) -> int:
  """Appends the names not in `seen` (once each); returns how many."""
  known, before = set(seen), len(seen)
  for n in names:
    if n not in known:
      known.add(n)
      seen.append(n)
  return len(seen) - before


@dataclasses.dataclass
class DataInfo:
  """What a pipeline delivers (per process).

  Attributes:
    num_examples: videos in the split (all processes).
    num_classes: labels.
    batch_size: per-process batch size.
    element_shape: (T, h, w, C) of one clip before fragments/next-frame.
    class_names: label names if known.
    shard_index, shard_count: this process reads rows block shard_index
      of shard_count of each global batch (`rows`).
    steps_per_epoch: batches per epoch (eval: per pass), the same in every
      process.
  """
  num_examples: int
  num_classes: int
  batch_size: int
  element_shape: tuple[int, ...] | None
  class_names: Sequence[str] | None
  shard_index: int
  shard_count: int
  steps_per_epoch: int

  @property
  def rows(self) -> slice:
    """This process's rows of each global batch."""
    return slice(self.shard_index * self.batch_size,
                 (self.shard_index + 1) * self.batch_size)


def shard_of(config) -> tuple[int, int]:
  """(shard_index, shard_count) of a data config: this process reads row
  block shard_index of shard_count of each global batch (unset: jax's
  process index and count)."""
  if config.shard_index is not None and config.shard_count is not None:
    index, count = config.shard_index, config.shard_count
  else:
    index, count = jax.process_index(), jax.process_count()
  if not 0 <= index < count:
    raise ValueError(f'shard_index {index} not in [0, {count}).')
  return index, count


def describe_process(info: DataInfo, mesh=None) -> str:
  """One start-up line: this process, its devices, the mesh, its rows.

  E.g. "process 1 of 2: local devices [2, 3] (cpu), mesh {'data': 4,
  'stage': 1}, rows 2:4 of each global batch of 4".
  """
  devices = jax.local_devices()
  layout = dict(mesh.shape) if mesh is not None else 'none (one device)'
  rows, total = info.rows, info.batch_size * info.shard_count
  return (f'process {jax.process_index()} of {jax.process_count()}: local '
          f'devices {[d.id for d in devices]} ({devices[0].platform}), mesh '
          f'{layout}, rows {rows.start}:{rows.stop} of each global batch of '
          f'{total}')


def clip_params(config: ml_collections.ConfigDict,
                train: bool) -> transforms.ClipParams:
  """ClipParams of a config; eval: centred start, no jitter, centre crop."""
  frames = config.num_frames + (config.task == 'next_frame')
  if train:
    return transforms.ClipParams(
        num_frames=frames, stride=config.stride, max_stride=config.max_stride,
        random_start=True, short_video=config.short_video,
        resize=config.resize,
        scale_jitter=tuple(config.scale_jitter) if config.scale_jitter else None,
        crop_size=config.crop_size, random_crop=True, flip=config.flip)
  resize = config.resize or (config.scale_jitter[0] if config.scale_jitter
                             else None)
  return transforms.ClipParams(num_frames=frames, stride=config.stride,
                    random_start=False, short_video=config.short_video,
                    resize=resize, crop_size=config.crop_size,
                    random_crop=False, flip=False)


def clip_shape(frame_shape: Sequence[int] | None,
               params: transforms.ClipParams) -> tuple[int, ...] | None:
  """(T, h, w, C) of a clip cut with `params` from frames of `frame_shape`
  ((H, W, C), None if they vary; `Source.frame_shape`), if fixed; else None.
  """
  channels = frame_shape[-1] if frame_shape else 3
  if params.crop_size:
    return (params.num_frames, params.crop_size, params.crop_size, channels)
  if frame_shape and not (params.resize or params.scale_jitter):
    return (params.num_frames,) + tuple(frame_shape)
  return None


def _finish_fn(config):
  return functools.partial(
      _finish_batch, mean=config.mean, std=config.std,
      fragment_frames=config.fragment_frames,
      fragment_overlap=config.fragment_overlap,
      next_frame=config.task == 'next_frame')


def _file_batches(config, source: Source, params: transforms.ClipParams,
                  train: bool, steps: int, shape,
                  own: dict) -> grain.IterDataset:
  """Batches of clips read one by one (`load_clip`) in grain's threads (or
  worker processes): for decode-bound video files."""
  if train:
    # The global order and augmentation in every process, then its rows
    # (lazy: only those are read).
    ds = grain.MapDataset.source(source.data)
    if config.shuffle:
      ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    ds = ds.random_map(
        functools.partial(_train_element, source=source, params=params),
        seed=config.seed)
    ds = _Rows(ds, **own)
  else:
    ds = grain.MapDataset.range(steps * own['rows']).map(functools.partial(
        _eval_element, source=source, params=params, out_shape=shape,
        **own))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads, prefetch_buffer_size=config.prefetch))
  if train:
    ds = _DropBad(ds)
    ds = ds.batch(own['rows'], drop_remainder=True)
  else:
    ds = ds.batch(own['rows'], batch_fn=functools.partial(
        grain.experimental.batch_and_pad, batch_size=own['rows']))
  return ds.map(_finish_fn(config))


def _memory_batches(config, store: memory.InMemory,
                    params: transforms.ClipParams, train: bool,
                    steps: int, own: dict) -> grain.IterDataset:
  """Batches cut from a split held in memory: grain draws each element's
  clip with the per-clip path's rng (same global order, same seed per
  global index: the same batches), numpy gathers and transforms a whole
  batch at once, in grain's read threads, a batch per read."""
  n, length, h, w, _ = store.videos.shape
  plan = dict(length=length, frame_hw=(h, w), params=params)
  if train:
    ds = grain.MapDataset.range(n)
    if config.shuffle:
      ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    ds = ds.random_map(functools.partial(_planned_element, **plan),
                       seed=config.seed)
    ds = _Rows(ds, **own)
  else:
    ds = grain.MapDataset.range(steps * own['rows']).map(functools.partial(
        _planned_eval_element, num_records=n, **plan, **own))
  ds = ds.batch(own['rows'], drop_remainder=True)
  ds = ds.map(functools.partial(_gather_batch, store=store,
                                crop_size=params.crop_size))
  ds = ds.map(_finish_fn(config))
  # config.prefetch counts clips; here a read is a batch (each thread at
  # least one ahead).
  ahead = -(-config.prefetch // own['rows'])
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads,
      prefetch_buffer_size=max(ahead, config.num_threads) if ahead else 0))
  return _ElementState(ds, own['rows'])


def make_dataset(config: ml_collections.ConfigDict, train: bool = True,
                 source: Source | None = None,
                 ) -> tuple[grain.IterDataset, DataInfo]:
  """The grain dataset of batches and its `DataInfo`.

  Args:
    config: see `get_config`.
    train: shuffled, repeated, augmented batches of full size (drop
      remainder) from `config.split`; else one ordered pass over
      `config.eval_split`, padded, with `mask`.
    source: an opened `Source` (default: `make_source(config, split)`).

  Returns:
    (dataset, info): iterating `dataset` gives dicts {'video': float32
    (B, T, h, w, C), 'label': int32 (B,), 'mask': bool (B,), '_stats': {...}}
    plus 'target' for task 'next_frame'; B = config.batch_size /
    shard_count: this process's rows (`DataInfo.rows`) of each global
    batch. Prefer `make_iterator`, which also takes '_stats' off.
  """
  split = config.split if train else config.eval_split
  source = source or make_source(config, split)
  shard_index, shard_count = shard_of(config)
  if config.batch_size % shard_count:
    raise ValueError(f'batch_size {config.batch_size} is not divisible by '
                     f'{shard_count} processes.')
  batch_size = config.batch_size // shard_count
  params = clip_params(config, train)
  shape = clip_shape(source.frame_shape, params)
  n = len(source.data)
  if n == 0:
    raise ValueError(f'Split {split!r} of {source.name} is empty.')
  own = dict(rows=batch_size, shard_index=shard_index,
             shard_count=shard_count)
  if not train and shape is None:
    raise ValueError('Eval needs a fixed clip shape: set config.crop_size.')
  # Train: full global batches; eval: the last global batch padded.
  steps = n // config.batch_size if train else -(-n // config.batch_size)
  store = memory.in_memory(source, in_memory_gb(config))
  if memory.fits_in_memory(store, params):
    ds = _memory_batches(config, store, params, train, steps, own)
  else:
    ds = _file_batches(config, source, params, train, steps, shape, own)
  if config.num_workers:
    if not flags.FLAGS.is_parsed():
      # Still needed (grain 0.2.18): starting the workers reads the absl flag
      # --grain_enable_multiprocess_worker_profiling as `FlagHolder.value`,
      # which raises UnparsedFlagAccessError before flags are parsed. Under
      # absl.app (launch/) they are and this does nothing; elsewhere
      # (notebooks, pytest, plain scripts) every flag keeps its default.
      # tests/test_data.py's worker tests run with flags unparsed.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers))
  info = DataInfo(num_examples=n, num_classes=source.num_classes,
                  batch_size=batch_size, element_shape=shape,
                  class_names=source.class_names, shard_index=shard_index,
                  shard_count=shard_count, steps_per_epoch=steps)
  return ds, info


class DataIterator(Iterator[Batch]):
  """Batches with checkpointable state and decode statistics.

  Attributes:
    info: DataInfo.
    stats: DecodeStats, cumulative over the run (restored by set_state).

  Example:
    it = make_iterator(config)
    for step, batch in zip(range(num_steps), it):
      ...
      metrics.update(it.stats.metrics())
      if step % 1000 == 0:
        save(json.dumps(it.get_state()))
    it.set_state(json.loads(saved))  # continues with the very next batch
  """

  def __init__(self, dataset: grain.IterDataset, info: DataInfo,
               owned: Source | None = None):
    self.info = info
    self.stats = DecodeStats()
    self._it = iter(dataset)
    self._owned = owned  # A source this iterator opened: closed with it.

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> Batch:
    batch = next(self._it)
    stats = batch.pop('_stats')
    self.stats.update(stats['failed'], stats['truncated'], stats['too_short'])
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-able state: grain's iterator state and the decode counters."""
    return {'grain': self._it.get_state(),
            'stats': dataclasses.asdict(self.stats)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state['grain'])
    self.stats = DecodeStats(**state['stats'])

  def close(self) -> None:
    """Stops grain's threads and workers; closes the source's files if
    this iterator opened it."""
    self._it.close()
    if self._owned is not None:
      self._owned.close()


def make_iterator(config: ml_collections.ConfigDict, train: bool = True,
                  source: Source | None = None) -> DataIterator:
  """Iterator of batches; see `make_dataset` for arguments and contents.

  Train: endless (or `num_epochs`) shuffled, augmented full batches. Eval: one
  pass, last batch padded, `mask` marks real, readable clips.
  """
  owned = None
  if source is None:  # Opened here: closed with the iterator.
    split = config.split if train else config.eval_split
    source = owned = make_source(config, split)
  return DataIterator(*make_dataset(config, train, source), owned=owned)


def make_eval_iterator(config: ml_collections.ConfigDict,
                       source: Source | None = None) -> DataIterator:
  """One pass over `config.eval_split`: `make_iterator(config, train=False)`."""
  return make_iterator(config, train=False, source=source)
