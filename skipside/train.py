"""The training loop: steps on an engine, checkpoints, evaluation, faults.

One trainer for every mode and dataset (big_vision style): everything comes
from an ``ml_collections.ConfigDict`` (see ``experiments/configs/default.py``
for every key) and a workdir, and a run resumes from its workdir.

The workdir holds::

    config.json           the full config of the run (written at start)
    metrics.jsonl         one JSON object per logged step / evaluation
    events.out.tfevents*  the same metrics for TensorBoard
    checkpoints/<step>/   orbax checkpoints: params, optimizer state, step,
                          RNG, stream carry, data-iterator state, schedule

Faults: a SIGTERM (preemption) or a first Ctrl-C saves a checkpoint at the
next step boundary and returns with ``summary['preempted']`` set (the
launcher then exits with ``PREEMPTED_EXIT_CODE``; a second Ctrl-C aborts at
once); a non-finite loss stops with ``NonFiniteLossError``
(the last good checkpoint stays) or, with ``train.on_nonfinite='skip'``,
drops that step's update; a corrupt latest checkpoint is skipped with a
warning in favour of the one before it; a checkpoint that fails to save
(written in the background) stops the run at the next step boundary with
``checkpoints.CheckpointSaveError`` (its path and the cause).

The loop's parts live apart: ``config`` (validation, the network, the
mesh), ``checkpoints`` (train state, workdir, orbax), ``evaluation``,
``metrics``; the engines behind one interface (``engine.LocalEngine``,
``mesh.MeshEngine``).

Example::

    from experiments.configs import default
    summary = train.train_and_evaluate(default.get_config('tiny'), '/tmp/run')
"""

import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from skipside import data as data_lib
from skipside.data import multigrid_loader
from skipside import batchnorm, engine, multigrid, network, optim
from skipside import checkpoints
from skipside import config as config_lib
from skipside import evaluation
from skipside import fidelity
from skipside import metrics as metrics_lib
from skipside import mesh as mesh_lib

PyTree = Any


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def _replicated(mesh: jax.sharding.Mesh, tree: PyTree) -> PyTree:
  """Every leaf as a global array replicated over ``mesh`` (multi-process:
  each process holds the same value)."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
  return jax.tree.map(one, tree)


def _data_shard(mesh: jax.sharding.Mesh, batch_size: int) -> tuple[int, int]:
  """``(shard_index, shard_count)`` of the rows this process feeds: its
  'data' rows (``mesh.process_rows``); processes that share rows (the
  'stage' axis spans them) load the same shard."""
  rows = mesh_lib.process_rows(mesh, batch_size)
  n = rows.stop - rows.start
  return rows.start // n, batch_size // n


@functools.partial(jax.jit, static_argnames=('eng', 'optimizer', 'mode',
                                             'compute_dtype', 'update_every',
                                             'flush', 'skip_nonfinite',
                                             'mask_fill'),
                   donate_argnames=('params', 'opt_state'))
def _train_step(eng, optimizer, params, opt_state, clip, targets, carry, *,
                mode, compute_dtype, update_every, flush, skip_nonfinite,
                mask_fill=True):
  """The loop's step on any engine (``engine.LocalEngine``,
  ``mesh.MeshEngine``): ``params`` and ``opt_state`` in its state layout,
  donated; the carry in and out as an ``engine.StreamCarry`` (checkpoints
  fit every engine)."""
  new = eng.train_step(optimizer, params, opt_state, clip, targets,
                       mode=mode, carry=carry, compute_dtype=compute_dtype,
                       update_every=update_every, flush=flush,
                       mask_fill=mask_fill)
  out = new[2]
  out = out._replace(carry=eng.to_stream_carry(out.carry))
  params, opt_state = optim.finish_step(
      (params, opt_state), new[:2], out.metrics['loss'],
      skip_nonfinite=skip_nonfinite)
  return params, opt_state, out


# sysexits.h's EX_TEMPFAIL: the run stopped early but cleanly, rerun it (with
# the same --workdir) to resume. Non-zero, so that a scheduler does not take
# a preempted job for a finished one.
PREEMPTED_EXIT_CODE = 75


class _Preemption:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag checked at step
  boundaries; a second Ctrl-C raises ``KeyboardInterrupt`` at once."""

  def __init__(self):
    self.requested = None  # The signal's name once one arrived.

  def __call__(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  @contextlib.contextmanager
  def installed(self):
    signals = (signal.SIGTERM, signal.SIGINT)
    try:
      previous = [signal.signal(s, self) for s in signals]
    except ValueError:  # Not the main thread: no handler, nothing to restore.
      yield self
      return
    try:
      yield self
    finally:
      for s, p in zip(signals, previous):
        signal.signal(s, p)


# JAX's monitoring events of a compilation: tracing, lowering, XLA.
LOWERING_EVENT = '/jax/core/compile/jaxpr_to_mlir_module_duration'
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration', LOWERING_EVENT,
                  multigrid.BACKEND_COMPILE_EVENT)


