"""MovingDigits: synthetic videos made from scikit-learn's 8x8 digits.

No download: the 1797 digits of `sklearn.datasets.load_digits()` ship with
scikit-learn. Each digit is upscaled (bilinear) to `digit_size` and moved over a
`canvas_size` canvas that wraps around (a torus), so that in any single frame
every position is equally likely whatever the direction of motion.

Labels (one field each; the pipeline's `task` picks one):

| field       | task          | decidable from                                  |
| ----------- | ------------- | ----------------------------------------------- |
| `digit`     | `appearance`  | any single frame (the class of the digit)       |
| `direction` | `motion`      | two frames; a single frame carries no           |
|             |               | information (uniform position, class and        |
|             |               | instance, independent of the direction)         |
| `same`      | `long_range`  | only the first and the last segment together:   |
|             |               | 1 if the digit class shown at the start equals  |
|             |               | the one shown at the end (50/50); the segments  |
|             |               | between show random distractor digits           |
| `majority`  | `majority`    | the whole video: the class shown in the most    |
|             |               | segments (below); every segment is evidence     |
| (frames)    | `next_frame`  | the frames themselves (`transforms.next_frame_targets`) |

`long_range` fields exist only in configs with `long_range=True`, `majority`
fields (`majority`, `segment_digits`) only in configs with `majority_classes`.

The majority task (configs `majority`, 128 frames, and `majority_512`): the
video is a sequence of segments of 8 frames, each one digit of one of
``majority_classes`` (digits 0, 1, 2) moving in its own random direction;
the label is the class shown in the most segments, ahead of the second by
exactly ``majority_margin`` segments (4 of 16 at 128 frames, 16 of 64 at
512: 1/4 of the segments either way), so there are no ties. The segments' classes
are i.i.d. uniform conditioned on that margin (drawn exactly: a count vector
by its multinomial weight, then a random order), so every segment carries
the same, small, amount of evidence. Bayes accuracy of an observer who
recognises every digit (`majority_bayes_accuracy`, exact, from this
distribution; chance 1/3):

| segments seen  | 1 or 2 (an aligned 16-frame clip) | 3 | half | all |
| -------------- | ----- | ----- | ----- | ---- |
| `majority`     | 52.3% | 60.4% | 81.1% | 100% |
| `majority_512` | 51.1% | 58.0% | 98.7% | 100% |

A 16-frame clip at a uniformly random start sees 2 segments at the aligned
starts (15 of 113 at 128 frames, 63 of 497 at 512) and 3 otherwise: 59.3%
(`majority`) and 57.2% (`majority_512`). So one clip decides the label far
from reliably, and the whole video always. (A margin of 2 of 16 gives 45.1%
for an aligned clip, but the per-frame training signal is then so weak, a
cross-entropy floor 0.03 nats below chance's, that the CPU benchmark's
network learnt nothing in 600 clip steps; with 4, 1600 clip steps at
learning rate 3e-3 reach 96% on whole videos.)

Train and test use disjoint digit instances (every 5th sklearn digit is a test
instance), so test accuracy measures generalisation to unseen handwriting.

Stored without TensorFlow: `file_format='array_record'`, frames as
`tfds.features.Tensor(uint8, (T, H, W, 1), encoding=ZLIB)`.

Prepare (the pipeline also does this on first use; ~10 s for `default`):

    python -c "from skipside.data import moving_digits; \
      moving_digits.build('default', data_dir='~/tensorflow_datasets')"

Read:

    import tensorflow_datasets as tfds
    from skipside.data import moving_digits  # registers the builder
    source = tfds.data_source('moving_digits/default', split='train')
    source[0]['video'].shape  # (16, 32, 32, 1) uint8

Configs (`moving_digits/<name>`): `default` (16 frames, 32x32, 2000/500
videos), `small` (8 frames, 32x32, 256/128; tests), `long_range` (128 frames,
segments of 8, 1000/200), `long_range_512` (512 frames, 500/100), `majority`
(128 frames, 16 segments of 8, margin 4, 2000/1000), `majority_512` (512
frames, 64 segments, margin 16, 500/100). Any size is a
`MovingDigitsConfig(name=..., ...)` passed as `config=`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from skipside.data import sources

# Unit steps of the directions: 4 (right, left, down, up) or 8 (plus diagonals).
_DIRECTIONS = np.array(
    [(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)],
    np.int64)  # (dy, dx)
_SPLITS = {'train': 0, 'test': 1}


@dataclasses.dataclass
class MovingDigitsConfig(tfds.core.BuilderConfig):
  """Sizes and seed of a MovingDigits variant.

  Attributes:
    num_frames: T, frames per video.
    canvas_size: H = W of the canvas.
    digit_size: side of the upscaled digit (<= canvas_size).
    speed: pixels per frame.
    num_directions: 4 or 8 motion classes.
    num_train: videos in the `train` split.
    num_test: videos in the `test` split.
    seed: generation seed (same seed, same bytes).
    long_range: adds the `same`/`last_digit` fields (cue, distractors, query).
    segment_frames: frames per digit segment in long-range and majority
      videos.
    majority_classes: digit classes of a majority video (empty: not one);
      adds the `majority` (index into these) and `segment_digits` fields.
    majority_margin: segments by which the majority class leads the second.
  """
  num_frames: int = 16
  canvas_size: int = 32
  digit_size: int = 16
  speed: int = 2
  num_directions: int = 4
  num_train: int = 2000
  num_test: int = 500
  seed: int = 0
  long_range: bool = False
  segment_frames: int = 8
  majority_classes: tuple[int, ...] = ()
  majority_margin: int = 2


@functools.lru_cache(maxsize=8)
def _digits(digit_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns sklearn digits upscaled: images float32 (N, S, S) in [0, 1], (N,)."""
  # sklearn's datasets module takes about a second to import: only when
  # digits are rendered (building MovingDigits), not to read it.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32) / 16.0
  out = np.stack([
      np.asarray(Image.fromarray(im, mode='F').resize(
          (digit_size, digit_size), Image.BILINEAR)) for im in images])
  return np.clip(out, 0.0, 1.0), digits.target.astype(np.int64)


