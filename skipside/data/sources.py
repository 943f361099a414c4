"""Datasets behind one contract: a ``Source`` and a registry of openers.

A source is random-access records plus a reader that cuts a clip from one;
the pipeline (``skipside.data.pipeline``) samples, decodes, augments and
batches clips from any source the same way. ``config.data.dataset`` names
the opener, ``opener(config, split) -> Source``:

- a registered name: ``moving_digits`` (generated locally), ``video_folder``
  (PyAV), ``ucf101`` (TFDS, needs TensorFlow), or one added with
  ``register``;
- or ``package.module:function``, imported when the run starts, so a
  dataset of your own needs no edit to skipside and is recorded in
  ``config.json`` (resume and ``launch.eval`` open the same data).

Example::

    from skipside.data import sources

    @sources.register('my_videos')
    def open_my_videos(config, split):
      records = [{'video': v, 'label': y} for v, y in load(split)]  # uint8
      return sources.Source(data=records, read=sources.read_array,
                            label=sources.label_of('label'), num_classes=5)

    config.data.dataset = 'my_videos'   # or 'my_package.data:open_my_videos'
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Sequence

import numpy as np


@dataclasses.dataclass
class Source:
  """A random-access source of videos and how to read clips from it.

  Attributes:
    data: grain RandomAccessDataSource (`len`, `[i]`) of records.
    read: read(record, select) -> uint8 (T, H, W, C) or None, where
      select(L) gives frame indices or None; raises video_folder.DecodeError
      on a broken video. May return a `video_folder.Decoded` instead (frames
      plus what the container stated), which makes truncated files count.
    label: label(record) -> int, or an int array (K,) of multi-hot labels.
    num_classes: number of labels.
    frame_shape: native (H, W, C) if all videos share it, else None.
    class_names: label names, if known.
    name: for messages.
    key: identity of the records (e.g. their files and split), so that a
      process keeps one decoded copy of them in memory however many
      pipelines read them (`memory.in_memory`); None: not shared.
  """
  data: Any
  read: Callable[[Any, Callable[[int], np.ndarray | None]], np.ndarray | None]
  label: Callable[[Any], int]
  num_classes: int
  frame_shape: tuple[int, int, int] | None = None
  class_names: Sequence[str] | None = None
  name: str = ''
  key: str | None = None

  def close(self) -> None:
    """Closes the files ``data`` holds open: array_record's data source
    (TFDS's ``ArrayRecordDataSource`` wraps one as ``data_source``) keeps a
    reader per record file and closes them when used as a context manager
    exits; other sources hold none. Reading again reopens them."""
    for obj in (self.data, getattr(self.data, 'data_source', None)):
      if hasattr(obj, '__exit__'):
        obj.__exit__(None, None, None)
        return


def read_array(record: dict[str, Any], select, key: str = 'video'):
  """Reader of records that hold the whole video as an array (TFDS)."""
  video = record[key]
  indices = select(len(video))
  return None if indices is None else video[indices]


def array_key(source: Source) -> str | None:
  """The record key of whole decoded videos if ``source.read`` is
  ``read_array`` (or a partial of it naming ``key``), else None: records the
  pipeline may decode once and keep in memory."""
  read = source.read
  if read is read_array:
    return 'video'
  if isinstance(read, functools.partial) and read.func is read_array and (
      not read.args):
    return read.keywords.get('key', 'video')
  return None


def record_label(record: dict[str, Any], key: str) -> int:
  """Label of a record: `int(record[key])` (bind `key` with partial)."""
  return int(record[key])


def label_of(key: str) -> Callable[[Any], int]:
  """``Source.label`` for records that hold an int label under ``key``."""
  return functools.partial(record_label, key=key)


# Built-in openers by module path: each lives beside its reader and imports
# its heavy dependency (TensorFlow for UCF101) only when it is used.
_BUILT_IN = {
    'moving_digits': 'skipside.data.moving_digits:make_source',
    'video_folder': 'skipside.data.video_folder:make_source',
    'ucf101': 'skipside.data.ucf101:make_source',
}
_REGISTERED: dict[str, Callable[[Any, str], Source]] = {}


def register(name: str):
  """Decorator: ``opener(config, split) -> Source`` as ``config.data.dataset
  = name``. A name is registered once (a built-in cannot be replaced)."""
  def add(opener):
    if name in _BUILT_IN or name in _REGISTERED:
      raise ValueError(f'dataset {name!r} is already registered')
    _REGISTERED[name] = opener
    return opener
  return add


def names() -> list[str]:
  """Every registered dataset name."""
  return sorted({*_BUILT_IN, *_REGISTERED})


def _import(path: str):
  """``package.module:function`` -> the function; errors name ``path``."""
  module, _, attr = path.partition(':')
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'config.data.dataset: {path!r} cannot be imported: '
                     f'{e} (package.module:function)') from e


def opener(name: str) -> Callable[[Any, str], Source]:
  """The opener ``config.data.dataset = name`` stands for."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name in _BUILT_IN:
    return _import(_BUILT_IN[name])
  if ':' in str(name):
    return _import(name)
  raise ValueError(f'config.data.dataset: unknown dataset {name!r} (one of '
                   f"{names()}, or 'package.module:function')")


def config_error(config) -> tuple[str, str, str] | None:
  """The first bad key of data config ``config`` for its dataset, as
  ``(key, what is wrong, what is allowed)``, or ``None``: the opener's
  module may define ``config_error(config)``, checked before a run writes
  anything (the data is opened later)."""
  module = importlib.import_module(
      opener(config.dataset).__module__)
  check = getattr(module, 'config_error', None)
  return check(config) if check else None


def make_source(config, split: str) -> Source:
  """Opens ``split`` of ``config.dataset``; a bad path fails here, naming it."""
  source = opener(config.dataset)(config, split)
  if not isinstance(source, Source):
    raise TypeError(f'config.data.dataset {config.dataset!r} returned '
                    f'{type(source).__name__}, not a sources.Source')
  return source
