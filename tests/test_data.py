"""Tests of skipside.data: MovingDigits, the grain pipeline, video folders.

Everything is real: datasets are built into tmp dirs with TFDS (array_record,
no TensorFlow), videos are written and decoded with PyAV.
"""

import importlib.util
import json
import logging
import os
import sys

import numpy as np
import pytest
from sklearn import linear_model
from sklearn import pipeline as sk_pipeline
from sklearn import preprocessing

from skipside import data
from skipside.data import memory
from skipside.data import moving_digits
from skipside.data import multigrid_loader
from skipside.data import pipeline
from skipside.data import sources
from skipside.data import transforms
from skipside.data import video_folder


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  moving_digits.build('small', data_dir=path)
  return path


def _config(tfds_dir, **kw):
  c = data.get_config()
  c.data_dir = tfds_dir
  c.dataset_config = 'small'
  c.num_frames = 8
  c.batch_size = 8
  c.shard_index, c.shard_count = 0, 1
  c.prepare = False
  c.update(kw)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------- MovingDigits


def test_build_and_read_without_tensorflow(tfds_dir):
  assert importlib.util.find_spec('tensorflow') is None
  assert 'tensorflow' not in sys.modules
  files = os.listdir(os.path.join(tfds_dir, 'moving_digits', 'small', '1.0.0'))
  assert any('array_record' in f for f in files), files
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source('moving_digits/small', split='train',
                            data_dir=tfds_dir)
  assert len(source) == 256
  e = source[0]
  assert e['video'].shape == (8, 32, 32, 1) and e['video'].dtype == np.uint8
  assert 0 <= e['digit'] < 10 and 0 <= e['direction'] < 4
  assert 'tensorflow' not in sys.modules


def test_generation_is_deterministic_and_moves():
  cfg = moving_digits.MovingDigitsConfig(name='t', num_frames=6)
  a = moving_digits.generate_example(cfg, 'train', 3)
  b = moving_digits.generate_example(cfg, 'train', 3)
  np.testing.assert_array_equal(a['video'], b['video'])
  other = moving_digits.MovingDigitsConfig(name='t', num_frames=6, seed=1)
  assert not np.array_equal(
      a['video'], moving_digits.generate_example(other, 'train', 3)['video'])
  # Each frame is the previous one shifted (on the torus) by speed * direction.
  dy, dx = moving_digits._DIRECTIONS[a['direction']] * cfg.speed
  v = a['video'][..., 0]
  for t in range(5):
    np.testing.assert_array_equal(np.roll(v[t], (dy, dx), axis=(0, 1)),
                                  v[t + 1])


def test_long_range_label_needs_start_and_end():
  cfg = moving_digits.MovingDigitsConfig(
      name='lr', num_frames=40, segment_frames=8, long_range=True)
  examples = [moving_digits.generate_example(cfg, 'train', i)
              for i in range(200)]
  same = np.array([e['same'] for e in examples])
  assert 0.35 < same.mean() < 0.65  # Balanced.
  for e in examples:
    assert e['video'].shape == (40, 32, 32, 1)
    assert e['same'] == int(e['digit'] == e['last_digit'])
  # The last digit alone says nothing about `same`: uniform in both cases.
  last = np.array([e['last_digit'] for e in examples])
  first = np.array([e['digit'] for e in examples])
  assert np.mean(last[same == 0] == first[same == 0]) == 0


@pytest.mark.parametrize('how', ['registered', 'module_path'])
def test_a_dataset_of_ones_own_needs_no_edit(how):
  """config.dataset names a registered opener or package.module:function;
  the pipeline batches its clips like any built-in source's."""
  path = 'experiments.examples.custom_source:open_source'
  if how == 'registered':
    name = 'drifting_squares_for_test'
    if name not in sources.names():
      sources.register(name)(sources.opener(path))
  else:
    name = path
  it = data.make_iterator(_config(None, dataset=name, num_frames=8))
  batch = next(it)
  assert batch['video'].shape == (8, 8, 32, 32, 1)
  assert batch['video'].dtype == np.float32 and batch['video'].max() == 1.0
  assert set(np.unique(batch['label'])) <= {0, 1}
  assert it.info.num_classes == 2


