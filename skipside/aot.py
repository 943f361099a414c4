"""Ahead-of-time compilation: tables of executables by shape, and a clock.

A run that changes batch shapes (multigrid's buckets) compiles every shape
before training into a ``BucketTable`` (``compile_buckets``: lowering in
order, XLA compilations in parallel threads; JAX's persistent cache with
``enable_compile_cache``); a shape outside the table is an error
(``ShapeNotCompiledError``), never a silent recompile. ``CompileClock``
measures what compilation costs a run and counts recompilations, from JAX's
monitoring events. The training loop, the norm-statistics pass and the
benchmarks use them; nothing here knows about networks or schedules.

Example::

    table = aot.compile_buckets(
        lambda shape: step.lower(params, jax.ShapeDtypeStruct(shape, f32)),
        [(8, 16, 32, 32, 3), (32, 8, 16, 16, 3)],
        key_fn=lambda params, clip: clip.shape, name='train step')
    with aot.CompileClock() as clock:
      table(params, clip)          # runs the executable of clip.shape
    assert clock.compilations == 0
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from typing import Any, Callable, Hashable

import jax

PyTree = Any


class ShapeNotCompiledError(ValueError):
  """A batch shape outside the table of compiled shapes."""


class BucketTable:
  """Compiled executables by key (the batch shape); unknown keys fail.

  Calls ``table(*args)`` dispatch on ``key_fn(*args)`` to the executable
  compiled for that key: no tracing, no compilation, no silent fallback.

  Attributes:
    executables: key -> ``jax.stages.Compiled``.
    compile_seconds: key -> seconds its lowering and compilation took.
    wall_seconds: wall time of compiling the whole table.
  """

  def __init__(self, executables: dict, key_fn: Callable[..., Hashable], *,
               name: str, compile_seconds: dict, wall_seconds: float):
    self.executables = executables
    self.key_fn = key_fn
    self.name = name
    self.compile_seconds = compile_seconds
    self.wall_seconds = wall_seconds

  def __contains__(self, key) -> bool:
    return key in self.executables

  def __call__(self, *args):
    key = self.key_fn(*args)
    exe = self.executables.get(key)
    if exe is None:
      raise ShapeNotCompiledError(
          f'{self.name}: shape {key} is not in the table of compiled shapes '
          f'{sorted(self.executables)}; every shape of a multigrid run is '
          'compiled before training (aot.compile_buckets), so this '
          'batch does not follow the schedule')
    return exe(*args)


def compile_buckets(lower: Callable[[Hashable], Any], keys, *,
                    key_fn: Callable[..., Hashable], name: str = 'step',
                    num_threads: int | None = None) -> BucketTable:
  """Compiles one executable per key, ahead of time.

  Args:
    lower: ``key -> jax.stages.Lowered`` (``jitted.lower(*abstract_args)``
      for that key's shapes). Lowering traces Python, so it runs here in
      this thread, in order; the XLA compilations then run in parallel.
    keys: the keys (batch shapes) to compile.
    key_fn: maps the call arguments to their key (``BucketTable``).
    name: names the table in errors.
    num_threads: parallel compilations (default: one per key, at most 8).

  Returns:
    A ``BucketTable``.
  """
  keys = list(dict.fromkeys(keys))
  t0 = time.perf_counter()
  lowered, seconds = {}, {}
  for key in keys:
    t = time.perf_counter()
    lowered[key] = lower(key)
    seconds[key] = time.perf_counter() - t

  def compile_one(key):
    t = time.perf_counter()
    exe = lowered[key].compile()
    return key, exe, time.perf_counter() - t

  workers = num_threads or min(8, len(keys)) or 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    done = list(pool.map(compile_one, keys))
  executables = {}
  for key, exe, s in done:
    executables[key] = exe
    seconds[key] += s
  return BucketTable(executables, key_fn, name=name, compile_seconds=seconds,
                     wall_seconds=time.perf_counter() - t0)


def enable_compile_cache(path: str | None) -> None:
  """Turns on JAX's persistent compilation cache in ``path`` (None: no-op).

  Every executable is cached, however fast it compiled, so a restarted run
  (or the next one with the same shapes) loads its buckets from disk.
  """
  if not path:
    return
  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def abstract(x: PyTree) -> PyTree:
  """``ShapeDtypeStruct``s of a pytree of arrays (keeps shardings)."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                     sharding=getattr(a, 'sharding', None)), x)


# JAX's monitoring events of a compilation: tracing, lowering, XLA.
LOWERING_EVENT = '/jax/core/compile/jaxpr_to_mlir_module_duration'
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration', LOWERING_EVENT,
                  BACKEND_COMPILE_EVENT)


class CompileClock:
  """Compilation while active, from JAX's monitoring events.

  Attributes:
    seconds: wall time spent tracing, lowering and compiling (compilations
      that overlap, in threads or nested, count once).
    recompilations: how often a function compiled before while active was
      compiled again (another shape, dtype or static argument; counted at
      lowering, so a persistent compilation cache hides none).
    compilations: XLA backend compilations, persistent-cache hits included
      (JAX reports a hit as a backend compilation too; checked on jax
      0.10.2).
    backend_seconds: their summed durations (a hit's is its load).

  Compilations inside ``paused()`` count in ``seconds`` only.

  Example::

    with aot.CompileClock() as clock:
      step(...)
    print(clock.seconds, clock.recompilations, clock.compilations)
  """

  def __init__(self):
    self.recompilations = 0
    self.compilations = 0
    self.backend_seconds = 0.0
    self._spans = []  # (start, end) of every compile event.
    self._compiled = set()  # Names of the functions lowered so far.
    self._paused = False
    self._lock = threading.Lock()

  @property
  def seconds(self) -> float:
    total, reached = 0.0, float('-inf')
    with self._lock:
      spans = sorted(self._spans)
    for start, end in spans:  # The union of the spans.
      total += max(0.0, end - max(start, reached))
      reached = max(reached, end)
    return total

  @contextlib.contextmanager
  def paused(self):
    """Compilations inside count in ``seconds`` only (e.g. orbax's one-time
    host-transfer slices at a mesh run's first checkpoint: one per
    parameter shape, not the loop's)."""
    self._paused = True
    try:
      yield
    finally:
      self._paused = False

  def _listener(self, event: str, start: float, end: float,
                fun_name: str = '', **kwargs) -> None:
    del kwargs
    if event not in COMPILE_EVENTS:
      return
    with self._lock:
      self._spans.append((start, end))
      if event == LOWERING_EVENT:
        if fun_name in self._compiled and not self._paused:
          self.recompilations += 1
        self._compiled.add(fun_name)
      elif event == BACKEND_COMPILE_EVENT and not self._paused:
        self.compilations += 1
        self.backend_seconds += end - start

  def __enter__(self) -> 'CompileClock':
    jax.monitoring.register_event_time_span_listener(self._listener)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_time_span_listener(self._listener)