def _instances(digit_size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Digit instances of a split: every 5th sklearn digit is held out for test."""
  images, labels = _digits(digit_size)
  keep = (np.arange(len(labels)) % 5 == 0) == (split == 'test')
  return images[keep], labels[keep]


def _render(image: np.ndarray, canvas: int, ys: np.ndarray,
            xs: np.ndarray) -> np.ndarray:
  """Draws `image` (S, S) at top-left (ys[t], xs[t]) mod canvas: (T, C, C)."""
  s = image.shape[0]
  rows = (ys[:, None] + np.arange(s)[None]) % canvas  # (T, S)
  cols = (xs[:, None] + np.arange(s)[None]) % canvas
  frames = np.zeros((len(ys), canvas, canvas), np.float32)
  t = np.arange(len(ys))[:, None, None]
  frames[t, rows[:, :, None], cols[:, None, :]] = image[None]
  return frames


def _moving(rng: np.random.Generator, image: np.ndarray, cfg: MovingDigitsConfig,
            num_frames: int) -> tuple[np.ndarray, int]:
  """One digit moving at constant velocity; start uniform on the torus."""
  direction = int(rng.integers(cfg.num_directions))
  dy, dx = _DIRECTIONS[direction] * cfg.speed
  y0, x0 = rng.integers(cfg.canvas_size, size=2)
  t = np.arange(num_frames)
  return _render(image, cfg.canvas_size, y0 + dy * t, x0 + dx * t), direction


def _majority_geometry(cfg: MovingDigitsConfig) -> tuple[int, int, int]:
  """``(segments, classes, margin)`` of a majority config; errors if invalid."""
  seg, k, margin = (cfg.segment_frames, len(cfg.majority_classes),
                    cfg.majority_margin)
  if cfg.long_range:
    raise ValueError('majority_classes and long_range exclude each other.')
  if k < 2 or len(set(cfg.majority_classes)) != k or not all(
      0 <= c <= 9 for c in cfg.majority_classes):
    raise ValueError(f'majority_classes needs >= 2 distinct digits, got '
                     f'{cfg.majority_classes}.')
  if cfg.num_frames % seg:
    raise ValueError(f'majority needs num_frames divisible by segment_frames,'
                     f' got {cfg.num_frames} and {seg}.')
  num = cfg.num_frames // seg
  if not 1 <= margin <= num:
    raise ValueError(f'majority_margin must be in [1, {num}] (the number of '
                     f'segments), got {margin}.')
  return num, k, margin


@functools.lru_cache(maxsize=16)
def _majority_counts(geometry: tuple[int, int, int]
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Every count vector of a majority video and its probability.

  The segments' classes are i.i.d. uniform conditioned on the top count
  leading the second by exactly ``margin``: a count vector's probability is
  its multinomial coefficient, renormalised over the vectors that qualify.

  Returns:
    ``(counts int64 (V, K), probabilities float64 (V,))``, in a fixed order.
  """
  num, k, margin = geometry
  vectors, weights = [], []
  for head in itertools.product(range(num + 1), repeat=k - 1):
    if sum(head) > num:
      continue
    n = (*head, num - sum(head))
    top = sorted(n, reverse=True)
    if top[0] - top[1] != margin:
      continue
    w = math.factorial(num)
    for a in n:
      w //= math.factorial(a)
    vectors.append(n)
    weights.append(w)
  if not vectors:
    raise ValueError(f'no count vector of {num} segments over {k} classes has '
                     f'a margin of {margin}.')
  total = sum(weights)
  return (np.asarray(vectors, np.int64),
          np.asarray([w / total for w in weights], np.float64))


def majority_bayes_accuracy(cfg: MovingDigitsConfig, seen: int) -> float:
  """Bayes accuracy on a majority config from ``seen`` of its segments.

  The best possible accuracy of an observer who recognises the digit of
  each of ``seen`` segments (a random subset: the segments are in random
  order, so which ones does not matter) and knows the generator's
  distribution. Exact: sums over every count vector and every multiset seen.
  """
  num, k, _ = _majority_geometry(cfg)
  if not 0 <= seen <= num:
    raise ValueError(f'seen must be in [0, {num}], got {seen}.')
  counts, probs = _majority_counts(_majority_geometry(cfg))
  label = counts.argmax(1)
  acc = 0.0
  for head in itertools.product(range(seen + 1), repeat=k - 1):
    if sum(head) > seen:
      continue
    s = (*head, seen - sum(head))
    like = np.prod([[math.comb(int(n[a]), s[a]) for a in range(k)]
                    for n in counts], axis=1) / math.comb(num, seen)
    joint = np.bincount(label, weights=probs * like, minlength=k)
    acc += joint.max()
  return float(acc)


def generate_example(cfg: MovingDigitsConfig, split: str,
                     index: int) -> dict[str, Any]:
  """Generates video `index` of `split`, independent of any other example.

  Args:
    cfg: sizes and seed.
    split: 'train' or 'test'.
    index: example number; seeds the example's generator with (seed, split,
      index), so examples can be made in any order or in parallel.

  Returns:
    {'video': uint8 (T, H, W, 1), 'digit': class of the (first) digit,
     'direction': motion class of the (first) digit} and, with `long_range`,
    'last_digit' and 'same' = int(last_digit == digit); with
    `majority_classes`, 'majority' (index into `majority_classes` of the
    class shown in the most segments) and 'segment_digits' (int64 (T / 8,):
    each segment's digit class).
  """
  rng = np.random.default_rng([cfg.seed, _SPLITS[split], index])
  images, labels = _instances(cfg.digit_size, split)
  pick = lambda: int(rng.integers(len(labels)))
  if cfg.majority_classes:
    seg = cfg.segment_frames
    classes = np.asarray(cfg.majority_classes, np.int64)
    counts, probs = _majority_counts(_majority_geometry(cfg))
    n = counts[int(rng.choice(len(counts), p=probs))]
    order = rng.permutation(np.repeat(np.arange(len(classes)), n))
    digits = classes[order]
    by_class = lambda c: int(rng.choice(np.flatnonzero(labels == c)))
    parts = [_moving(rng, images[by_class(d)], cfg, seg) for d in digits]
    frames = np.concatenate([p[0] for p in parts])
    example = {'digit': int(digits[0]), 'direction': parts[0][1],
               'majority': int(np.argmax(n)), 'segment_digits': digits}
  elif not cfg.long_range:
    i = pick()
    frames, direction = _moving(rng, images[i], cfg, cfg.num_frames)
    example = {'digit': int(labels[i]), 'direction': direction}
  else:
    seg = cfg.segment_frames
    num_segments = -(-cfg.num_frames // seg)
    if cfg.num_frames < 2 * seg:
      raise ValueError(f'long_range needs num_frames >= 2 * segment_frames, '
                       f'got {cfg.num_frames} < 2 * {seg}.')
    # Cue and query classes: equal with probability 1/2; both uniform.
    first = int(rng.integers(10))
    same = int(rng.integers(2))
    last = first if same else int((first + rng.integers(1, 10)) % 10)
    by_class = lambda c: int(rng.choice(np.flatnonzero(labels == c)))
    ids = ([by_class(first)] + [pick() for _ in range(num_segments - 2)] +
           [by_class(last)])
    parts = [_moving(rng, images[i], cfg, seg) for i in ids]
    frames = np.concatenate([p[0] for p in parts])
    # Distractors fill the middle; the query segment ends exactly at frame T.
    frames = np.concatenate(
        [frames[:(num_segments - 1) * seg][:cfg.num_frames - seg],
         frames[-seg:]])
    example = {'digit': first, 'direction': parts[0][1], 'last_digit': last,
               'same': same}
  video = np.round(frames * 255.0).astype(np.uint8)[..., None]
  return {'video': video, **example}


class MovingDigits(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of MovingDigits; prepares and reads without TensorFlow."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      MovingDigitsConfig(name='default', description='16 frames, 32x32.'),
      MovingDigitsConfig(name='smooth', description='16 frames, 32x32, '
                         '1 pixel per frame: smoother video.', speed=1),
      MovingDigitsConfig(name='large', description='16 frames, 64x64: the '
                         'default scaled by 2 (digits of 32, 4 pixels per '
                         'frame).', canvas_size=64, digit_size=32, speed=4),
      MovingDigitsConfig(name='small', description='Tiny, for tests.',
                         num_frames=8, num_train=256, num_test=128),
      MovingDigitsConfig(name='long_range', description='128 frames.',
                         num_frames=128, num_train=1000, num_test=200,
                         long_range=True),
      MovingDigitsConfig(name='long_range_512', description='512 frames.',
                         num_frames=512, num_train=500, num_test=100,
                         long_range=True),
      MovingDigitsConfig(name='majority', description='128 frames: the '
                         'majority class of 16 segments of 8 (digits 0-2, '
                         'margin 4).', num_frames=128, num_train=2000,
                         num_test=1000, majority_classes=(0, 1, 2),
                         majority_margin=4),
      MovingDigitsConfig(name='majority_512', description='512 frames: the '
                         'majority class of 64 segments of 8 (digits 0-2, '
                         'margin 16).', num_frames=512, num_train=500,
                         num_test=100, majority_classes=(0, 1, 2),
                         majority_margin=16),
  ]
  DEFAULT_CONFIG_NAME = 'default'
  # Nothing to download; also skips tfds' checksum-file lookup, which needs
  # the `importlib_resources` backport for builders outside tfds.
  url_infos = None

  def __init__(self, **kwargs):
    # array_record is what `tfds.data_source` reads and needs no TensorFlow.
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    shape = (cfg.num_frames, cfg.canvas_size, cfg.canvas_size, 1)
    features = {
        'video': tfds.features.Tensor(
            shape=shape, dtype=np.uint8,
            encoding=tfds.features.Encoding.ZLIB),
        'digit': tfds.features.ClassLabel(num_classes=10),
        'direction': tfds.features.ClassLabel(num_classes=cfg.num_directions),
    }
    if cfg.long_range:
      features['last_digit'] = tfds.features.ClassLabel(num_classes=10)
      features['same'] = tfds.features.ClassLabel(num_classes=2)
    if cfg.majority_classes:
      num, _, _ = _majority_geometry(cfg)
      features['majority'] = tfds.features.ClassLabel(
          names=[str(c) for c in cfg.majority_classes])
      features['segment_digits'] = tfds.features.Tensor(
          shape=(num,), dtype=np.int64)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict(features),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.num_train),
            'test': self._generate_examples('test', cfg.num_test)}

  def _generate_examples(self, split: str, num: int) -> Iterator[Any]:
    for i in range(num):
      yield i, generate_example(self.builder_config, split, i)


