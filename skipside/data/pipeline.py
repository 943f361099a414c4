"""Input pipeline: grain over TFDS array_record sources or video folders.

Two paths, the same batches (the same draws, one transform):

Clip by clip (`_file_batches`; video folders, and any split too big for
`config.in_memory_gb`), one element's path, top to bottom (train):

    record (source[i], shuffled, repeated: one global order)
      -> this process's rows of each global batch     `global_index`
      -> read + clip sampling   uint8 (T, H0, W0, C)   `frame_indices`
      -> resize / crop / flip   uint8 (T, h, w, C)     `spatial_transform`
      -> unreadable, truncated or (with short_video='skip') too-short videos
         dropped; counted, bad files once each, and
         logged once per file                           `DecodeStats`
      -> batch                  uint8 (B, T, h, w, C)
      -> float32 in [0, 1] (optionally (x - mean) / std), optional fragments
         (B, F, Tf, h, w, C), next-frame targets.

In memory (`_memory_batches`; MovingDigits and any split of decoded frames
of one shape, `in_memory`): the split is decoded once per process into one
uint8 array (N, L, H, W, C); grain draws each element's frames, scale, crop
and flip (`plan_clip`, the same rng as above), and each batch is gathered
and transformed at once (`gather_clips`: fancy indexing, resizes grouped by
size), in grain's read threads. Iterator states count elements on both
paths, so a checkpoint of one resumes on the other.

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

The clip parameters (`ClipParams`: frames, stride, crop, ...) are arguments of
the element transform, not globals, so multigrid can vary them per batch:
`load_clip(source, record, rng, params)`.

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
from typing import Any, Iterator, NamedTuple, Sequence

from absl import flags
from absl import logging
import grain
import ml_collections
import numpy as np

from skipside.data import sources
from skipside.data import video_folder
from skipside.data.sources import Source, make_source

Batch = dict[str, np.ndarray]
SHORT_VIDEO_POLICIES = ('loop', 'pad', 'skip')
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
    task: 'appearance' | 'motion' | 'long_range' | 'next_frame' |
      'multi_label' (MovingDigits: digit and direction as one multi-hot
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


# --------------------------------------------------------------------------
# Clip sampling and spatial transforms: what is drawn (pure functions of the
# video's size, an rng and the params) apart from how it is applied (batched
# numpy), so that clips read one by one from files and clips gathered from a
# split held in memory share one sampling law and one transform.


@dataclasses.dataclass(frozen=True)
class ClipParams:
  """How one clip is cut from a video; may change from batch to batch.

  Attributes:
    num_frames: T.
    stride: temporal stride.
    max_stride: draw the stride uniformly in [stride, max_stride] if set.
    random_start: random start (train) or centred (eval).
    short_video: 'loop' | 'pad' | 'skip' (see `frame_indices`).
    resize: shorter side after resize (None: keep).
    scale_jitter: (lo, hi) random shorter side; overrides `resize`.
    crop_size: square crop side (None: no crop).
    random_crop: random crop position (train) or centre (eval).
    flip: random horizontal flip with probability 1/2.
  """
  num_frames: int = 16
  stride: int = 1
  max_stride: int | None = None
  random_start: bool = True
  short_video: str = 'loop'
  resize: int | None = None
  scale_jitter: tuple[int, int] | None = None
  crop_size: int | None = None
  random_crop: bool = True
  flip: bool = False


def clip_stride(rng: np.random.Generator | None, params: ClipParams) -> int:
  """The clip's stride: drawn in [stride, max_stride] if set (needs rng)."""
  if params.max_stride and rng is not None:
    return int(rng.integers(params.stride, params.max_stride + 1))
  return params.stride


