"""A dataset of your own, opened by name from a config (no skipside edit).

  python -m launch.train --config=experiments/configs/default.py:tiny \
      --config.data.dataset=experiments.examples.custom_source:open_source \
      --workdir=/tmp/custom_source

``config.data.dataset`` names ``package.module:function`` (or a name given
with ``skipside.data.register_source``); the function gets the data config
and the split and returns a ``sources.Source``: records, a reader that cuts
a clip, a label. Here: 32 x 32 videos of a bright square drifting left or
right, made in memory (label: the direction; motion decides it).
"""

import numpy as np

from skipside.data import sources


def _video(rng: np.random.Generator, direction: int, frames: int = 24,
           size: int = 32) -> np.ndarray:
  """uint8 ``(frames, size, size, 1)``: a 6-pixel square moving 1 px/frame."""
  video = np.zeros((frames, size, size, 1), np.uint8)
  y, x0 = rng.integers(0, size - 6, 2)
  for t in range(frames):
    x = (x0 + (t if direction else -t)) % (size - 6)
    video[t, y:y + 6, x:x + 6] = 255
  return video


def open_source(config, split: str) -> sources.Source:
  """``sources.Source`` of ``split``: 64 training videos, 16 for testing."""
  rng = np.random.default_rng(0 if split == 'train' else 1)
  count = 64 if split == 'train' else 16
  labels = rng.integers(0, 2, count)
  records = [{'video': _video(rng, int(y)), 'label': int(y)} for y in labels]
  del config  # Nothing to configure in this example.
  return sources.Source(data=records, read=sources.read_array,
                        label=sources.label_of('label'), num_classes=2,
                        frame_shape=(32, 32, 1), class_names=('left', 'right'),
                        name=f'drifting_squares/{split}')