def builder(config: str | MovingDigitsConfig = 'default',
            data_dir: str | None = None) -> MovingDigits:
  """Returns the builder of a named config or of a `MovingDigitsConfig`."""
  return MovingDigits(config=config, data_dir=data_dir)


def build(config: str | MovingDigitsConfig = 'default',
          data_dir: str | None = None) -> MovingDigits:
  """Generates the dataset if absent (idempotent) and returns its builder.

  Example:
    b = build(MovingDigitsConfig(name='tiny', num_train=32, num_test=8),
              data_dir='/tmp/tfds')
    b.as_data_source('train')[0]['video'].shape  # (16, 32, 32, 1)
  """
  b = builder(config, data_dir)
  if not b.is_prepared():
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            verify_ssl=False, try_download_gcs=False))
  return b


# The label each task trains on ('multi_label': every one of these, as one
# multi-hot vector over the digits then the directions).
TASK_LABELS = {'appearance': 'digit', 'motion': 'direction',
               'long_range': 'same', 'majority': 'majority',
               'next_frame': 'digit',
               'multi_label': ('digit', 'direction')}


def _multi_hot(record, keys, offsets, size) -> np.ndarray:
  """int32 ``(size,)``: a 1 at ``offsets[i] + record[keys[i]]`` for each key."""
  out = np.zeros(size, np.int32)
  for key, offset in zip(keys, offsets):
    out[offset + int(record[key])] = 1
  return out