def test_unknown_datasets_are_named():
  with pytest.raises(ValueError, match=r"unknown dataset 'nope' \(one of "):
    sources.make_source(_config(None, dataset='nope'), 'train')
  with pytest.raises(ValueError, match="'no_such_module:f' cannot be imported"):
    sources.make_source(_config(None, dataset='no_such_module:f'), 'train')
  with pytest.raises(ValueError, match='already registered'):
    sources.register('video_folder')(lambda config, split: None)


def test_multi_label_task_gives_digit_and_direction_as_multi_hot(tfds_dir):
  it = data.make_iterator(_config(tfds_dir, task='multi_label'))
  labels = next(it)['label']
  assert it.info.num_classes == 14 and labels.shape == (8, 14)
  assert set(np.unique(labels)) <= {0, 1}
  np.testing.assert_array_equal(labels[:, :10].sum(1), 1)  # One digit,
  np.testing.assert_array_equal(labels[:, 10:].sum(1), 1)  # one direction.
  # The same records, read for the single-label tasks: the same classes.
  digits = next(data.make_iterator(_config(tfds_dir, task='appearance')))
  moves = next(data.make_iterator(_config(tfds_dir, task='motion')))
  np.testing.assert_array_equal(labels[:, :10].argmax(1), digits['label'])
  np.testing.assert_array_equal(labels[:, 10:].argmax(1), moves['label'])


def test_pipeline_shapes_and_dtypes(tfds_dir):
  it = data.make_iterator(_config(tfds_dir))
  b = next(it)
  assert set(b) == {'video', 'label', 'mask'}
  assert b['video'].shape == (8, 8, 32, 32, 1)
  assert b['video'].dtype == np.float32
  assert 0.0 <= b['video'].min() and b['video'].max() <= 1.0
  assert b['video'].max() > 0.5
  assert b['label'].dtype == np.int32 and b['label'].shape == (8,)
  assert b['mask'].all()
  assert it.info.num_classes == 4 and it.info.steps_per_epoch == 32

  aug = data.make_iterator(_config(tfds_dir, task='appearance', resize=40,
                                   crop_size=24, flip=True, stride=2,
                                   num_frames=4, mean=0.5, std=0.25))
  b = next(aug)
  assert b['video'].shape == (8, 4, 24, 24, 1)
  assert b['video'].min() >= -2.0 and b['video'].max() <= 2.0
  assert aug.info.num_classes == 10


def test_next_frame_and_fragments(tfds_dir):
  b = next(data.make_iterator(_config(tfds_dir, task='next_frame',
                                      num_frames=7)))
  assert b['video'].shape == b['target'].shape == (8, 7, 32, 32, 1)
  np.testing.assert_array_equal(b['video'][:, 1:], b['target'][:, :-1])
  b = next(data.make_iterator(_config(tfds_dir, fragment_frames=4)))
  assert b['video'].shape == (8, 2, 4, 32, 32, 1)
  b = next(data.make_iterator(_config(tfds_dir, fragment_frames=3,
                                      fragment_overlap=1, num_frames=7)))
  assert b['video'].shape == (8, 3, 3, 32, 32, 1)
  np.testing.assert_array_equal(b['video'][:, 0, -1], b['video'][:, 1, 0])


def test_sampling_is_deterministic_given_seed(tfds_dir):
  c = _config(tfds_dir, resize=40, crop_size=28, flip=True, num_frames=4,
              stride=1, max_stride=2)
  a = _take(data.make_iterator(c), 3)
  _assert_batches_equal(a, _take(data.make_iterator(c), 3))
  c.seed = 1
  b = _take(data.make_iterator(c), 3)
  assert not np.array_equal(a[0]['video'], b[0]['video'])


def test_eval_is_one_padded_pass(tfds_dir):
  c = _config(tfds_dir, batch_size=48, crop_size=28)
  batches = list(data.make_eval_iterator(c))
  assert len(batches) == 3  # 128 test videos = 48 + 48 + 32 (+16 padding).
  assert [int(b['mask'].sum()) for b in batches] == [48, 48, 32]
  assert all(b['video'].shape == (48, 8, 28, 28, 1) for b in batches)
  assert not batches[-1]['video'][32:].any()
  again = list(data.make_eval_iterator(c))
  _assert_batches_equal(batches, again)


