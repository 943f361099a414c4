"""Metric writing (``metrics.jsonl`` and TensorBoard) and metric math."""

import json
import os

import numpy as np
import sklearn.metrics
import tensorboardX  # Light: no TensorFlow needed.


class MetricWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard event files, both
  opened at the first write (a run that writes nothing adds no file)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = self._jsonl = None

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    if self._tb is None:
      self._tb = tensorboardX.SummaryWriter(self.workdir, flush_secs=10)
      self._jsonl = open(os.path.join(self.workdir, 'metrics.jsonl'), 'a')
    clean = {k: float(v) for k, v in scalars.items()}
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({'step': step, **clean}) + '\n')
    self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._jsonl.close()
      self._tb = self._jsonl = None


def last_metrics(workdir: str) -> dict:
  """The latest value of every metric in ``workdir/metrics.jsonl`` (a
  finished run's final train and eval metrics); ``{}`` without the file."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  latest = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      record.pop('step', None)
      latest.update(record)
  return latest


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """Mean over classes (with positives) of sklearn's average precision."""
  keep = labels.sum(axis=0) > 0
  return float(sklearn.metrics.average_precision_score(
      labels[:, keep], scores[:, keep], average='macro'))