def config_error(config) -> tuple[str, str, str] | None:
  """``sources.config_error`` for MovingDigits: the task and the config name."""
  configs = [c.name for c in MovingDigits.BUILDER_CONFIGS]
  if config.task not in TASK_LABELS:
    return ('config.data.task', f'unknown task {config.task!r}',
            'one of ' + ', '.join(map(repr, TASK_LABELS)))
  if config.dataset_config is not None and config.dataset_config not in (
      configs):
    return ('config.data.dataset_config',
            f'unknown MovingDigits config {config.dataset_config!r}',
            'one of ' + ', '.join(map(repr, configs)))
  return None


def make_source(config, split: str) -> sources.Source:
  """The ``sources.Source`` of ``split`` for ``config.data`` (dataset
  ``moving_digits``): built in ``config.data_dir`` if ``config.prepare``."""
  if config.task not in TASK_LABELS:
    raise ValueError(f'Unknown MovingDigits task {config.task!r}; one of '
                     f'{sorted(TASK_LABELS)}.')
  name = config.dataset_config or (
      config.task if config.task in ('long_range', 'majority') else 'default')
  make = build if config.prepare else builder
  try:
    b = make(name, data_dir=config.data_dir)
  except FileExistsError:  # Another process sharing data_dir built it first.
    b = builder(name, data_dir=config.data_dir)
  if not b.is_prepared():
    raise FileNotFoundError(
        f'MovingDigits/{name} is not prepared in {b.data_dir!r}; set '
        'config.prepare=True or build it with moving_digits.build().')
  features = b.info.features
  key = TASK_LABELS[config.task]
  if isinstance(key, tuple):  # Multi-label: multi-hot over every key.
    sizes = [features[k].num_classes for k in key]
    offsets = np.cumsum([0] + sizes[:-1]).tolist()
    label = functools.partial(_multi_hot, keys=key, offsets=offsets,
                              size=sum(sizes))
    names = [f'{k}={n}' for k in key for n in features[k].names]
    num_classes = sum(sizes)
  elif key not in features:
    raise ValueError(f'Task {config.task!r} needs a {config.task} config of '
                     f'MovingDigits, got {name!r}.')
  else:
    label, names = sources.label_of(key), features[key].names
    num_classes = features[key].num_classes
  return sources.Source(
      data=b.as_data_source(split), read=sources.read_array, label=label,
      num_classes=num_classes, frame_shape=tuple(features['video'].shape[1:]),
      class_names=names, name=f'moving_digits/{name}',
      key=f'{b.data_path}:{split}')