def _rows(batches, index, count):
  """Rows [index * b, (index + 1) * b) of every batch, b = B / count."""
  b = len(batches[0]['label']) // count
  return [{k: v[index * b:(index + 1) * b] for k, v in x.items()}
          for x in batches]


def test_shards_read_their_rows_of_one_global_batch(tfds_dir):
  """Process p of n reads rows [p * b, (p + 1) * b) of each batch one process
  reads, augmentation included and across epochs: n processes train on the
  batches of one (tests/test_multihost.py: in real processes)."""
  kw = dict(batch_size=24, num_frames=4, resize=40, crop_size=28, flip=True,
            max_stride=2)
  steps = 12  # 256 videos: 10 batches an epoch.
  full = _take(data.make_iterator(_config(tfds_dir, **kw)), steps)
  for index in range(3):
    it = data.make_iterator(_config(tfds_dir, shard_index=index,
                                    shard_count=3, **kw))
    assert it.info.rows == slice(8 * index, 8 * index + 8)
    assert it.info.steps_per_epoch == 10
    _assert_batches_equal(_take(it, steps), _rows(full, index, 3))


def test_eval_shards_read_their_rows_of_one_pass(tfds_dir):
  full = list(data.make_eval_iterator(_config(tfds_dir, batch_size=48)))
  for index in range(2):
    c = _config(tfds_dir, shard_index=index, shard_count=2, batch_size=48)
    got = list(data.make_eval_iterator(c))
    assert len(got) == 3 and got[0]['video'].shape[0] == 24  # Per-process B.
    _assert_batches_equal(got, _rows(full, index, 2))
  # 128 videos: the last batch's rows 32:48 are padding, all on process 1.
  assert [int(b['mask'].sum()) for b in _rows(full, 1, 2)] == [24, 24, 8]


def _frames_by_label(tfds_dir, split, task):
  """All frames of a split through the eval pipeline: (N, T, H, W), (N,)."""
  c = _config(tfds_dir, task=task, eval_split=split, batch_size=64)
  bs = list(data.make_eval_iterator(c))
  return (np.concatenate([b['video'][..., 0] for b in bs]),
          np.concatenate([b['label'] for b in bs]))


def _fft_features(x):
  """|DFT|: exactly invariant to shifts on the torus. (N, H, W) -> (N, H*W)."""
  return np.log1p(np.abs(np.fft.rfft2(x))).reshape(len(x), -1)


def _correlation_features(a, b, radius=3):
  """sum(b * roll(a, d)) for shifts |d| <= radius: (N, (2r+1)^2)."""
  shifts = range(-radius, radius + 1)
  f = [np.sum(b * np.roll(a, (dy, dx), axis=(1, 2)), axis=(1, 2))
       for dy in shifts for dx in shifts]
  f = np.stack(f, axis=1)
  return f / np.linalg.norm(f, axis=1, keepdims=True)


def _accuracy(x_train, y_train, x_test, y_test):
  # A linear classifier, closed form (fast); standardised features.
  clf = sk_pipeline.make_pipeline(preprocessing.StandardScaler(),
                                  linear_model.RidgeClassifier(alpha=10.0))
  clf.fit(x_train, y_train)
  return clf.score(x_test, y_test)