def frame_indices(length: int, rng: np.random.Generator | None, *,
                  num_frames: int, stride: int = 1, random_start: bool = True,
                  short_video: str = 'loop') -> np.ndarray | None:
  """Indices of a clip of `num_frames` frames `stride` apart in [0, length).

  Args:
    length: L, frames in the video.
    rng: draws the start if `random_start` (else unused, may be None).
    num_frames: T.
    stride: step between sampled frames.
    random_start: uniform start over all clips that fit, else the centred one.
    short_video: if L < (T - 1) * stride + 1: 'loop' wraps around (random or
      zero start), 'pad' repeats the last frame, 'skip' returns None.

  Returns:
    int64 (T,) indices, or None to skip the video.
  """
  if short_video not in SHORT_VIDEO_POLICIES:
    raise ValueError(f'short_video must be one of {SHORT_VIDEO_POLICIES}, '
                     f'got {short_video!r}')
  offsets = stride * np.arange(num_frames)
  span = int(offsets[-1]) + 1
  if length >= span:
    start = (int(rng.integers(length - span + 1)) if random_start
             else (length - span) // 2)
    return start + offsets
  if short_video == 'skip':
    return None
  if short_video == 'pad':
    return np.minimum(offsets, length - 1)
  start = int(rng.integers(length)) if random_start else 0
  return (start + offsets) % length


def resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
  """(H, W) after `resize_short_side(., size)`: min == size, aspect kept."""
  if min(h, w) == size:
    return h, w
  scale = size / min(h, w)
  return max(size, round(h * scale)), max(size, round(w * scale))


def _pil_resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """PIL bilinear resize of one uint8 (H, W, C) image, C in (1, 3)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  gray = image.shape[-1] == 1
  out = Image.fromarray(image[..., 0] if gray else image).resize(
      (hw[1], hw[0]), Image.BILINEAR)
  return np.asarray(out).reshape(*hw, image.shape[-1])


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of uint8 (..., H, W, C) so that min(H, W) == size.

  PIL's bilinear filter, frame by frame in effect, done in two calls for all
  frames: PIL resamples rows then columns, each row (column) on its own, so
  the rows of every frame stacked as one tall image, then the columns of
  every frame side by side as one wide image, give exactly the per-frame
  result. Channels other than 1 and 3 are resized one by one.
  """
  *lead, h, w, c = frames.shape
  new_h, new_w = resized_hw(h, w, size)
  if (new_h, new_w) == (h, w):
    return frames
  if c not in (1, 3):
    return np.concatenate([resize_short_side(frames[..., i:i + 1], size)
                           for i in range(c)], axis=-1)
  x = frames.reshape(-1, h, w, c)
  n = len(x)
  if new_w != w:  # Rows: (n * h, w) -> (n * h, new_w).
    x = _pil_resize(x.reshape(n * h, w, c), (n * h, new_w))
    x = x.reshape(n, h, new_w, c)
  if new_h != h:  # Columns: (h, n * new_w) -> (new_h, n * new_w).
    x = x.transpose(1, 0, 2, 3).reshape(h, n * new_w, c)
    x = _pil_resize(x, (new_h, n * new_w))
    x = x.reshape(new_h, n, new_w, c).transpose(1, 0, 2, 3)
  return np.ascontiguousarray(x).reshape(*lead, new_h, new_w, c)


class Spatial(NamedTuple):
  """Drawn spatial augmentation of a clip (scalars) or of a batch ((B,)).

  Attributes:
    short: shorter side to resize to first (0: keep the size).
    y, x: top-left corner of the crop (0 without a crop).
    flip: flip left-right.
  """
  short: Any
  y: Any
  x: Any
  flip: Any


def spatial_plan(frame_hw: Sequence[int], rng: np.random.Generator | None, *,
                 resize: int | None = None,
                 scale_jitter: tuple[int, int] | None = None,
                 crop_size: int | None = None, random_crop: bool = True,
                 flip: bool = False) -> Spatial:
  """Draws a clip's resize, crop position and flip (`apply_spatial` does them).

  Args:
    frame_hw: (H, W) of the video's frames.
    rng: randomness for jitter, crop position and flip (None: deterministic).
    resize: shorter side (None: keep).
    scale_jitter: (lo, hi): shorter side uniform in [lo, hi]; needs rng.
    crop_size: square crop side (None: none); a smaller frame is upscaled.
    random_crop: random position (needs rng) rather than centre.
    flip: flip left-right with probability 1/2 (needs rng).
  """
  short = (int(rng.integers(scale_jitter[0], scale_jitter[1] + 1))
           if scale_jitter and rng is not None else resize) or 0
  h, w = resized_hw(*frame_hw, short) if short else tuple(frame_hw)
  y = x = 0
  if crop_size:
    if min(h, w) < crop_size:  # Upscale rather than fail on a small video.
      h, w = resized_hw(h, w, crop_size)
    if random_crop and rng is not None:
      y, x = int(rng.integers(h - crop_size + 1)), int(
          rng.integers(w - crop_size + 1))
    else:
      y, x = (h - crop_size) // 2, (w - crop_size) // 2
  do_flip = bool(flip and rng is not None and rng.random() < 0.5)
  return Spatial(np.int32(short), np.int32(y), np.int32(x), np.bool_(do_flip))


def _crop_flip(clips: np.ndarray, y, x, flip, size: int | None) -> np.ndarray:
  """(n, T, H, W, C) -> (n, T, s, s, C): clip i cropped at (y[i], x[i]) and
  flipped where flip[i].

  A loop of slice copies: each copies at memory speed, where one fancy-index
  gather over (clip, frame, row, column) measured ~10x slower.
  """
  n, t, h, w, c = clips.shape
  sh, sw = (size, size) if size else (h, w)
  if (sh, sw) == (h, w) and not np.any(flip):
    return clips
  out = np.empty((n, t, sh, sw, c), clips.dtype)
  for i, (yi, xi, fi) in enumerate(zip(np.asarray(y).tolist(),
                                        np.asarray(x).tolist(),
                                        np.asarray(flip).tolist())):
    window = clips[i, :, yi:yi + sh, xi:xi + sw]
    out[i] = window[:, :, ::-1] if fi else window
  return out


def apply_spatial(clips: np.ndarray, plan: Spatial,
                  crop_size: int | None = None) -> np.ndarray:
  """Resizes, crops and flips a batch of clips as `plan` says.

  Args:
    clips: uint8 (B, T, H, W, C).
    plan: `Spatial` of (B,) arrays (from `spatial_plan`, stacked).
    crop_size: square crop side (None: none).

  Returns:
    uint8 (B, T, h, w, C); (B, T, crop_size, crop_size, C) when cropping.
    Clips are resized in groups of equal shorter side (PIL, two calls a
    group), then cropped and flipped in one gather.
  """
  short = np.asarray(plan.short)
  sizes = np.unique(short)
  out = None
  for s in sizes:
    rows = np.flatnonzero(short == s)
    x = clips if len(sizes) == 1 else clips[rows]
    if s:
      x = resize_short_side(x, int(s))
    if crop_size and min(x.shape[2:4]) < crop_size:
      x = resize_short_side(x, crop_size)
    x = _crop_flip(x, np.asarray(plan.y)[rows], np.asarray(plan.x)[rows],
                   np.asarray(plan.flip)[rows], crop_size)
    if len(sizes) == 1:
      return np.ascontiguousarray(x)
    if out is None:
      if not crop_size:
        raise ValueError('Clips resized to different sizes do not batch: '
                         'set crop_size with scale_jitter.')
      out = np.empty((len(clips), *x.shape[1:]), x.dtype)
    out[rows] = x
  return out


def spatial_transform(frames: np.ndarray, rng: np.random.Generator | None, *,
                      resize: int | None = None,
                      scale_jitter: tuple[int, int] | None = None,
                      crop_size: int | None = None, random_crop: bool = True,
                      flip: bool = False) -> np.ndarray:
  """Resize (fixed or jittered shorter side), crop and flip one clip.

  Args:
    frames: uint8 (T, H, W, C).
    rng, resize, scale_jitter, crop_size, random_crop, flip: `spatial_plan`.

  Returns:
    uint8 (T, h, w, C); (T, crop_size, crop_size, C) when cropping.
  """
  plan = spatial_plan(frames.shape[1:3], rng, resize=resize,
                      scale_jitter=scale_jitter, crop_size=crop_size,
                      random_crop=random_crop, flip=flip)
  one = Spatial(*(np.asarray(v)[None] for v in plan))
  return apply_spatial(frames[None], one, crop_size)[0]


def _spatial_plan_of(frame_hw, rng, params: ClipParams) -> Spatial:
  return spatial_plan(frame_hw, rng, resize=params.resize,
                      scale_jitter=params.scale_jitter,
                      crop_size=params.crop_size,
                      random_crop=params.random_crop, flip=params.flip)


def split_fragments(video: np.ndarray, fragment_frames: int, overlap: int = 0,
                    axis: int = 1) -> np.ndarray:
  """Cuts clips into serial fragments (progressive training, DESIGN.md §4).

  Args:
    video: (..., T, ...) with time on `axis`, e.g. (B, T, H, W, C).
    fragment_frames: Tf, frames per fragment.
    overlap: frames shared by consecutive fragments.
    axis: the time axis.

  Returns:
    (..., F, Tf, ...) with F = (T - overlap) / (Tf - overlap); fragment f
    holds frames [f * (Tf - overlap), f * (Tf - overlap) + Tf).
  """
  t = video.shape[axis]
  step = fragment_frames - overlap
  if step <= 0 or (t - overlap) % step:
    raise ValueError(f'{t} frames do not split into fragments of '
                     f'{fragment_frames} with overlap {overlap}.')
  starts = range(0, t - overlap, step)
  return np.stack([np.take(video, np.arange(s, s + fragment_frames), axis=axis)
                   for s in starts], axis=axis)


def next_frame_targets(batch: Batch, axis: int = 1) -> Batch:
  """Next-frame prediction: 'video' frames [0, T-1), 'target' frames [1, T).

  Args:
    batch: {'video': (B, T, H, W, C), ...} (time on `axis`).
    axis: the time axis.

  Returns:
    A copy with 'video' (B, T-1, ...) and 'target' (B, T-1, ...): target[:, t]
    is the frame after video[:, t].
  """
  t = batch['video'].shape[axis]
  out = dict(batch)
  out['video'] = np.take(batch['video'], np.arange(t - 1), axis=axis)
  out['target'] = np.take(batch['video'], np.arange(1, t), axis=axis)
  return out


def normalize(video: np.ndarray, mean: float | None,
              std: float | None) -> np.ndarray:
  """uint8 frames -> float32 model input: x in [0, 1], then (x - mean) / std
  if `mean` is set."""
  video = video.astype(np.float32) * np.float32(1 / 255)
  if mean is not None:
    video = (video - np.float32(mean)) / np.float32(std)
  return video


# --------------------------------------------------------------------------
# Elements.


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
              params: ClipParams) -> dict[str, Any]:
  """Reads, samples and transforms one clip; never raises on a bad video.

  Returns:
    {'video': uint8 (T, h, w, C) (None if not ok), 'label': int32,
     '_status': OK | FAILED | SHORT | TRUNCATED, '_short': 1 if the video
     was shorter than the clip span, '_failed' / '_truncated': the bad file's
     name (encoded, see `_encode_names`) or ''}.
  """
  stride = clip_stride(rng, params)
  span = (params.num_frames - 1) * stride + 1
  lengths = []

  def select(length):
    lengths.append(length)
    return frame_indices(length, rng, num_frames=params.num_frames,
                         stride=stride, random_start=params.random_start,
                         short_video=params.short_video)

  label = np.int32(source.label(record))
  frames, status, name = _read(source, record, select)
  if status == FAILED:
    return _element(None, label, FAILED, failed=[name])
  if status == TRUNCATED:
    return _element(None, label, TRUNCATED, truncated=[name])
  short = int(bool(lengths) and lengths[-1] < span)
  if frames is None:
    return _element(None, label, SHORT, short)
  frames = spatial_transform(
      frames, rng, resize=params.resize, scale_jitter=params.scale_jitter,
      crop_size=params.crop_size, random_crop=params.random_crop,
      flip=params.flip)
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
# Splits held in memory: decoded once per process, clips gathered batched.


