"""MovingDigits' majority task: labels, determinism, Bayes accuracies, names."""

import hashlib
import types

import numpy as np
import pytest

from skipside.data import moving_digits


def _named(name):
  return next(c for c in moving_digits.MovingDigits.BUILDER_CONFIGS
              if c.name == name)


def _tiny(**kw):
  return moving_digits.MovingDigitsConfig(
      **{'name': 'maj', 'num_frames': 48, 'segment_frames': 8,
         'majority_classes': (0, 1, 2), 'majority_margin': 2, **kw})


@pytest.mark.parametrize('name', ['majority', 'majority_512'])
def test_label_is_the_strict_majority_by_construction(name):
  cfg = _named(name)
  classes = np.asarray(cfg.majority_classes)
  num = cfg.num_frames // cfg.segment_frames
  labels = []
  for split in ('train', 'test'):
    for i in range(40 if name == 'majority' else 10):
      e = moving_digits.generate_example(cfg, split, i)
      assert e['video'].shape == (cfg.num_frames, 32, 32, 1)
      assert e['video'].dtype == np.uint8
      digits = e['segment_digits']
      assert digits.shape == (num,) and set(digits) <= set(classes)
      counts = np.array([(digits == c).sum() for c in classes])
      top, second = np.sort(counts)[::-1][:2]
      assert top - second == cfg.majority_margin  # Strict: no ties.
      assert e['majority'] == int(np.argmax(counts))
      assert e['digit'] == digits[0]
      labels.append(e['majority'])
      # Every segment shows a digit: nothing is blank.
      seg = e['video'].reshape(num, cfg.segment_frames, -1)
      assert (seg.max(-1) > 0).all()
  assert set(labels) == {0, 1, 2}


def test_labels_are_balanced_over_the_classes():
  cfg = _tiny()
  labels = [moving_digits.generate_example(cfg, 'train', i)['majority']
            for i in range(600)]
  assert np.all(np.abs(np.bincount(labels, minlength=3) / 600 - 1 / 3) < 0.07)


def test_examples_are_deterministic_per_split_and_index():
  cfg = _tiny()
  a = moving_digits.generate_example(cfg, 'train', 5)
  b = moving_digits.generate_example(cfg, 'train', 5)
  np.testing.assert_array_equal(a['video'], b['video'])
  np.testing.assert_array_equal(a['segment_digits'], b['segment_digits'])
  assert a['majority'] == b['majority']
  for other in (moving_digits.generate_example(cfg, 'test', 5),
                moving_digits.generate_example(cfg, 'train', 6)):
    assert not np.array_equal(a['video'], other['video'])


def test_existing_configs_are_unchanged():
  """The majority branch draws nothing for the other configs: their first
  examples hash as before the task was added."""
  expected = {'default': 'd688595bb1af24ae', 'small': 'df17730a2af8d48e',
              'long_range': '605497582a08bc1e'}
  for name, digest in expected.items():
    h = hashlib.sha256()
    for i in range(5):
      e = moving_digits.generate_example(_named(name), 'train', i)
      h.update(e['video'].tobytes())
      h.update(repr(sorted((k, v) for k, v in e.items()
                           if k != 'video')).encode())
    assert h.hexdigest()[:16] == digest, name


def test_bayes_accuracies_of_the_docstring():
  """A 16-frame clip (2 or 3 segments) decides the label far from reliably
  (chance 1/3); the whole video always."""
  bayes = moving_digits.majority_bayes_accuracy
  for name, want in [('majority', (52.3, 52.3, 60.4, 81.1, 100.0)),
                     ('majority_512', (51.1, 51.1, 58.0, 98.7, 100.0))]:
    cfg = _named(name)
    num = cfg.num_frames // cfg.segment_frames
    got = [round(100 * bayes(cfg, s), 1) for s in (1, 2, 3, num // 2, num)]
    assert tuple(got) == want, name


def test_bayes_accuracy_matches_the_generator():
  """The exact Bayes accuracy of 2 seen segments against the empirical one
  of the plug-in rule on generated labels (the first two segments: order is
  random), and seeing everything is always right."""
  cfg = _named('majority')
  examples = [moving_digits.generate_example(cfg, 'train', i)
              for i in range(1500)]
  digits = np.stack([e['segment_digits'] for e in examples])
  labels = np.array([e['majority'] for e in examples])
  # From 2 segments guessing the first one's class is a Bayes rule: equal
  # classes win, and two different ones are equally likely by symmetry.
  first = digits[:, 0]
  empirical = np.mean(first == labels)
  exact = moving_digits.majority_bayes_accuracy(cfg, 2)
  assert abs(empirical - exact) < 3 * np.sqrt(exact * (1 - exact) / 1500)
  counts = np.stack([(digits == c).sum(1) for c in range(3)], 1)
  np.testing.assert_array_equal(counts.argmax(1), labels)


@pytest.mark.parametrize('kw, match', [
    (dict(num_frames=44), 'divisible by segment_frames'),
    (dict(majority_margin=5), r'no count vector of 6 segments'),
    (dict(majority_margin=0), r'majority_margin must be in \[1, 6\]'),
    (dict(majority_classes=(1, 1)), '>= 2 distinct digits'),
    (dict(long_range=True), 'exclude each other'),
])
def test_invalid_majority_configs_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    moving_digits.generate_example(_tiny(**kw), 'train', 0)


def test_config_error_names_a_wrong_config():
  def err(**kw):
    return moving_digits.config_error(types.SimpleNamespace(
        **{'task': 'majority', 'dataset_config': None, **kw}))
  assert err() is None
  assert err(dataset_config='majority_512') is None
  key, problem, allowed = err(dataset_config='majority_1024')
  assert key == 'config.data.dataset_config'
  assert problem == "unknown MovingDigits config 'majority_1024'"
  assert "'majority', 'majority_512'" in allowed
  key, problem, allowed = err(task='majorty')
  assert (key, problem) == ('config.data.task', "unknown task 'majorty'")
  assert "'majority'" in allowed


def test_source_reads_the_majority_label(tmp_path):
  """Built with TFDS (a tiny config) and read through the builder: the
  stored label is the generator's, the class names are the digits."""
  cfg = _tiny(num_train=6, num_test=2)
  b = moving_digits.build(cfg, data_dir=str(tmp_path))
  features = b.info.features
  assert features['majority'].names == ['0', '1', '2']
  source = b.as_data_source('train')
  # TFDS stores the examples shuffled: match them by their frames.
  want = {}
  for i in range(cfg.num_train):
    e = moving_digits.generate_example(cfg, 'train', i)
    want[e['video'].tobytes()] = e
  assert len(source) == len(want)
  for i in range(len(source)):
    record = source[i]
    e = want.pop(np.asarray(record['video']).tobytes())
    assert int(record['majority']) == e['majority']
    np.testing.assert_array_equal(record['segment_digits'],
                                  e['segment_digits'])
  assert moving_digits.TASK_LABELS['majority'] == 'majority'


def test_the_majority_task_needs_a_majority_config(tmp_path):
  config = types.SimpleNamespace(task='majority', dataset_config='small',
                                 data_dir=str(tmp_path), prepare=True)
  with pytest.raises(ValueError, match="needs a majority config of "
                     "MovingDigits, got 'small'"):
    moving_digits.make_source(config, 'train')