def test_motion_is_not_decidable_from_one_frame(tfds_dir):
  v_train, y_train = _frames_by_label(tfds_dir, 'train', 'motion')
  v_test, y_test = _frames_by_label(tfds_dir, 'test', 'motion')
  t = v_train.shape[1]
  singles = lambda v: v.reshape(-1, *v.shape[2:])  # Every frame a sample.
  rep = lambda y: np.repeat(y, t)
  chance_bound = 0.25 + 0.1  # > 3 std of chance accuracy on 128 videos.
  # Single frames, raw pixels and shift-invariant |DFT|: chance.
  acc_pixels = _accuracy(singles(v_train).reshape(len(v_train) * t, -1),
                         rep(y_train),
                         singles(v_test).reshape(len(v_test) * t, -1),
                         rep(y_test))
  acc_fft = _accuracy(_fft_features(singles(v_train)), rep(y_train),
                      _fft_features(singles(v_test)), rep(y_test))
  # Same family, one frame vs two: auto- vs cross-correlation at small shifts.
  acc_auto = _accuracy(_correlation_features(v_train[:, 0], v_train[:, 0]),
                       y_train,
                       _correlation_features(v_test[:, 0], v_test[:, 0]),
                       y_test)
  acc_two = _accuracy(_correlation_features(v_train[:, 0], v_train[:, 1]),
                      y_train,
                      _correlation_features(v_test[:, 0], v_test[:, 1]),
                      y_test)
  assert acc_pixels < chance_bound, acc_pixels
  assert acc_fft < chance_bound, acc_fft
  assert acc_auto < chance_bound, acc_auto
  assert acc_two > 0.95, acc_two
  # The single-frame |DFT| classifier is not simply weak: it reads digits.
  d_train, c_train = _frames_by_label(tfds_dir, 'train', 'appearance')
  d_test, c_test = _frames_by_label(tfds_dir, 'test', 'appearance')
  acc_digit = _accuracy(_fft_features(d_train[:, 0]), c_train,
                        _fft_features(d_test[:, 0]), c_test)
  assert acc_digit > 0.5, acc_digit


# ------------------------------------------------------- checkpoint / restore


@pytest.mark.parametrize('skip', [3, 35])  # Mid-epoch; in the second epoch.
def test_iterator_restore_is_exact(tfds_dir, skip):
  c = _config(tfds_dir, resize=36, crop_size=32, flip=True, max_stride=2,
              num_frames=3)
  it = data.make_iterator(c)
  _take(it, skip)
  state = json.loads(json.dumps(it.get_state()))  # Survives serialisation.
  expected = _take(it, 4)
  restored = data.make_iterator(c)
  restored.set_state(state)
  _assert_batches_equal(expected, _take(restored, 4))


# --------------------------------------------------------------- video folders


def _moving_bar(num_frames, direction, size=(36, 44)):
  """uint8 (T, H, W, 3): a bright bar moving right (+1) or left (-1)."""
  h, w = size
  v = np.zeros((num_frames, h, w, 3), np.uint8)
  for t in range(num_frames):
    x = (8 + direction * 2 * t) % (w - 6)
    v[t, :, x:x + 6] = (255, 128, 0)
  return v


