"""Config errors of the launchers: one line on stderr, exit code 2.

Every line reads ``config error: <key>: <what is wrong> (<what is allowed>)``
(``skipside.config.ConfigError`` writes the part after ``config error:``).
This module turns what absl and ``ml_collections`` raise while reading
``--config`` and its overrides (a misspelt key, a missing file, a value of
the wrong type) into that form; it imports no JAX, so it runs before any
backend starts.

Example::

    try:
      argv = flags.FLAGS(sys.argv)
    except Exception as e:
      exit_with(flag_error(e, sys.argv, default_config))
"""

import difflib
import importlib.util
import os
import re
import sys

import ml_collections

_TYPES = {bool: 'True or False', int: 'an integer', float: 'a number',
          str: 'a string', tuple: 'a tuple'}


def exit_with(line: str) -> None:
  """Prints ``config error: <line>`` on stderr and exits with code 2."""
  print(f'config error: {" ".join(line.split())}', file=sys.stderr,
        flush=True)  # One line, whatever the message held.
  sys.exit(2)


def exit_now(line: str, code: int) -> None:
  """Prints ``line`` on stderr and ends the process with ``code`` at once,
  without the interpreter's shutdown.

  For a failed checkpoint save, whose line must stay the last one written:
  the writes orbax abandoned (coroutines never awaited, which
  ``checkpoints`` cannot reach) report when the interpreter frees them at
  shutdown, after it. Call it only where nothing is left to close (the
  training run's ``ExitStack`` has closed the checkpointer and the logs).
  """
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access


def config_flag(argv: list[str], default: str) -> str:
  """The ``--config=`` value of ``argv`` (the last one wins) or ``default``."""
  given = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  return given[-1] if given else default


def load_config(flag: str) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of a ``file.py[:variant]`` flag value, as
  ``ml_collections.config_flags`` loads it (without overrides)."""
  path, _, variant = flag.partition(':')
  spec = importlib.util.spec_from_file_location('_launch_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*([variant] if variant else []))


def _keys(config: ml_collections.ConfigDict, prefix: str = 'config') -> dict:
  """Every key of ``config`` (sections too), dotted, with its value."""
  out = {}
  for k, v in config.items():
    out[f'{prefix}.{k}'] = v
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_keys(v, f'{prefix}.{k}'))
  return out


def nearest_key(key: str, known: list[str]) -> str:
  """The known key closest to ``key``, e.g. ``config.trian.num_steps`` ->
  ``config.train.num_steps`` (leaves are compared with leaves)."""
  leaves = [k for k in known if k.count('.') == key.count('.')] or known
  return difflib.get_close_matches(key, leaves, n=1, cutoff=0)[0]


def _overrides(argv: list[str]) -> dict[str, str]:
  """``{'config.a.b': 'value'}`` of the ``--config.a.b=value`` flags."""
  out = {}
  for a in argv:
    if a.startswith('--config.'):
      key, _, value = a[2:].partition('=')
      out[key] = value
  return out


def flag_error(e: Exception, argv: list[str], default_config: str) -> str:
  """What absl or ``ml_collections`` raised while parsing ``argv``, as
  ``<key>: <what is wrong> (<what is allowed>)``.

  ``default_config``: the ``--config`` file used when ``argv`` names none.
  """
  text = str(e).replace('\\n', '\n')
  unknown = re.search(r"Unknown command line flag '([^']+)'"
                      r'(?:\. Did you mean: (\S+) \?)?', text)
  if unknown:
    name, guess = unknown.groups()
    return (f'--{name}: unknown flag (' + (f'did you mean --{guess}?)' if guess
                                          else 'see --helpfull)'))
  flag = config_flag(argv, default_config)
  try:  # The file alone: its own error, if it has one.
    known = _keys(load_config(flag))
  except FileNotFoundError:
    return (f'--config: file {flag.partition(":")[0]!r} not found (a config '
            'file[:variant], e.g. experiments/configs/default.py:tiny)')
  except Exception as err:  # pylint: disable=broad-except  (the file's error)
    return (f'--config: {flag}: {type(err).__name__}: {err} (a Python file '
            'whose get_config(variant) returns a ConfigDict)')
  overrides = _overrides(argv)
  bad_key = next((k for k in overrides if k not in known), None)
  if bad_key:  # A misspelt key (ml_collections' AttributeError).
    return (f'{bad_key}: unknown key (did you mean '
            f'{nearest_key(bad_key, list(known))}?)')
  value = re.match(r'flag --(config\.[\w.]+)=', text)
  if value and value.group(1) in known:  # Did not parse as the key's type.
    key = value.group(1)
    kind = type(known[key])
    allowed = ('a section: set its keys, e.g. --' + next(
        k for k in known if k.startswith(key + '.'))
               if kind is ml_collections.ConfigDict else
               _TYPES.get(kind, kind.__name__))
    return f'{key}: cannot read {overrides[key]!r} ({allowed})'
  # Anything else (another flag's bad value): its own last line.
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  last = lines[-1] if lines else type(e).__name__
  name = re.match(r'flag (--[\w.]+)=\S*: (.*)', last)
  if name:
    return f'{name.group(1)}: {name.group(2)} (see --helpfull)'
  return f'--config: {last} (see --helpfull)'
