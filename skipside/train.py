"""The training loop: steps on an engine, checkpoints, evaluation, faults.

One trainer for every mode and dataset (big_vision style): everything comes
from an ``ml_collections.ConfigDict`` (every key and its default:
``config.defaults``) and a workdir, and a run resumes from its workdir.

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

import collections
import contextlib
import dataclasses
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from skipside import data as data_lib
from skipside.data import multigrid_loader
from skipside import aot, batchnorm, engine, multigrid, network, optim
from skipside import checkpoints
from skipside import config as config_lib
from skipside import evaluation
from skipside import fidelity
from skipside import metrics as metrics_lib
from skipside import mesh as mesh_lib
from skipside import programs
from skipside import streaming

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


# Steps the loop queues ahead of the device (``_loop``).
STEPS_AHEAD = 3

# sysexits.h's EX_TEMPFAIL: the run stopped early but cleanly, rerun it (with
# the same --workdir) to resume. Non-zero, so that a scheduler does not take
# a preempted job for a finished one.
PREEMPTED_EXIT_CODE = 75


class _Preemption:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag checked at step
  boundaries; a second Ctrl-C raises ``KeyboardInterrupt`` at once.

  The loop calls ``poll`` at the start of each step (it also checks the
  background checkpoint save) and ``stop`` once the step is queued.

  Multi-process, every process must stop at the same step boundary, but a
  signal (a scheduler may signal one host only, or the hosts at different
  times) or a failed save is seen by one process. So ``poll`` sends this
  process's vote (its signal, whether its save failed) to every process in
  one tiny all-gather over all devices, queued behind the step already
  running, and ``stop`` reads the votes after the next step is queued: all
  processes read the same votes, so they save and stop (or raise
  ``CheckpointSaveError``) after the same step, and the device does not
  wait for the host (the one host sync per step of a multi-process run). (JAX's preemption sync manager,
  ``multihost_utils.reached_preemption_sync_point``, hears only SIGTERM,
  through a C++ handler that this class's own replaces, and neither Ctrl-C
  nor a failed save.) A single process reads its flag: no sync.
  """

  def __init__(self):
    self.requested = None  # The signal's name once one arrived (or agreed).
    self._signum = 0  # This process's own signal, 0 for none.
    self._save_error = None  # This process's failed save (multi-process).
    self._votes = None  # Multi-process: the all-gather of this step's votes.
    self._program = None  # Multi-process: (rows, gather) of _vote_program.

  def __call__(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name
    self._signum = int(signum)

  def poll(self, ckpt: checkpoints.Checkpointer) -> None:
    """At a step's start: ``ckpt.check()`` (a save that failed in the
    background stops the run; multi-process at ``stop``, on every process)
    and, multi-process, this process's vote sent to all."""
    if jax.process_count() == 1:
      ckpt.check()
      return
    try:
      ckpt.check()
    except checkpoints.CheckpointSaveError as e:
      self._save_error = e
    vote = np.array([self._signum, self._save_error is not None], np.int32)
    if self._program is None:
      self._program = _vote_program()
    rows, gather = self._program
    self._votes = gather(jax.make_array_from_process_local_data(
        rows, np.tile(vote, (jax.local_device_count(), 1)),
        (jax.device_count(), 2)))

  def stop(self) -> bool:
    """Whether to save and stop after the step just queued: this process's
    signal, or multi-process any process's vote at ``poll`` (the same
    answer on every process). Raises ``CheckpointSaveError`` on every
    process if one's save failed."""
    if jax.process_count() == 1:
      return bool(self.requested)
    votes, self._votes = np.asarray(self._votes.addressable_data(0)), None
    owners = [d.process_index for d in _vote_devices()]
    signums, failed = {}, set()
    for owner, (signum, save_failed) in zip(owners, votes):
      if signum:
        signums.setdefault(owner, int(signum))
      if save_failed:
        failed.add(owner)
    if failed:
      if self._save_error is not None:
        raise self._save_error
      raise checkpoints.CheckpointSaveError(
          f'checkpoint save failed on process {sorted(failed)} (its error '
          'names the checkpoint and the cause); every process stops here')
    if not signums:
      return False
    if not self._signum:  # Another process's signal: say whose.
      owner = min(signums)
      self.requested = (f'{signal.Signals(signums[owner]).name} on process '
                        f'{owner}')
    return True

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


def _vote_devices() -> list:
  """Every device of the job, grouped by process (each process's rows of
  the votes are contiguous)."""
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def _all_votes(votes: jax.Array) -> jax.Array:
  return votes  # Replicated by its out_shardings: an all-gather.


def _vote_program() -> tuple:
  """``(rows, gather)``: the votes' sharding (one row per device) and the
  jitted all-gather that gives every device all rows."""
  mesh = jax.sharding.Mesh(np.array(_vote_devices()), ('devices',))
  spec = jax.sharding.PartitionSpec
  return (jax.sharding.NamedSharding(mesh, spec('devices')),
          jax.jit(_all_votes,
                  out_shardings=jax.sharding.NamedSharding(mesh, spec())))


def _progress(total: int, initial: int):
  return tqdm.tqdm(total=total, initial=initial, unit='step',
                   dynamic_ncols=True, mininterval=1.0,
                   disable=jax.process_index() != 0)


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
    clock = resources.enter_context(aot.CompileClock())
    run = _set_up(config, workdir, restart, resources)
    return _loop(config, run, clock, resources)


@dataclasses.dataclass
class _Run:
  """A run ready for its loop (``_set_up``): everything is open and
  registered with the caller's ``ExitStack``.

  ``state`` holds params and optimizer state in the engine's layout (on a
  mesh sharded, ``config.mesh.state_sharding``: evenly over every device,
  or by stage group);
  checkpoints and evaluation's statistics see the pytree (``as_tree``).
  """
  workdir: str
  is_main: bool
  mesh: jax.sharding.Mesh | None
  spec: network.NetworkSpec
  eng: Any  # engine.LocalEngine or mesh.MeshEngine
  optimizer: Any
  state: checkpoints.TrainState
  tree_params: PyTree  # Shapes of the params pytree.
  schedule: multigrid.Schedule | None
  data_config: ml_collections.ConfigDict
  train_iter: Any
  ckpt: checkpoints.Checkpointer
  writer: metrics_lib.MetricWriter
  step_fn: Any  # (params, opt_state, clip, targets, carry) -> (..., out)
  host_batches: bool = False  # step_fn takes host arrays (chunked clips).
  # (params, clip, targets) -> ClipOutput: evaluation.forward_for's, or an
  # aot.BucketTable (multigrid).
  eval_forward: Any = None
  norm_moments: Any = None  # aot.BucketTable (multigrid), else None.
  probe: tuple | None = None  # Gradient fidelity's fixed (clip, targets).

  def as_tree(self) -> checkpoints.TrainState:
    """The state with params and optimizer state as pytrees."""
    return dataclasses.replace(
        self.state, params=self.eng.to_tree(self.state.params),
        opt_state=self.eng.to_tree(self.state.opt_state))


def _write_config(config, workdir: str, restart: bool, is_main: bool):
  """Claims ``workdir`` for the validated ``config`` before anything is
  written (``config.json`` describes the checkpoints)."""
  checkpoints.prepare_workdir(config, workdir, restart=restart, move=is_main)
  if jax.process_count() > 1:  # Every process checked before main writes.
    multihost_utils.sync_global_devices('skipside_workdir_checked')
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _open_data(config, mesh, is_main: bool, resources) -> tuple:
  """``(data_config, train iterator, multigrid schedule or None)``; the
  iterator is closed by ``resources``."""
  data_config = config_lib.data_config(config)
  if mesh is not None and jax.process_count() > 1:  # Load only our rows.
    data_config.shard_index, data_config.shard_count = _data_shard(
        mesh, config.data.batch_size)
  if not multigrid.enabled(config):
    train_iter = data_lib.make_iterator(data_config, train=True)
    resources.callback(train_iter.close)
    return data_config, train_iter, None
  # Batch shapes and LR follow a schedule.
  aot.enable_compile_cache(config.multigrid.compile_cache_dir)
  source = data_lib.make_source(data_config, data_config.split)
  resources.callback(source.close)  # Its record files.
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
  return data_config, train_iter, schedule


def _stream_carry(config, spec, params, data_config, mesh, compute_dtype):
  """A fresh stream carry shaped like the training batches (global on a
  mesh)."""
  with contextlib.closing(data_lib.make_iterator(data_config,
                                                 train=True)) as it:
    batch = next(it)  # Shapes of the carry.
  clip, targets = batch['video'], evaluation.targets_of(batch, spec)
  if mesh is not None:  # The carry holds the global batch.
    clip, targets = (jax.ShapeDtypeStruct(
        (config.data.batch_size, *x.shape[1:]), x.dtype)
                     for x in (clip, targets))
  return engine.init_carry(spec, params, clip, targets, config.mode,
                           compute_dtype)


def _set_up(config, workdir: str, restart: bool, resources) -> _Run:
  """Validates, claims the workdir, opens data, builds or restores the
  train state in the engine's layout and compiles what is compiled ahead;
  everything opened is closed by ``resources`` (an ``ExitStack``)."""
  # First: most errors need no backend (starting one may print libtpu's
  # start-up noise above the one-line error).
  config_lib.validate_config(config)
  is_main = jax.process_index() == 0
  _write_config(config, workdir, restart, is_main)
  mesh = config_lib.run_mesh(config)
  data_config, train_iter, schedule = _open_data(config, mesh, is_main,
                                                 resources)
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
    state.carry = _stream_carry(config, spec, state.params, data_config, mesh,
                                compute_dtype)
  eng = config_lib.make_engine(config, spec, state.params, mesh)
  if mesh is not None:  # Same pytrees, replicated: checkpoints fit both.
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
  tree_params = aot.abstract(state.params)
  state = dataclasses.replace(state, params=eng.to_state(state.params),
                              opt_state=eng.to_state(state.opt_state))
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  resources.callback(writer.close)
  run = _Run(workdir=workdir, is_main=is_main, mesh=mesh, spec=spec, eng=eng,
             optimizer=optimizer, state=state, tree_params=tree_params,
             schedule=schedule, data_config=data_config,
             train_iter=train_iter, ckpt=ckpt, writer=writer,
             step_fn=programs.train_step_for(config, eng, optimizer),
             eval_forward=programs.eval_step_for(config, eng),  # Chunked too.
             host_batches=streaming.is_chunked(config))
  if schedule is not None:  # Every shape compiled before the first step.
    run.step_fn, run.eval_forward, run.norm_moments = programs.compile_ahead(
        config, eng, optimizer, aot.abstract(state.params),
        aot.abstract(state.opt_state), train_iter.info, schedule,
        tree_params=tree_params,
        norms=batchnorm.has_norms(spec, tree_params))
  if config.train.get('fidelity_every', 0):
    with contextlib.closing(data_lib.make_eval_iterator(data_config)) as it:
      batch = next(it)  # Gradient fidelity's fixed batch: the first eval one.
    run.probe = eng.put_batch(
        (batch['video'], evaluation.targets_of(batch, spec)),
        len(batch['video']) * train_iter.info.shard_count)
  return run


def _evaluate(config, run: _Run) -> dict:
  """Evaluation metrics of the current params (population statistics of
  sub-batch norms first)."""
  params = run.state.params
  if batchnorm.has_norms(run.spec, run.tree_params):
    params = evaluation.eval_params(config, run.spec,
                                    run.eng.to_tree(params), run.data_config,
                                    run.norm_moments)
    if run.mesh is not None:  # to_state takes global arrays.
      params = _replicated(run.mesh, params)
    params = run.eng.to_state(params)
  compute_dtype = config_lib.PRECISIONS[config.precision]
  with contextlib.closing(data_lib.make_eval_iterator(run.data_config)) as it:
    batches, forward = evaluation.eval_feed(
        run.eng, it, config.data.batch_size, run.eval_forward,
        host_batches=run.host_batches)
    return evaluation.evaluate(
        run.spec, params, batches, mode=config.mode,
        compute_dtype=compute_dtype,
        max_batches=config.eval.max_batches or None, forward=forward)


def _log_fidelity(config, run: _Run) -> None:
  cosines = fidelity.stage_cosines(
      run.eng, run.state.params, *run.probe,
      compute_dtype=config_lib.PRECISIONS[config.precision])
  run.writer.write(run.state.step, {f'fidelity/cosine_stage_{l}': float(c)
                                    for l, c in enumerate(cosines)})


def _meta(config, run: _Run) -> dict:
  """What a checkpoint records beside the state."""
  m = {'step': run.state.step, 'mode': config.mode}
  if run.schedule is not None:
    m['multigrid'] = run.schedule.position(run.state.step)
  return m


@jax.jit
def _tally(tally: tuple, loss: jax.Array, step: int) -> tuple:
  """``(non-finite losses so far, the first such step or -1)`` updated with
  training step ``step``'s ``loss``, on the device: the loop reads it only
  at its boundaries (no host sync per step)."""
  count, first = tally
  bad = ~jnp.isfinite(loss)
  return count + bad, jnp.where(bad & (first < 0), step, first)


def _read_tally(config, run: _Run, summary: dict, tally: tuple) -> None:
  """At a boundary: a non-finite loss since the start stops the run
  (``'stop'``: nothing was saved after it) or is counted (``'skip'``: its
  update was dropped on the device, ``optim.finish_step``)."""
  count, first = (int(v) for v in tally)
  if not count:
    return
  if config.train.on_nonfinite == 'stop':
    raise NonFiniteLossError(
        f'non-finite loss at step {first}; stopping. The last good '
        f'checkpoint in {run.workdir}/checkpoints is kept '
        "(set config.train.on_nonfinite='skip' to skip such steps)")
  if count > summary.get('skipped_steps', 0):
    logging.warning('non-finite loss at %d steps (the first at step %d): '
                    'updates skipped', count, first)
  summary['skipped_steps'] = count


def _next_batch(config, run: _Run) -> tuple:
  """The next training ``(clip, targets)`` as the engine takes them, and
  the number of clips this process read."""
  batch = next(run.train_iter)
  clip, targets = batch['video'], evaluation.targets_of(batch, run.spec)
  try:  # Labels out of range give a NaN or a plausible loss, silently.
    engine.check_values(run.spec, clip, targets)
  except ValueError as e:
    raise ValueError(f'training batch {run.state.step + 1} of '
                     f'{config.data.dataset!r}: {e}') from e
  if run.host_batches:  # The step sends the devices one chunk at a time.
    return (clip, targets), len(clip)
  # This process's rows -> the engine's arrays (multigrid: the bucket's).
  return run.eng.put_batch((clip, targets),
                           len(clip) * run.train_iter.info.shard_count), len(
                               clip)


def _loop(config, run: _Run, clock: aot.CompileClock, resources) -> dict:
  """Trains ``run`` to the end of its schedule (or a preemption); returns
  the summary (``train_and_evaluate``)."""
  run.as_tree()  # Compile the pytree conversions before the loop counts.
  total = run.schedule.num_steps if run.schedule else config.train.num_steps
  summary = {'preempted': False, 'start_step': run.state.step}
  if config.mode == 'sideways':  # How old each stage's gradient is.
    summary.update({f'fidelity/staleness_ticks_stage_{l}': t for l, t in
                    enumerate(fidelity.staleness_ticks(run.spec))})
  if run.probe is not None and run.state.step < total:
    _log_fidelity(config, run)  # At the start (compiled before the loop counts).
  every = config.train
  # Placed as the losses are (global on a mesh): _tally compiles once.
  tally = (np.zeros((), np.int32), np.full((), -1, np.int32))
  tally = (_replicated(run.mesh, tally) if run.mesh is not None
           else jax.device_put(tally, jax.devices()[0]))
  queued = collections.deque()  # Losses of the steps not known finished.
  train_metrics, eval_metrics = {}, {}
  clips, t0, t_log = 0, time.time(), time.time()
  bar = _progress(total, run.state.step)
  resources.callback(bar.close)
  recompilations = clock.recompilations  # Those in the loop count.
  with _Preemption().installed() as preemption:
    while run.state.step < total:
      # A save that failed in the background stops the run; multi-process,
      # this process's vote (signal, failed save) goes to all (_Preemption).
      preemption.poll(run.ckpt)
      (clip, targets), n = _next_batch(config, run)
      state = run.state
      params, opt_state, out = run.step_fn(state.params, state.opt_state,
                                           clip, targets, state.carry)
      # Non-finite losses are counted on the device; the host reads the
      # count at boundaries only, so steps queue without waiting.
      tally = _tally(tally, out.metrics['loss'], state.step + 1)
      # At most STEPS_AHEAD steps queued: each holds its batch on the
      # device, and a preemption's final save waits for all of them.
      queued.append(out.metrics['loss'])
      if len(queued) > STEPS_AHEAD:
        queued.popleft().block_until_ready()
      run.state = state = dataclasses.replace(
          state, step=state.step + 1, params=params, opt_state=opt_state,
          carry=out.carry if config.train.stream else None)
      clips += n
      bar.update(1)
      # Multi-process: every process's votes, so all stop at this step.
      stopping = preemption.stop() and state.step < total
      boundary = state.step == total or stopping or any(
          k and state.step % k == 0 for k in (
              every.log_every, every.checkpoint_every, every.eval_every,
              every.fidelity_every if run.probe is not None else 0))
      if boundary:  # Nothing is logged or saved past an unread loss.
        _read_tally(config, run, summary, tally)
      if state.step % every.log_every == 0 or state.step == total:
        now = time.time()
        train_metrics = {f'train/{k}': float(v)
                         for k, v in out.metrics.items()}
        train_metrics['train/clips_per_s'] = clips / max(now - t_log, 1e-9)
        lr = optim.learning_rate(state.opt_state)  # The last update's rate.
        if lr is not None:
          train_metrics['train/learning_rate'] = float(lr)
        if run.schedule is not None:  # The phase this step trained in.
          train_metrics['train/multigrid_phase'] = float(
              run.schedule.phase_index(state.step - 1))
        train_metrics.update(run.train_iter.stats.metrics())
        clips, t_log = 0, now
        bar.set_postfix(loss=f'{train_metrics["train/loss"]:.4f}',
                        clips_s=f'{train_metrics["train/clips_per_s"]:.1f}')
        run.writer.write(state.step, train_metrics)
      if state.step % every.checkpoint_every == 0 or state.step == total:
        with clock.paused():
          run.ckpt.save(run.as_tree(), run.train_iter.get_state(),
                        _meta(config, run))
      if state.step % every.eval_every == 0 or state.step == total:
        eval_metrics = _evaluate(config, run)
        run.writer.write(state.step, eval_metrics)
        if run.is_main:
          bar.write(f'step {state.step}: ' + ', '.join(
              f'{k}={v:.4f}' for k, v in eval_metrics.items()))
      if run.probe is not None and state.step % every.fidelity_every == 0:
        _log_fidelity(config, run)
      if stopping:  # The flag as read above: its loss was read then.
        with clock.paused():
          run.ckpt.save(run.as_tree(), run.train_iter.get_state(),
                        _meta(config, run), wait=True)
        summary['preempted'] = True
        if run.is_main:
          bar.write(f'{preemption.requested}: saved a checkpoint at step '
                    f'{state.step}; exiting. Run again with the same '
                    '--workdir to resume.')
        break
  run.ckpt.wait()  # The last save is on disk before the run reports success.
  if summary['start_step'] >= total and run.is_main:  # A finished run, again.
    train_metrics = metrics_lib.last_metrics(run.workdir)
    print(f'Nothing to train: {run.workdir} is at step {run.state.step} of '
          f'{total}; its final metrics, read back from its metrics.jsonl: ' + (
              ', '.join(f'{k}={v:.4f}' for k, v in train_metrics.items())
              or 'none'), flush=True)
  summary.update(step=run.state.step, wall_s=time.time() - t0,
                 **train_metrics, **eval_metrics, compile_s=clock.seconds,
                 compilations_in_loop=clock.recompilations - recompilations)
  return summary