@pytest.fixture(scope='module')
def video_dir(tmp_path_factory):
  """2 classes x 3 good videos, 1 too short (4 frames), 2 broken files."""
  root = tmp_path_factory.mktemp('videos')
  for label, (name, direction) in enumerate([('left', -1), ('right', 1)]):
    os.makedirs(root / name)
    for i, (codec, ext) in enumerate([('mpeg4', 'avi'), ('libx264', 'mp4'),
                                      ('mpeg4', 'mp4')]):
      video_folder.write_video(str(root / name / f'v{i}.{ext}'),
                               _moving_bar(12, direction), codec=codec)
  video_folder.write_video(str(root / 'left' / 'short.mp4'),
                           _moving_bar(4, -1), codec='mpeg4')
  (root / 'right' / 'garbage.mp4').write_bytes(
      np.random.default_rng(0).bytes(3000))
  good = (root / 'right' / 'v1.mp4').read_bytes()
  (root / 'right' / 'truncated.mp4').write_bytes(good[:len(good) // 3])
  (root / 'right' / 'notes.txt').write_text('not a video')
  return str(root)


@pytest.fixture
def fresh_warnings(monkeypatch):
  """Bad files are warned about once per process: forget earlier tests'."""
  monkeypatch.setattr(pipeline, '_warned', set())


def _noisy_bar(num_frames, size=64):
  """uint8 (T, size, size, 3): the bar under noise, so that every frame takes a
  few kB and cutting a file's bytes in half cuts its frames, not its header."""
  noise = np.random.default_rng(0).integers(0, 256, (num_frames, size, size, 3))
  bar = _moving_bar(num_frames, 1, size=(size, size)).astype(int)
  return np.clip(bar + noise, 0, 255).astype(np.uint8)


def _cut_in_half(src, dst):
  data = src.read_bytes()
  dst.write_bytes(data[:len(data) // 2])


def _warnings_naming(caplog, name):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and name in r.getMessage()]


def _folder_config(root, **kw):
  c = data.get_config()
  c.update(dataset='video_folder', data_dir=root, task='appearance',
           num_frames=8, crop_size=24, resize=28, batch_size=1, shuffle=False,
           num_epochs=1, shard_index=0, shard_count=1)
  c.update(kw)
  return c


def test_list_videos_and_startup_errors(video_dir, tmp_path):
  paths, labels, classes = video_folder.list_videos(video_dir)
  assert classes == ['left', 'right']
  assert len(paths) == 9 and labels.count(0) == 4
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='nope'):
    data.make_iterator(_folder_config(missing))
  os.makedirs(tmp_path / 'splits' / 'train' / 'a')
  with pytest.raises(FileNotFoundError, match='val'):
    video_folder.list_videos(str(tmp_path / 'splits'), split='val')
  os.makedirs(tmp_path / 'empty' / 'some_class')
  with pytest.raises(ValueError, match='empty'):
    data.make_iterator(_folder_config(str(tmp_path / 'empty')))


def test_decode_real_video(video_dir):
  path = os.path.join(video_dir, 'right', 'v1.mp4')
  clip = video_folder.read_video(path, lambda n: np.arange(0, n, 2))
  assert clip.shape == (6, 36, 44, 3) and clip.dtype == np.uint8
  # Lossy codec, but the bar is where it was drawn.
  expected = _moving_bar(12, 1)[::2]
  assert np.abs(clip.astype(int) - expected).mean() < 12
  with pytest.raises(video_folder.DecodeError):
    video_folder.read_video(os.path.join(video_dir, 'right', 'garbage.mp4'),
                            lambda n: np.arange(n))


def test_broken_videos_are_skipped_and_counted(video_dir, caplog,
                                               fresh_warnings):
  it = data.make_iterator(_folder_config(video_dir, short_video='loop'))
  with caplog.at_level(logging.WARNING):
    batches = list(it)
  # 9 files: 7 readable (one short, looped), garbage and truncated skipped.
  assert len(batches) == 7
  assert it.stats.failed == 2 and it.stats.too_short == 1
  assert it.stats.metrics() == {'data/failed_videos': 2,
                                'data/failed_reads': 2,
                                'data/truncated_videos': 0,
                                'data/too_short_videos': 1}
  assert 'garbage.mp4' in caplog.text and 'truncated.mp4' in caplog.text
  b = batches[0]
  assert b['video'].shape == (1, 8, 24, 24, 3)
  assert b['video'].dtype == np.float32
  assert sorted(int(b['label'][0]) for b in batches) == [0] * 4 + [1] * 3
  # Eval keeps every slot: broken videos are masked out, still counted.
  ev = data.make_eval_iterator(_folder_config(video_dir, batch_size=4))
  bs = list(ev)
  assert len(bs) == 3 and sum(int(b['mask'].sum()) for b in bs) == 7
  assert ev.stats.failed == 2


@pytest.mark.parametrize('policy,count', [('loop', 7), ('pad', 7), ('skip', 6)])
def test_short_video_policy(video_dir, policy, count):
  it = data.make_iterator(_folder_config(video_dir, short_video=policy))
  assert len(list(it)) == count
  assert it.stats.too_short == 1 and it.stats.failed == 2


def test_frame_indices_policies():
  kw = dict(num_frames=4, stride=2, random_start=False)
  np.testing.assert_array_equal(data.frame_indices(9, None, **kw),
                                [1, 3, 5, 7])  # Centred.
  np.testing.assert_array_equal(
      data.frame_indices(5, None, short_video='loop', **kw), [0, 2, 4, 1])
  np.testing.assert_array_equal(
      data.frame_indices(5, None, short_video='pad', **kw), [0, 2, 4, 4])
  assert data.frame_indices(5, None, short_video='skip', **kw) is None
  rng = np.random.default_rng(0)
  starts = {int(data.frame_indices(20, rng, num_frames=4, stride=2)[0])
            for _ in range(200)}
  assert starts == set(range(14))
  with pytest.raises(ValueError, match='short_video'):
    data.frame_indices(3, None, short_video='drop', **kw)


def test_folder_iterator_restore_keeps_counts(video_dir):
  c = _folder_config(video_dir, shuffle=True, num_epochs=None, batch_size=2)
  it = data.make_iterator(c)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)
  stats = it.stats
  restored = data.make_iterator(c)
  restored.set_state(state)
  _assert_batches_equal(expected, _take(restored, 3))
  assert restored.stats == stats and stats.failed > 0


def test_worker_processes_restore_exactly(tfds_dir):
  # Workers interleave batches (worker w reads shard w), so the order is not
  # the in-process one; it is deterministic and restorable all the same.
  c = _config(tfds_dir, crop_size=28, flip=True, num_workers=2)
  it = data.make_iterator(c)
  try:
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 3)
  finally:
    it.close()
  restored = data.make_iterator(c)
  try:
    restored.set_state(state)
    _assert_batches_equal(expected, _take(restored, 3))
  finally:
    restored.close()