class CompileClock:
  """Compilation while active, from JAX's monitoring events: ``seconds``,
  the wall time spent tracing, lowering and compiling (compilations that
  overlap, in threads or nested, count once); ``recompilations``, how often
  a function compiled before while active was compiled again (another
  shape, dtype or static argument; counted at lowering, so a persistent
  compilation cache hides none).

  Example::

    with train.CompileClock() as clock:
      step(...)
    print(clock.seconds, clock.recompilations)
  """

  def __init__(self):
    self.recompilations = 0
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
    """Compilations inside count as no recompilation (e.g. orbax's one-time
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

  def __enter__(self) -> 'CompileClock':
    jax.monitoring.register_event_time_span_listener(self._listener)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_time_span_listener(self._listener)


def _progress(total: int, initial: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
              mininterval=1.0, disable=jax.process_index() != 0)


def starved_stages_warning(config: ml_collections.ConfigDict,
                           spec: network.NetworkSpec,
                           schedule: multigrid.Schedule | None = None
                           ) -> str | None:
  """What to say at start-up when some stage gets no gradient from a fresh
  clip (``engine.gradient_ticks``: Sideways messages need ``d_l`` ticks to
  reach stage ``l``), or ``None``. The shortest clip counts: a multigrid
  schedule's shortest bucket; PGT's whole video (its fragments are one
  stream). A stream (``train.stream``) lands every message in the next
  clip: nothing to say."""
  if config.train.stream:
    return None
  frames = config.data.num_frames
  if schedule is not None:
    frames = min(s.frames for s in schedule.buckets())
  flush = config.train.flush
  ticks = engine.gradient_ticks(spec, config.mode, frames, flush=flush)
  starved = [l for l, n in enumerate(ticks) if n == 0]
  if not starved:
    return None
  dist = engine.message_distances(spec)
  need = spec.depth + max(dist[l] for l in starved) + 1
  return (f'stages {starved} get no gradient: in {config.mode!r} '
          f'a fresh {frames}-frame clip (flush {flush}) masks '
          f'{spec.depth} fill ticks and a message needs {dist} ticks to reach '
          f'each stage. Use config.data.num_frames >= {need}, '
          f'config.train.flush >= {need - frames}, or '
          'config.train.stream=True (gradient ticks per stage: '
          f'{list(ticks)})')


def _compile_multigrid(config, eng, optimizer, state, schedule, info,
                       compute_dtype, tree_params):
  """Every train shape of ``schedule`` and the eval shape, compiled ahead of
  time: ``(train step table, eval forward table)`` (``multigrid.BucketTable``,
  keyed by the clip shape the loop passes: per process on one device, global
  on a mesh).

  Each bucket runs the loop's own step functions (``_train_step``,
  ``evaluation.eval_step``, PGT's ``make_train_step``) on engine ``eng``
  with the spec of its frame size (``network.for_frame_shape``; on a mesh the same stage
  groups). ``state``: the train state in the engine's layout;
  ``tree_params``: the params pytree's shapes.
  """
  static = dict(mode=config.mode, compute_dtype=compute_dtype,
                update_every=None, flush=config.train.flush,
                skip_nonfinite=config.train.on_nonfinite == 'skip',
                mask_fill=config_lib.mask_fill(config))
  pgt = config.get('progressive') and config.progressive.enabled
  if pgt:
    from skipside import progressive  # pylint: disable=g-import-not-at-top

  def bucket_engine(key):
    return eng.with_spec(network.for_frame_shape(eng.spec, tree_params,
                                                 key[2:]))

  def abstract(key):
    """The loop's ``(clip, targets)`` for this process's clips of ``key``."""
    local = (jax.ShapeDtypeStruct(key, jnp.float32),
             jax.ShapeDtypeStruct(key[:1], jnp.int32))
    try:
      return eng.batch_like(local, key[0] * info.shard_count)
    except ValueError as e:
      raise config_lib.ConfigError(
          f'multigrid bucket of clip shape {key}: {e} (config.mesh.data)'
      ) from e

  params, opt_state = (multigrid.abstract(state.params),
                       multigrid.abstract(state.opt_state))

  def lower_step(local_key):
    clip, targets = abstract(local_key)
    key = tuple(clip.shape)
    if pgt:
      try:
        progressive.Options.from_config(config.progressive).num_fragments(
            key[1])
      except ValueError as e:
        raise config_lib.ConfigError(
            f'multigrid bucket of clip shape {key}: config.progressive: {e}'
        ) from e
      step = progressive.make_train_step(
          bucket_engine(key), optimizer, config,
          compute_dtype=compute_dtype, skip_nonfinite=static['skip_nonfinite'])
      return step.lower(params, opt_state, clip, targets, None)
    return _train_step.lower(bucket_engine(key), optimizer, params,
                             opt_state, clip, targets, None, **static)

  def lower_eval(local_key):
    clip, targets = abstract(local_key)
    return evaluation.eval_step.lower(
        bucket_engine(tuple(clip.shape)), params, clip, targets,
        mode=config.mode, compute_dtype=compute_dtype)

  channels = info.element_shape[-1]
  local_keys = [
      multigrid_loader.clip_spec(s, channels, info.shard_count)[0].shape
      for s in schedule.buckets()]
  threads = config.multigrid.compile_threads or None
  # Keyed by the clip the loop passes (``eng.put_batch``: global on a mesh).
  local_of = {tuple(abstract(k)[0].shape): k for k in local_keys}
  steps = multigrid.compile_buckets(
      lambda k: lower_step(local_of[k]), list(local_of),
      key_fn=lambda p, o, clip, t, c=None: tuple(clip.shape),
      name='train step', num_threads=threads)
  eval_key = (info.batch_size, *info.element_shape)
  evals = multigrid.compile_buckets(
      lambda k: lower_eval(eval_key), [tuple(abstract(eval_key)[0].shape)],
      key_fn=lambda p, clip, t: tuple(clip.shape), name='eval forward')
  logging.info('multigrid: compiled %d train shapes + eval in %.1fs',
               len(local_of), steps.wall_seconds + evals.wall_seconds)
  return steps, evals


def _compile_norm_moments(spec, params, info) -> multigrid.BucketTable:
  """``batchnorm.clip_moments`` on the base clip shape, compiled ahead."""
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        params)
  key = (info.batch_size * info.shard_count, *info.element_shape)
  return multigrid.compile_buckets(
      lambda k: batchnorm.jitted_clip_moments.lower(
          spec, params, jax.ShapeDtypeStruct(k, jnp.float32)), [key],
      key_fn=lambda p, clip: tuple(clip.shape), name='norm statistics')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart: bool = False) -> dict:
  """Trains per ``config`` in ``workdir`` (resuming if it holds checkpoints).

  A used ``workdir`` whose ``config.json`` differs from ``config`` in a key
  that changes the train state or its meaning is refused
  (``checkpoints.WorkdirConflictError``) unless ``restart``, which moves
  that run aside (``checkpoints.prepare_workdir``).

  Returns a summary: final step, last train and eval metrics, wall time,
  ``'preempted': True`` if a SIGTERM or Ctrl-C ended the run early,
  ``compile_s`` (wall seconds spent tracing, lowering and compiling:
  multigrid's shapes ahead of the loop, otherwise mostly the train step and
  evaluation at their first use) and
  ``compilations_in_loop`` (recompilations in the loop, checkpoint writes
  aside: 0 in a healthy run). A rerun of a finished run trains nothing and
  reports the metrics its ``metrics.jsonl`` holds.

  A checkpoint that fails to save stops the run at the next step boundary
  (``checkpoints.CheckpointSaveError``: its path and the cause).

  Whatever ends it (a return, a config error, a non-finite loss, any
  exception) closes the data iterators' threads, waits for pending
  checkpoint writes and closes the metric files.
  """
  with contextlib.ExitStack() as resources:
    return _train_and_evaluate(config, workdir, restart, resources)


def _train_and_evaluate(config, workdir, restart, resources) -> dict:
  """``train_and_evaluate``; everything opened is closed by ``resources``
  (an ``ExitStack``)."""
  clock = resources.enter_context(CompileClock())
  config_lib.validate_config(config)
  is_main = jax.process_index() == 0
  # Before anything is written: config.json describes the checkpoints.
  checkpoints.prepare_workdir(config, workdir, restart=restart, move=is_main)
  if jax.process_count() > 1:  # Every process checked before main writes.
    multihost_utils.sync_global_devices('skipside_workdir_checked')
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  data_config = config_lib.data_config(config)
  mesh = config_lib.make_mesh(config) if config_lib.use_mesh(config) else None
  if mesh is not None and jax.process_count() > 1:  # Load only our rows.
    data_config.shard_index, data_config.shard_count = _data_shard(
        mesh, config.data.batch_size)
  schedule = None
  if multigrid.enabled(config):  # Batch shapes and LR follow a schedule.
    multigrid.enable_compile_cache(config.multigrid.compile_cache_dir)
    source = data_lib.make_source(data_config, data_config.split)
    try:
      schedule = multigrid.schedule_from_config(
          config, len(source.data), (source.frame_shape or (None,))[0])
    except ValueError as e:  # round_epochs leaving an LR step empty.
      raise config_lib.ConfigError(str(e)) from e
    # Before the iterator's threads and any compile: buckets too short for
    # the pipeline would make zero-gradient steps.
    for error in multigrid.depth_errors(
        schedule, len(config_lib.parse_stages(config.model.stages)) - 1,
        config.mode):
      raise config_lib.ConfigError(error)
    train_iter = multigrid_loader.MultigridIterator(data_config, schedule,
                                                    source)
    resources.callback(train_iter.close)
    if is_main:
      print(f'Multigrid schedule ({schedule.num_steps} steps):\n'
            f'{schedule.table()}', flush=True)
  else:
    train_iter = data_lib.make_iterator(data_config, train=True)
    resources.callback(train_iter.close)
  line = data_lib.describe_process(train_iter.info, mesh)
  logging.info(line)
  if jax.process_count() > 1:  # Every process: who it is, which rows it reads.
    print(line, flush=True)
  spec, optimizer, state = checkpoints.init_state(config, train_iter.info,
                                                  schedule)
  starved = starved_stages_warning(config, spec, schedule)
  if starved and is_main:
    logging.warning(starved)
    print(f'WARNING: {starved}', flush=True)
  compute_dtype = config_lib.PRECISIONS[config.precision]
  if config.train.stream:
    with contextlib.closing(data_lib.make_iterator(data_config,
                                                   train=True)) as it:
      batch = next(it)  # Shapes of the carry.
    clip, targets = batch['video'], evaluation.targets_of(batch, spec)
    if mesh is not None:  # The carry holds the global batch.
      clip, targets = (jax.ShapeDtypeStruct(
          (config.data.batch_size, *x.shape[1:]), x.dtype)
                       for x in (clip, targets))
    state.carry = engine.init_carry(spec, state.params, clip, targets,
                                    config.mode, compute_dtype)
  mspec = None
  if mesh is not None:  # Same pytrees, replicated: checkpoints fit both.
    mspec = config_lib.place(config, spec, state.params, mesh)
    state = dataclasses.replace(
        state, params=_replicated(mesh, state.params),
        opt_state=_replicated(mesh, state.opt_state),
        carry=_replicated(mesh, state.carry),
        rng=jax.random.wrap_key_data(
            _replicated(mesh, jax.random.key_data(state.rng))))

  ckpt = checkpoints.Checkpointer(workdir, config.train.keep_checkpoints,
                                 cleanup=True)
  resources.callback(ckpt.close)  # Waits for pending writes.
  restored = ckpt.restore(state, repair=True)
  if restored is not None:
    state, data_state, meta = restored
    train_iter.set_state(data_state)
    logging.info('resumed from step %d (%s)', state.step, meta)
    if is_main:
      print(f'Resumed from {workdir} at step {state.step}.', flush=True)
  tree_params = multigrid.abstract(state.params)  # Shapes of the pytree.
  pgt = bool(config.get('progressive') and config.progressive.enabled)
  # The train state in the engine's layout: on a mesh stage-sharded (each
  # device holds and updates its own stages' params and optimizer state).
  # Checkpoints and evaluation's statistics see the pytree (as_tree).
  eng = (engine.LocalEngine(spec) if mspec is None
         else mesh_lib.MeshEngine(mspec))
  state = dataclasses.replace(state, params=eng.to_state(state.params),
                              opt_state=eng.to_state(state.opt_state))

  def as_tree(state: checkpoints.TrainState) -> checkpoints.TrainState:
    """``state`` with params and optimizer state as pytrees."""
    return dataclasses.replace(state, params=eng.to_tree(state.params),
                               opt_state=eng.to_tree(state.opt_state))

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  resources.callback(writer.close)
  step_fn = functools.partial(
      _train_step, eng, optimizer, mode=config.mode,
      compute_dtype=compute_dtype,
      update_every=config.train.update_every or None,
      flush=config.train.flush,
      skip_nonfinite=config.train.on_nonfinite == 'skip',
      mask_fill=config_lib.mask_fill(config))
  eval_forward, norm_moments = None, None
  if schedule is not None:  # Every shape compiled before the first step.
    step_fn, eval_forward = _compile_multigrid(
        config, eng, optimizer, state, schedule, train_iter.info,
        compute_dtype, tree_params)
    if batchnorm.has_norms(spec, tree_params):  # Its statistics pass too.
      norm_moments = _compile_norm_moments(spec, tree_params,
                                           train_iter.info)
  elif pgt:
    from skipside import progressive  # PGT: videos as serial fragments.
    step_fn = progressive.make_train_step(
        eng, optimizer, config, compute_dtype=compute_dtype,
        skip_nonfinite=config.train.on_nonfinite == 'skip')

  def meta():
    m = {'step': state.step, 'schedule_position': state.step,
         'mode': config.mode}
    if schedule is not None:
      m['multigrid'] = schedule.position(state.step)
    return m

  def run_eval():
    params = state.params
    if batchnorm.has_norms(spec, tree_params):  # Population statistics.
      params = evaluation.eval_params(config, spec, eng.to_tree(params),
                                      data_config, norm_moments)
      params = eng.to_state(params if mesh is None else
                            _replicated(mesh, params))
    it = data_lib.make_eval_iterator(data_config)
    batches, forward = evaluation.eval_feed(
        eng, it, config.data.batch_size, mode=config.mode,
        compute_dtype=compute_dtype, compiled=eval_forward)
    try:
      return evaluation.evaluate(
          spec, params, batches, mode=config.mode,
          compute_dtype=compute_dtype,
          max_batches=config.eval.max_batches or None, forward=forward)
    finally:
      it.close()

  probe = None  # Gradient fidelity's fixed batch: the first eval batch.
  if config.train.get('fidelity_every', 0):
    with contextlib.closing(data_lib.make_eval_iterator(data_config)) as it:
      batch = next(it)
    probe = eng.put_batch(
        (batch['video'], evaluation.targets_of(batch, spec)),
        len(batch['video']) * train_iter.info.shard_count)

  def log_fidelity():
    cosines = fidelity.stage_cosines(eng, state.params, *probe,
                                     compute_dtype=compute_dtype)
    writer.write(state.step, {f'fidelity/cosine_stage_{l}': float(c)
                              for l, c in enumerate(cosines)})

  as_tree(state)  # Compile the pytree conversions before the loop counts.
  total = schedule.num_steps if schedule else config.train.num_steps
  summary = {'preempted': False, 'start_step': state.step}
  if config.mode == 'sideways':  # How old each stage's gradient is.
    summary.update({f'fidelity/staleness_ticks_stage_{l}': t for l, t in
                    enumerate(fidelity.staleness_ticks(spec))})
  if probe is not None and state.step < total:
    log_fidelity()  # At the start (compiled before the loop counts).

  def check_loss(step: int, loss: jax.Array) -> float:
    """``loss`` of training step ``step`` on the host; a non-finite one
    stops the run (``'stop'``) or is counted (``'skip'``: its update was
    dropped on the device, ``optim.finish_step``)."""
    value = float(loss)
    if np.isfinite(value):
      return value
    if config.train.on_nonfinite == 'stop':
      raise NonFiniteLossError(
          f'non-finite loss {value} at step {step}; stopping. The last good '
          f'checkpoint in {workdir}/checkpoints is kept '
          "(set config.train.on_nonfinite='skip' to skip such steps)")
    logging.warning('non-finite loss at step %d: update skipped', step)
    summary['skipped_steps'] = summary.get('skipped_steps', 0) + 1
    return value

  unread = None  # (step, loss) of the last step, not yet read on the host.
  train_metrics, eval_metrics = {}, {}
  clips, t0, t_log = 0, time.time(), time.time()
  bar = _progress(total, state.step)
  resources.callback(bar.close)
  recompilations = clock.recompilations  # Those in the loop count.
  with _Preemption().installed() as preemption:
    while state.step < total:
      ckpt.check()  # A save that failed in the background stops the run.
      batch = next(train_iter)
      clip, targets = batch['video'], evaluation.targets_of(batch, spec)
      try:  # Labels out of range give a NaN or a plausible loss, silently.
        engine.check_values(spec, clip, targets)
      except ValueError as e:
        raise ValueError(f'training batch {state.step + 1} of '
                         f'{config.data.dataset!r}: {e}') from e
      # This process's rows -> the engine's arrays (multigrid: the bucket's).
      clip, targets = eng.put_batch((clip, targets),
                                    len(clip) * train_iter.info.shard_count)
      params, opt_state, out = step_fn(state.params, state.opt_state, clip,
                                       targets, state.carry)
      # The step before's loss is read now, while this one is queued: a
      # host read of this step's would stall the device every step.
      if unread is not None:
        check_loss(*unread)
      unread = (state.step + 1, out.metrics['loss'])
      state = dataclasses.replace(
          state, step=state.step + 1, params=params, opt_state=opt_state,
          carry=out.carry if config.train.stream else None)
      clips += len(batch['video'])
      bar.update(1)
      stopping = bool(preemption.requested) and state.step < total
      boundary = state.step == total or stopping or any(
          state.step % every == 0 for every in (
              config.train.log_every, config.train.checkpoint_every,
              config.train.eval_every))
      if boundary:  # Nothing is logged or saved past an unread loss.
        loss, unread = check_loss(*unread), None
      if state.step % config.train.log_every == 0 or state.step == total:
        now = time.time()
        train_metrics = {f'train/{k}': float(v)
                         for k, v in out.metrics.items()}
        train_metrics['train/clips_per_s'] = clips / max(now - t_log, 1e-9)
        lr = optim.learning_rate(state.opt_state)  # The last update's rate.
        if lr is not None:
          train_metrics['train/learning_rate'] = float(lr)
        if schedule is not None:  # The phase this step trained in.
          train_metrics['train/multigrid_phase'] = float(
              schedule.phase_index(state.step - 1))
        train_metrics.update(train_iter.stats.metrics())
        clips, t_log = 0, now
        bar.set_postfix(loss=f'{loss:.4f}',
                        clips_s=f'{train_metrics["train/clips_per_s"]:.1f}')
        writer.write(state.step, train_metrics)
      if state.step % config.train.checkpoint_every == 0 or state.step == total:
        with clock.paused():
          ckpt.save(as_tree(state), train_iter.get_state(), meta())
      if state.step % config.train.eval_every == 0 or state.step == total:
        eval_metrics = run_eval()
        writer.write(state.step, eval_metrics)
        if is_main:
          bar.write(f'step {state.step}: ' + ', '.join(
              f'{k}={v:.4f}' for k, v in eval_metrics.items()))
      if probe is not None and state.step % config.train.fidelity_every == 0:
        log_fidelity()
      if stopping:  # The flag as read above: its loss was read then.
        with clock.paused():
          ckpt.save(as_tree(state), train_iter.get_state(), meta(),
                    wait=True)
        summary['preempted'] = True
        if is_main:
          bar.write(f'{preemption.requested}: saved a checkpoint at step '
                    f'{state.step}; exiting. Run again with the same '
                    '--workdir to resume.')
        break
  ckpt.wait()  # The last save is on disk before the run reports success.
  if summary['start_step'] >= total and is_main:  # A finished run, again.
    train_metrics = metrics_lib.last_metrics(workdir)
    print(f'Nothing to train: {workdir} is at step {state.step} of {total}; '
          'its final metrics, read back from its metrics.jsonl: ' + (', '.join(
              f'{k}={v:.4f}' for k, v in train_metrics.items()) or 'none'),
          flush=True)
  summary.update(step=state.step, wall_s=time.time() - t0, **train_metrics,
                 **eval_metrics, compile_s=clock.seconds,
                 compilations_in_loop=clock.recompilations - recompilations)
  return summary
