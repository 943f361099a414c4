"""The quick-start notebook shows what its text claims.

Two checks:
- the saved notebook: every accuracy and time its text quotes appears in its
  saved outputs, and those outputs show the claim (so an edited text or a
  stale output is caught without running anything);
- a fresh headless run of every cell on CPU (nbclient, ~1.5 min on 2 cores):
  Skip-Sideways and backprop both learn the digit class, far above chance,
  Skip-Sideways not far behind backprop, every stage gets Sideways gradient,
  and the parameters reload.
"""

import os
import re

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'experiments', 'notebooks', 'quickstart.ipynb')

CHANCE = 0.1             # 10 digit classes
MIN_ACCURACY = 3 * CHANCE  # "far above chance", for both modes
MAX_GAP = 0.35           # Skip-Sideways at most 35 points behind backprop


def _outputs(nb) -> str:
  return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                 for o in c.get('outputs', []))


def _heldout(text: str) -> dict[str, float]:
  found = dict(re.findall(r'(\w+) held-out: accuracy ([\d.]+)%', text))
  assert set(found) == {'sideways', 'bp'}, text
  return {mode: float(v) / 100 for mode, v in found.items()}


def _check_claim(text: str):
  acc = _heldout(text)
  assert acc['sideways'] >= MIN_ACCURACY, acc
  assert acc['bp'] >= MIN_ACCURACY, acc
  assert acc['bp'] - acc['sideways'] <= MAX_GAP, acc
  ticks = re.search(r'sideways: ticks with gradient per stage \(([\d, ]+)\)',
                    text)
  assert ticks and min(map(int, ticks.group(1).split(','))) > 0, text
  assert 'reloaded' in text, text


def test_saved_notebook_quotes_its_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  text = _outputs(nb)
  assert all(c.get('execution_count') for c in nb.cells
             if c.cell_type == 'code'), 'save the notebook executed'
  _check_claim(text)
  markdown = ''.join(c.source for c in nb.cells if c.cell_type == 'markdown')
  quoted = re.findall(r'\d+\.\d%', markdown) + re.findall(r'\d+ s\b', markdown)
  assert len(quoted) >= 4, markdown  # Two accuracies, two training times.
  for number in quoted:
    assert number in text, f'{number} is quoted but not in the saved outputs'


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  monkeypatch.setenv('XLA_FLAGS', '')  # One device: as on a laptop.
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # Raises CellExecutionError naming the failing cell.
  _check_claim(_outputs(nb))
