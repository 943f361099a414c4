"""UCF101 through TFDS (needs the `tf` extra: TensorFlow, and ffmpeg to prepare).

TFDS's `ucf101` builder stores each video as a `tfds.features.Video` (a
sequence of PNG-encoded frames); that feature class needs TensorFlow, so this
adapter is optional and imported only for `config.dataset = 'ucf101'`.

Prepare once (downloads ~6.5 GB, re-encodes with ffmpeg; hours on few cores):

    pip install 'skipside[tf]'          # tensorflow + tensorflow-datasets
    sudo apt-get install ffmpeg
    tfds build ucf101 --config=ucf101_1_256 --file_format=array_record \
        --data_dir=~/tensorflow_datasets

`--file_format=array_record` matters: `tfds.data_source` (random access, what
grain reads) does not read TFRecords. Configs: `ucf101_1_256` (split 1,
frames resized to 256x256), `ucf101_1`, `ucf101_2`, `ucf101_3` (native
320x240, official splits 1-3). Then:

    config = skipside.data.get_config()
    config.dataset, config.dataset_config = 'ucf101', 'ucf101_1_256'
    config.task = 'appearance'   # the only label: the action class (101)
    config.resize, config.crop_size = 128, 112

Frames are kept PNG-encoded when read and only the sampled ones are decoded
(with PIL), which is several times faster than decoding whole videos.

Not tested in this repository's CI (no TensorFlow there).
"""

from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
from PIL import Image

from skipside.data import sources, video_folder

_INSTALL = ("UCF101 through TFDS needs TensorFlow: pip install 'skipside[tf]' "
            '(see skipside/data/ucf101.py for the prepare command).')


def _decode_png(frame: Any) -> np.ndarray:
  """One frame: already decoded (H, W, 3) array, or encoded PNG bytes."""
  if isinstance(frame, np.ndarray) and frame.ndim == 3:
    return frame
  data = frame.item() if isinstance(frame, np.ndarray) else frame
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def read_encoded(record: dict[str, Any],
                 select: Callable[[int], np.ndarray | None]):
  """Reader for `sources.Source`: decodes only the selected frames.

  Args:
    record: {'video': sequence of PNG bytes (or a uint8 (L, H, W, 3) array),
      'label': int}.
    select: frame count -> indices or None.

  Returns:
    uint8 (T, H, W, 3) or None.

  Raises:
    video_folder.DecodeError: an empty video or an undecodable frame.
  """
  frames = record['video']
  if len(frames) == 0:  # pylint: disable=g-explicit-length-test
    raise video_folder.DecodeError('UCF101 record without frames')
  indices = select(len(frames))
  if indices is None:
    return None
  try:
    return np.stack([_decode_png(frames[i]) for i in indices])
  except (OSError, ValueError) as e:
    raise video_folder.DecodeError(f'UCF101 frame: {e}') from e


def make_source(config, split: str):
  """`sources.Source` of a prepared TFDS `ucf101` split (array_record)."""
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError(_INSTALL) from e
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = f"ucf101/{config.dataset_config or 'ucf101_1_256'}"
  builder = tfds.builder(name, data_dir=config.data_dir,
                         file_format='array_record')
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'{name} is not prepared in {builder.data_dir!r}. ' + _INSTALL)
  try:
    # Keep frames PNG-encoded; `read_encoded` decodes only sampled ones.
    data = builder.as_data_source(
        split, decoders={'video': tfds.decode.SkipDecoding()})
    data[0]  # pylint: disable=pointless-statement
  except (TypeError, ValueError, NotImplementedError, AttributeError):
    data = builder.as_data_source(split)  # Decodes whole videos.
  features = builder.info.features
  return sources.Source(
      data=data, read=read_encoded, label=sources.label_of('label'),
      num_classes=features['label'].num_classes,
      frame_shape=tuple(features['video'].shape[1:]) if all(
          features['video'].shape[1:]) else None,
      class_names=features['label'].names, name=name)