# ------------------------------------------------ bad files: once per file


def _bad_folder(root):
  """a/{garbage.mp4, v.avi}, b/{cut.mp4, v.avi}: 2 good files, 2 unreadable
  (random bytes; a real MP4 cut in half, which loses its index)."""
  for name in ('a', 'b'):
    os.makedirs(root / name)
    video_folder.write_video(str(root / name / 'v.avi'), _moving_bar(12, 1),
                             codec='mpeg4')
  garbage = root / 'a' / 'garbage.mp4'
  garbage.write_bytes(np.random.default_rng(0).bytes(3000))
  full = root / 'full.mp4'  # Outside the class folders.
  video_folder.write_video(str(full), _noisy_bar(24), codec='libx264')
  cut = root / 'b' / 'cut.mp4'
  _cut_in_half(full, cut)
  return str(garbage), str(cut)


def test_bad_files_count_once_however_often_drawn(tmp_path, caplog,
                                                  fresh_warnings):
  bad = _bad_folder(tmp_path)  # Each sorts before a good file: reads ride.
  it = data.make_iterator(_folder_config(str(tmp_path), num_epochs=9))
  with caplog.at_level(logging.WARNING):
    batches = list(it)
    ev = data.make_eval_iterator(_folder_config(str(tmp_path), batch_size=4))
    assert sum(int(b['mask'].sum()) for b in ev) == 2
  assert len(batches) == 18  # 9 epochs x 2 good files; 18 bad reads.
  assert it.stats.failed == 2 and it.stats.failed_reads == 18
  assert it.stats.failed_files == list(bad)
  metrics = it.stats.metrics()
  assert metrics['data/failed_videos'] == 2
  assert metrics['data/failed_reads'] == 18
  assert ev.stats.failed == 2 and ev.stats.failed_reads == 2
  # One warning per file (train and eval together), naming file and cause.
  for path in bad:
    with pytest.raises(video_folder.DecodeError) as e:
      video_folder.read_video(path, np.arange)
    (message,) = _warnings_naming(caplog, path)
    assert 'unreadable' in message and e.value.cause in message


def test_bad_file_counts_survive_worker_processes(tmp_path):
  # Workers read and log on their own (a file is warned once per worker);
  # the names ride with the batches, so this process counts each file once.
  bad = _bad_folder(tmp_path)
  c = _folder_config(str(tmp_path), shuffle=True, num_epochs=None,
                     num_workers=2)
  it = data.make_iterator(c)
  try:
    _take(it, 12)
  finally:
    it.close()
  assert it.stats.failed == 2 and sorted(it.stats.failed_files) == sorted(bad)
  assert it.stats.failed_reads >= 6


