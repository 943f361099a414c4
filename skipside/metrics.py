"""Metric writing (``metrics.jsonl`` and TensorBoard) and metric math."""

import json
import os

import numpy as np


class MetricWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard event files."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # Light: no TensorFlow needed.
    self._tb = SummaryWriter(workdir, flush_secs=10)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({'step': step, **clean}) + '\n')
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """Mean over classes (with positives) of sklearn's average precision."""
  from sklearn.metrics import average_precision_score
  keep = labels.sum(axis=0) > 0
  return float(average_precision_score(labels[:, keep], scores[:, keep],
                                       average='macro'))