@dataclasses.dataclass(frozen=True)
class InMemory:
  """A split decoded in host memory.

  Attributes:
    videos: uint8 (N, L, H, W, C), every video of the split.
    labels: int32 (N,) (or (N, K) multi-hot), the source's labels.
  """
  videos: np.ndarray
  labels: np.ndarray


# Decoded splits of this process by `Source.key`, oldest first: their
# videos and their records without them (labels depend on the task).
_decoded: dict[str, tuple[np.ndarray, list[dict[str, Any]]]] = {}
_decoded_lock = threading.Lock()  # Pipelines may be made from threads.


def _read_records(data, start: int, stop: int) -> list:
  if hasattr(data, '__getitems__'):  # array_record reads a range at once.
    return list(data.__getitems__(list(range(start, stop))))
  return [data[i] for i in range(start, stop)]


def _decode_all(source: Source, key: str, max_bytes: float):
  """(videos, records without them), or None if the videos differ in shape,
  are not uint8 (L, H, W, C) or take more than `max_bytes`."""
  data, n = source.data, len(source.data)
  videos, rest = None, []
  for start in range(0, n, 256):
    for record in _read_records(data, start, min(n, start + 256)):
      video = record[key]
      if videos is None:
        if (not isinstance(video, np.ndarray) or video.dtype != np.uint8 or
            video.ndim != 4 or video.nbytes * n > max_bytes):
          return None
        videos = np.empty((n, *video.shape), np.uint8)
      if video.shape != videos.shape[1:]:
        return None
      videos[len(rest)] = video
      rest.append({k: v for k, v in record.items() if k != key})
  return videos, rest


