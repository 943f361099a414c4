"""experiments/benchmarks/pgt.py --quick: runs, and writes every key."""

import json

import pytest

from experiments.benchmarks import pgt


def test_quick_run_writes_every_key(tmp_path):
  out = tmp_path / 'pgt.json'
  pgt.main(['--quick', '--out', str(out)])
  result = json.loads(out.read_text())
  headline = result['headline']
  for key in ('pgt_memory_512_over_64', 'whole_bp_512_over_pgt_512_temp',
              'pgt_accuracy', 'clip_accuracy', 'whole_accuracy',
              'pgt_frame_passes', 'clip_frame_passes', 'whole_frame_passes',
              'chance', 'one_standard_error_points'):
    assert key in headline, key
  assert headline['chance'] == pytest.approx(1 / 3, abs=1e-3)
  # Equal compute: the same frame-passes, clip with 2x the steps here
  # (32-frame videos, 16-frame clips).
  rows = {r['method']: r for r in result['rows']}
  assert rows.keys() == {'pgt', 'clip', 'whole'}
  passes = {headline[f'{m}_frame_passes'] for m in rows}
  assert passes == {4 * 4 * 32}
  assert rows['clip']['steps'] == 2 * rows['pgt']['steps']
  for r in rows.values():
    for p in pgt.PROTOCOLS:
      assert 0.0 <= r[f'accuracy_{p}'] <= 1.0
    assert headline[f'{r["method"]}_accuracy'] == r['accuracy_full']
  # PGT's memory does not grow with the video; whole-video backprop's does.
  assert headline['pgt_memory_512_over_64'] < 1.01
  assert headline['whole_bp_512_over_pgt_512_temp'] > 10
  assert result['config']['quick'] is True