def test_truncated_file_is_counted_once_and_skipped(tmp_path, caplog,
                                                    fresh_warnings):
  for name in ('a', 'b'):
    os.makedirs(tmp_path / name)
    video_folder.write_video(str(tmp_path / name / 'v.avi'),
                             _moving_bar(12, 1), codec='mpeg4')
  full = tmp_path / 'full.avi'
  video_folder.write_video(str(full), _noisy_bar(24), codec='mpeg4')
  cut = tmp_path / 'b' / 'cut.avi'  # AVI keeps its header: opens, 24 stated.
  _cut_in_half(full, cut)
  it = data.make_iterator(_folder_config(str(tmp_path), num_epochs=5))
  with caplog.at_level(logging.WARNING):
    batches = list(it)
    ev = data.make_eval_iterator(_folder_config(str(tmp_path), batch_size=3))
    (b,) = list(ev)
  # 8-frame clips always reach the cut: every read of it is skipped.
  assert len(batches) == 10
  d = video_folder.decode_video(str(cut), np.arange)
  assert d.truncated and d.expected == 24 and 0 < d.decoded < 8
  assert it.stats.truncated == 1 and it.stats.truncated_files == [str(cut)]
  assert it.stats.failed == 0
  assert it.stats.metrics()['data/truncated_videos'] == 1
  assert b['mask'].tolist() == [True, False, True]  # a/v, b/cut, b/v.
  assert ev.stats.truncated == 1
  (message,) = _warnings_naming(caplog, str(cut))
  assert 'Truncated' in message and f'of the {d.expected}' in message


@pytest.mark.parametrize('ext', ['avi', 'mkv'])
def test_decoder_tells_truncated_files(tmp_path, ext):
  # AVI states its frame count; MKV only its duration (24 frames at 25 fps).
  full, cut = tmp_path / f'full.{ext}', tmp_path / f'cut.{ext}'
  video_folder.write_video(str(full), _noisy_bar(24), codec='mpeg4')
  _cut_in_half(full, cut)
  whole = video_folder.decode_video(str(full), np.arange)
  assert whole.expected == 24 and len(whole.frames) == 24
  assert not whole.truncated
  # A read that stops at its clip's last frame does not know the file's end;
  # without a stated count every read decodes to the end.
  first = video_folder.decode_video(str(full), lambda n: np.arange(4))
  assert len(first.frames) == 4 and not first.truncated
  assert first.decoded == (None if ext == 'avi' else 24)
  d = video_folder.decode_video(str(cut), np.arange)
  assert d.truncated and d.expected == 24
  assert 0 < d.decoded < 12 and len(d.frames) == d.decoded
  np.testing.assert_array_equal(d.frames[0], whole.frames[0])  # Intact.
  if ext == 'avi':
    # Why a read reaching the cut is skipped: the decoder conceals the
    # partial last frame without an error.
    assert np.abs(d.frames[-1].astype(int)
                  - whole.frames[d.decoded - 1]).mean() > 10


# ------------------------------------------------------------ split in memory

# Jittered scale (down and up), random crop, flip, random stride.
_AUGMENTED = dict(scale_jitter=(24, 40), crop_size=28, flip=True, num_frames=4,
                  max_stride=2)


@pytest.mark.parametrize('kw', [
    {}, _AUGMENTED,
    dict(task='next_frame', num_frames=5, resize=36, crop_size=30, mean=0.5,
         std=0.25, fragment_frames=3, fragment_overlap=1),
    dict(num_frames=6, stride=2, short_video='loop', flip=True),  # 8 frames.
])
def test_split_in_memory_gives_the_per_clip_batches(tfds_dir, kw):
  """MovingDigits decoded once, batches cut at once: the batches, decode
  counts and iterator states of clips read one by one, across epochs."""
  files = data.make_iterator(_config(tfds_dir, in_memory_gb=0, **kw))
  memory = data.make_iterator(_config(tfds_dir, **kw))
  assert isinstance(memory._it, pipeline._ElementStateIterator)  # pylint: disable=protected-access
  _assert_batches_equal(_take(memory, 34), _take(files, 34))  # 32 an epoch.
  assert memory.get_state() == files.get_state()
  assert memory.stats.too_short == files.stats.too_short