def in_memory_gb(config) -> float:
  """`config.in_memory_gb`; configs saved before it existed: the default."""
  return config.get('in_memory_gb', get_config().in_memory_gb)


def in_memory(source: Source, max_gb: float) -> InMemory | None:
  """`source`'s split decoded in memory, or None where it cannot be.

  Sources whose records hold whole decoded videos (`sources.array_key`:
  MovingDigits, any array_record set of decoded frames) of one shape, taking
  at most `max_gb` GiB, are read once per process (shared by `Source.key`;
  older splits are dropped to keep the total under `max_gb`). Video folders
  (decoded per read) are not.
  """
  key = sources.array_key(source)
  if not max_gb or key is None or not len(source.data):
    return None
  max_bytes = max_gb * 2**30
  with _decoded_lock:
    got = _decoded.get(source.key) if source.key else None
    if got is None:
      got = _decode_all(source, key, max_bytes)
      if got is None:
        return None
      if source.key:
        _decoded[source.key] = got
        while sum(v.nbytes for v, _ in _decoded.values()) > max_bytes:
          del _decoded[next(iter(_decoded))]
  videos, records = got
  labels = np.stack([np.asarray(source.label(r), np.int32) for r in records])
  return InMemory(videos, labels)


def fits_in_memory(store: InMemory | None, params: ClipParams) -> bool:
  """Every clip can be cut from `store` (no video skipped as too short:
  batches then never shift, and are gathered as a whole)."""
  if store is None:
    return False
  longest = (params.num_frames - 1) * max(params.stride,
                                          params.max_stride or 0) + 1
  return params.short_video != 'skip' or store.videos.shape[1] >= longest


