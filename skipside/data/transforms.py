"""Clip sampling and augmentation: pure numpy functions of a video's size,
an rng and the clip's parameters.

What is drawn for a clip (`plan_clip`: its stride, frame indices, resize,
crop position and flip, in that order from one rng) is apart from how it is
applied (`apply_spatial`: a batch of clips at once), so that clips read one
by one from files (`pipeline.load_clip`) and clips gathered from a split
held in memory (`memory.gather_clips`) share one sampling law and one
transform. After batching: fragments (`split_fragments`), next-frame
targets (`next_frame_targets`) and the model's input scale (`normalize`).

Example:

    params = ClipParams(num_frames=8, stride=2, crop_size=28, flip=True)
    frames, spatial, short = plan_clip(len(video), video.shape[1:3], rng,
                                       params)
    clip = apply_spatial(video[frames][None], stack_plans([spatial]), 28)[0]
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

SHORT_VIDEO_POLICIES = ('loop', 'pad', 'skip')


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


def clip_frames(length: int, rng: np.random.Generator | None,
                params: ClipParams, stride: int,
                ) -> tuple[np.ndarray | None, int]:
  """A clip's frames at `stride` (`clip_stride`) in a video of `length`
  frames: (int64 (T,) indices or None to skip the video, 1 if the video is
  shorter than the clip span else 0)."""
  frames = frame_indices(length, rng, num_frames=params.num_frames,
                         stride=stride, random_start=params.random_start,
                         short_video=params.short_video)
  return frames, int(length < (params.num_frames - 1) * stride + 1)


def resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
  """(H, W) after `resize_short_side(., size)`: min == size, aspect kept."""
  if min(h, w) == size:
    return h, w
  scale = size / min(h, w)
  return max(size, round(h * scale)), max(size, round(w * scale))


def _pil_resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """PIL bilinear resize of one uint8 (H, W, C) image, C in (1, 3)."""
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


def stack_plans(plans: Sequence[Spatial]) -> Spatial:
  """B clips' `Spatial` plans as one `Spatial` of (B,) arrays."""
  return Spatial(*(np.array(v) for v in zip(*plans)))


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
  return apply_spatial(frames[None], stack_plans([plan]), crop_size)[0]


def spatial_args(params: ClipParams) -> dict[str, Any]:
  """The `spatial_plan` (and `spatial_transform`) keywords of `params`."""
  return dict(resize=params.resize, scale_jitter=params.scale_jitter,
              crop_size=params.crop_size, random_crop=params.random_crop,
              flip=params.flip)


def plan_clip(length: int, frame_hw: Sequence[int],
              rng: np.random.Generator | None, params: ClipParams,
              ) -> tuple[np.ndarray | None, Spatial, int]:
  """What `pipeline.load_clip` draws for a video of `length` frames of
  `frame_hw`, in its order, without the video: (frame indices (T,) or None
  to skip, `Spatial`, 1 if the video is shorter than the clip span else 0).
  """
  frames, short = clip_frames(length, rng, params, clip_stride(rng, params))
  return frames, spatial_plan(frame_hw, rng, **spatial_args(params)), short


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


def next_frame_targets(batch: dict[str, np.ndarray], axis: int = 1,
                       ) -> dict[str, np.ndarray]:
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