def test_eval_and_shards_in_memory_give_the_per_clip_batches(tfds_dir):
  kw = dict(batch_size=48, resize=36, crop_size=28)
  _assert_batches_equal(
      list(data.make_eval_iterator(_config(tfds_dir, **kw))),
      list(data.make_eval_iterator(_config(tfds_dir, in_memory_gb=0, **kw))))
  kw = dict(batch_size=24, shard_index=1, shard_count=3, **_AUGMENTED)
  _assert_batches_equal(
      _take(data.make_iterator(_config(tfds_dir, **kw)), 12),
      _take(data.make_iterator(_config(tfds_dir, in_memory_gb=0, **kw)), 12))


def test_a_state_resumes_on_either_path(tfds_dir):
  """A checkpoint of the per-clip pipeline resumes in memory and back."""
  for first, then in ((0, 4.0), (4.0, 0)):
    it = data.make_iterator(_config(tfds_dir, in_memory_gb=first,
                                    **_AUGMENTED))
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    other = data.make_iterator(_config(tfds_dir, in_memory_gb=then,
                                       **_AUGMENTED))
    other.set_state(state)
    _assert_batches_equal(_take(other, 3), _take(it, 3))


def _with(config, **kw):
  c = config.copy_and_resolve_references()
  c.update(kw)
  return c


class _CountingRecords:
  """Records that count their reads."""

  def __init__(self, records):
    self.records, self.reads = records, 0

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.reads += 1
    return self.records[i]


def test_a_split_in_memory_is_read_once_per_process(monkeypatch):
  monkeypatch.setattr(memory, '_decoded', {})
  rng = np.random.default_rng(0)
  records = _CountingRecords([
      {'video': rng.integers(0, 256, (6, 20, 24, 3), np.uint8), 'label': i % 2}
      for i in range(12)])
  source = sources.Source(data=records, read=sources.read_array,
                          label=sources.label_of('label'), num_classes=2,
                          frame_shape=(20, 24, 3), key='counting:train')
  c = data.get_config()
  c.update(batch_size=4, num_frames=4, crop_size=16, flip=True,
           shard_index=0, shard_count=1)
  for _ in range(2):  # Two pipelines, two epochs each.
    it = data.make_iterator(c, source=source)
    b = _take(it, 6)[-1]
    assert b['video'].shape == (4, 4, 16, 16, 3)
  assert records.reads == 12  # Every record once; clips read none.
  # Too big for the budget: read clip by clip, the same batches.
  monkeypatch.setattr(memory, '_decoded', {})
  small = data.make_iterator(_with(c, in_memory_gb=1e-6), source=source)
  _assert_batches_equal(_take(small, 6), _take(data.make_iterator(
      c, source=source), 6))
  assert records.reads > 24 + 12


@pytest.mark.parametrize('channels', [1, 3])
def test_batched_resize_is_pils_frame_by_frame(channels):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  frames = np.random.default_rng(0).integers(0, 256, (5, 30, 44, channels),
                                             np.uint8)
  for size in (12, 30, 41, 96):
    got = transforms.resize_short_side(frames, size)
    h, w = transforms.resized_hw(30, 44, size)
    want = [np.asarray(Image.fromarray(f[..., 0] if channels == 1 else f)
                       .resize((w, h), Image.BILINEAR)) for f in frames]
    np.testing.assert_array_equal(got, np.reshape(want, got.shape))


def test_multigrid_loader_in_memory_gives_the_per_clip_batches(tfds_dir):
  from skipside import multigrid  # pylint: disable=g-import-not-at-top
  sched = multigrid.make_schedule(
      num_frames=8, crop_size=28, batch_size=8, num_examples=256,
      lr_steps=(0, 2), max_epoch=4, scale_jitter=(28, 36))
  c = _config(tfds_dir, crop_size=28, scale_jitter=(28, 36), flip=True)
  memory = multigrid_loader.MultigridIterator(c, sched)
  files = multigrid_loader.MultigridIterator(_with(c, in_memory_gb=0), sched)
  try:
    assert memory._store is not None and files._store is None  # pylint: disable=protected-access
    got, want = _take(memory, 10), _take(files, 10)
    assert len({b['video'].shape for b in got}) > 2  # Several shapes.
    _assert_batches_equal(got, want)
  finally:
    memory.close()
    files.close()