def plan_clip(length: int, frame_hw: Sequence[int],
              rng: np.random.Generator | None, params: ClipParams,
              ) -> tuple[np.ndarray | None, Spatial, int]:
  """What `load_clip` draws for a video of `length` frames of `frame_hw`,
  in its order, without the video: (frame indices (T,) or None to skip,
  `Spatial`, 1 if the video is shorter than the clip span else 0)."""
  stride = clip_stride(rng, params)
  frames = frame_indices(length, rng, num_frames=params.num_frames,
                         stride=stride, random_start=params.random_start,
                         short_video=params.short_video)
  short = int(length < (params.num_frames - 1) * stride + 1)
  return frames, _spatial_plan_of(frame_hw, rng, params), short


def gather_clips(store: InMemory, records: np.ndarray, frames: np.ndarray,
                 spatial: Spatial, crop_size: int | None) -> np.ndarray:
  """Clips from memory: uint8 (B, T, h, w, C) of records (B,), frame
  indices (B, T) and `Spatial` of (B,) arrays (one gather, then
  `apply_spatial`)."""
  clips = store.videos[np.asarray(records)[:, None], frames]
  return apply_spatial(clips, spatial, crop_size)


def _planned_element(record, rng, *, length, frame_hw, params):
  """In-memory train element: `load_clip`'s draws for `record`, no pixels."""
  frames, spatial, short = plan_clip(length, frame_hw, rng, params)
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


def _gather_batch(batch: Batch, *, store: InMemory,
                  crop_size: int | None) -> Batch:
  """A batch of planned elements -> uint8 clips and labels from memory, in
  the layout `_finish_batch` takes (no bad files in memory)."""
  records, mask = batch['_record'], batch['mask']
  video = gather_clips(store, records, batch['_frames'], batch['_spatial'],
                       crop_size)
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
  out['video'] = normalize(batch['video'], mean, std)
  if next_frame:
    out = next_frame_targets(out)
  for k in ('video', 'target'):
    if k in out and fragment_frames:
      out[k] = split_fragments(out[k], fragment_frames, fragment_overlap)
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
    import jax  # pylint: disable=g-import-not-at-top
    index, count = jax.process_index(), jax.process_count()
  if not 0 <= index < count:
    raise ValueError(f'shard_index {index} not in [0, {count}).')
  return index, count


