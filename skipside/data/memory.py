"""A split held in memory: decoded once per process, clips cut a batch at a
time.

A split whose records hold whole decoded videos of one shape
(`sources.array_key`: MovingDigits, any array_record set of decoded frames)
and that fits in `config.in_memory_gb` is read once into one uint8 array
(`in_memory`); a batch of clips is then one fancy-index gather plus
`transforms.apply_spatial` (`gather_clips`), with the draws of
`transforms.plan_clip`: the same clips as read one by one, many times
faster.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from skipside.data import sources
from skipside.data import transforms


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


def _decode_all(source: sources.Source, key: str, max_bytes: float):
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


def in_memory(source: sources.Source, max_gb: float) -> InMemory | None:
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


def fits_in_memory(store: InMemory | None,
                   params: transforms.ClipParams) -> bool:
  """Every clip can be cut from `store` (no video skipped as too short:
  batches then never shift, and are gathered as a whole)."""
  if store is None:
    return False
  longest = (params.num_frames - 1) * max(params.stride,
                                          params.max_stride or 0) + 1
  return params.short_video != 'skip' or store.videos.shape[1] >= longest


def gather_clips(store: InMemory, records: np.ndarray, frames: np.ndarray,
                 spatial: transforms.Spatial,
                 crop_size: int | None) -> np.ndarray:
  """Clips from memory: uint8 (B, T, h, w, C) of records (B,), frame
  indices (B, T) and `Spatial` of (B,) arrays (one gather, then
  `apply_spatial`)."""
  clips = store.videos[np.asarray(records)[:, None], frames]
  return transforms.apply_spatial(clips, spatial, crop_size)

