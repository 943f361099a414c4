"""The package's module graph: no import cycles, every module importable alone.

A cycle hidden behind a function-level import still ties two modules into
one job; the check below reads every ``import`` of ``skipside/``, at any
depth, so it sees those too.
"""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'skipside'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """The ``skipside`` modules that ``name`` imports, anywhere in its body
  (``from skipside import x`` names module ``skipside.x`` when it is one)."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        up = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(up + ([base] if base else []))
      for a in node.names:
        full = f'{base}.{a.name}'
        found.add(full if full in MODULES else base)
  # A module's own package is imported with it: not an edge of the graph.
  parents = {'.'.join(name.split('.')[:i]) for i in range(1, name.count('.') + 1)}
  return {m for m in found if m in MODULES and m != name} - parents


def _cycle(graph: dict) -> list[str] | None:
  """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None``."""
  state = {}  # Absent: unseen; 1: on the current path; 2: done.

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, path + [nxt])
        if found:
          return found
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [node])
      if found:
        return found
  return None


def test_cycle_finder_finds_a_planted_cycle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == [
      'a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_cycles_in_the_package():
  graph = {name: _imports(name, path) for name, path in MODULES.items()}
  assert 'skipside.engine' in graph['skipside.mesh']  # The reader works.
  cycle = _cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_every_module_imports_on_its_own():
  """Each module imported first, in a process where no other skipside
  module is loaded yet (one process, the package unloaded in between)."""
  script = (
      'import importlib, sys\n'
      f'for name in {sorted(MODULES)!r}:\n'
      "  for m in [m for m in sys.modules if m.split('.')[0] == 'skipside']:\n"
      '    del sys.modules[m]\n'
      '  importlib.import_module(name)\n')
  done = subprocess.run([sys.executable, '-c', script], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