def describe_process(info: DataInfo, mesh=None) -> str:
  """One start-up line: this process, its devices, the mesh, its rows.

  E.g. "process 1 of 2: local devices [2, 3] (cpu), mesh {'data': 4,
  'stage': 1}, rows 2:4 of each global batch of 4".
  """
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  layout = dict(mesh.shape) if mesh is not None else 'none (one device)'
  rows, total = info.rows, info.batch_size * info.shard_count
  return (f'process {jax.process_index()} of {jax.process_count()}: local '
          f'devices {[d.id for d in devices]} ({devices[0].platform}), mesh '
          f'{layout}, rows {rows.start}:{rows.stop} of each global batch of '
          f'{total}')


def clip_params(config: ml_collections.ConfigDict, train: bool) -> ClipParams:
  """ClipParams of a config; eval: centred start, no jitter, centre crop."""
  frames = config.num_frames + (config.task == 'next_frame')
  if train:
    return ClipParams(
        num_frames=frames, stride=config.stride, max_stride=config.max_stride,
        random_start=True, short_video=config.short_video,
        resize=config.resize,
        scale_jitter=tuple(config.scale_jitter) if config.scale_jitter else None,
        crop_size=config.crop_size, random_crop=True, flip=config.flip)
  resize = config.resize or (config.scale_jitter[0] if config.scale_jitter
                             else None)
  return ClipParams(num_frames=frames, stride=config.stride,
                    random_start=False, short_video=config.short_video,
                    resize=resize, crop_size=config.crop_size,
                    random_crop=False, flip=False)


def _element_shape(source: Source, params: ClipParams):
  """(T, h, w, C) of a clip, if fixed; else None."""
  channels = source.frame_shape[-1] if source.frame_shape else 3
  if params.crop_size:
    return (params.num_frames, params.crop_size, params.crop_size, channels)
  if source.frame_shape and not (params.resize or params.scale_jitter):
    return (params.num_frames,) + tuple(source.frame_shape)
  return None


def _finish_fn(config):
  return functools.partial(
      _finish_batch, mean=config.mean, std=config.std,
      fragment_frames=config.fragment_frames,
      fragment_overlap=config.fragment_overlap,
      next_frame=config.task == 'next_frame')


def _file_batches(config, source: Source, params: ClipParams, train: bool,
                  steps: int, shape, own: dict) -> grain.IterDataset:
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


def _memory_batches(config, store: InMemory, params: ClipParams, train: bool,
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
  shape = _element_shape(source, params)
  n = len(source.data)
  if n == 0:
    raise ValueError(f'Split {split!r} of {source.name} is empty.')
  own = dict(rows=batch_size, shard_index=shard_index,
             shard_count=shard_count)
  if not train and shape is None:
    raise ValueError('Eval needs a fixed clip shape: set config.crop_size.')
  # Train: full global batches; eval: the last global batch padded.
  steps = n // config.batch_size if train else -(-n // config.batch_size)
  store = in_memory(source, in_memory_gb(config))
  if fits_in_memory(store, params):
    ds = _memory_batches(config, store, params, train, steps, own)
  else:
    ds = _file_batches(config, source, params, train, steps, shape, own)
  if config.num_workers:
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside absl.app (notebooks, plain
      # scripts) use the defaults.
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

  def __init__(self, dataset: grain.IterDataset, info: DataInfo):
    self.info = info
    self.stats = DecodeStats()
    self._it = iter(dataset)

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
    if hasattr(self._it, 'close'):
      self._it.close()


def make_iterator(config: ml_collections.ConfigDict, train: bool = True,
                  source: Source | None = None) -> DataIterator:
  """Iterator of batches; see `make_dataset` for arguments and contents.

  Train: endless (or `num_epochs`) shuffled, augmented full batches. Eval: one
  pass, last batch padded, `mask` marks real, readable clips.
  """
  return DataIterator(*make_dataset(config, train, source))


def make_eval_iterator(config: ml_collections.ConfigDict,
                       source: Source | None = None) -> DataIterator:
  """One pass over `config.eval_split`: `make_iterator(config, train=False)`."""
  return make_iterator(config, train=False, source=source)
