"""The training loop: config, train state, checkpoints, metrics, evaluation.

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
warning in favour of the one before it.

Example::

    from experiments.configs import default
    summary = train.train_and_evaluate(default.get_config('tiny'), '/tmp/run')
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from skipside import data as data_lib
from skipside import batchnorm, engine, multigrid, network, optim, placement
from skipside import stages
from skipside import mesh as mesh_lib

PyTree = Any
PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
STAGE_KINDS = ('conv', 'convbn', 'res', 'tconv', 'mlp')


class ConfigError(ValueError):
  """A config value is wrong; the message names the key."""


class WorkdirConflictError(ConfigError):
  """A used workdir whose checkpoints the new config would not continue."""


class CheckpointMismatchError(WorkdirConflictError):
  """A workdir whose checkpoints all fail to restore into this run."""


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------
# Config: validation and the network it describes.

def parse_stages(text: str) -> list[tuple[str, int, int]]:
  """Parses ``model.stages``: ``'conv:16:2,res:32,tconv'`` -> [(kind, width,
  stride)]. ``width`` 0 means "same as the input"; stride defaults to 1."""
  out = []
  for i, item in enumerate(s.strip() for s in text.split(',')):
    parts = item.split(':')
    kind = parts[0]
    if kind not in STAGE_KINDS:
      raise ConfigError(
          f'config.model.stages item {i} {item!r}: unknown stage kind '
          f'{kind!r}; use one of {STAGE_KINDS}')
    try:
      width = int(parts[1]) if len(parts) > 1 else 0
      stride = int(parts[2]) if len(parts) > 2 else 1
    except ValueError as e:
      raise ConfigError(
          f'config.model.stages item {i} {item!r}: expected kind:width[:stride]'
          ' with integers') from e
    if len(parts) > 3 or width < 0 or stride < 1:
      raise ConfigError(
          f'config.model.stages item {i} {item!r}: expected kind:width[:stride]'
          ' with width >= 0 and stride >= 1')
    out.append((kind, width, stride))
  return out


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int | None = None) -> None:
  """Fails fast, naming the key, on values the run cannot use."""
  if config.mode not in engine.MODES:
    raise ConfigError(f'config.mode={config.mode!r} is unknown; use one of '
                      f'{engine.MODES}')
  if config.precision not in PRECISIONS:
    raise ConfigError(f'config.precision={config.precision!r} is unknown; use '
                      f'one of {tuple(PRECISIONS)}')
  kinds = parse_stages(config.model.stages)
  num = len(kinds)
  for edge in config.model.skips:
    if len(edge) != 2 or not all(0 <= int(v) < num for v in edge):
      raise ConfigError(
          f'config.model.skips has edge {tuple(edge)} to a missing stage: '
          f'config.model.stages defines stages 0..{num - 1}')
  if config.model.head not in ('classifier', 'next_frame'):
    raise ConfigError(f'config.model.head={config.model.head!r} is unknown; '
                      "use 'classifier' or 'next_frame'")
  for key in ('num_steps', 'log_every', 'eval_every', 'checkpoint_every'):
    if config.train[key] <= 0:
      raise ConfigError(f'config.train.{key}={config.train[key]} must be > 0')
  for key in ('num_frames', 'batch_size', 'stride'):
    if not config.data[key] >= 1:
      raise ConfigError(f'config.data.{key}={config.data[key]} must be >= 1')
  depth = num - 1
  if config.mode != 'bp' and config.data.num_frames <= depth and not (
      config.train.stream or (config.get('progressive')
                              and config.progressive.enabled)):
    raise ConfigError(
        f'config.data.num_frames={config.data.num_frames} gives no loss tick '
        f'in {config.mode!r}: a fresh clip through {num} stages masks its '
        f'first {depth} ticks (use more than {depth} frames, or '
        'config.train.stream=True)')
  if config.train.on_nonfinite not in ('stop', 'skip'):
    raise ConfigError(f'config.train.on_nonfinite={config.train.on_nonfinite!r}'
                      " must be 'stop' or 'skip'")
  if config.optimizer.name not in optim.NAMES:
    raise ConfigError(f'config.optimizer.name={config.optimizer.name!r} is '
                      f'unknown; use one of {optim.NAMES}')
  if config.optimizer.schedule not in optim.SCHEDULES:
    raise ConfigError(f'config.optimizer.schedule={config.optimizer.schedule!r}'
                      f' is unknown; use one of {optim.SCHEDULES}')
  for key in ('learning_rate', 'weight_decay', 'warmup_steps',
              'warmup_start_lr'):
    if key not in config.optimizer:
      continue
    if not config.optimizer[key] >= 0 or (key == 'learning_rate'
                                          and not config.optimizer[key] > 0):
      raise ConfigError(f'config.optimizer.{key}={config.optimizer[key]} '
                        f'must be {">" if key == "learning_rate" else ">="} 0')
  devices = num_devices or jax.device_count()
  mesh_size = config.mesh.data * config.mesh.stage
  if mesh_size > devices:
    raise ConfigError(
        f'config.mesh ({config.mesh.data} data x {config.mesh.stage} stage = '
        f'{mesh_size} devices) is larger than the {devices} devices present')
  if config.data.batch_size % config.mesh.data:
    raise ConfigError(
        f'config.data.batch_size={config.data.batch_size} is not divisible by '
        f'the data axis config.mesh.data={config.mesh.data}')
  if mesh_size > 1:
    for error in _mesh_config_errors(config, num, devices):
      raise ConfigError(error)
  if config.train.flush < 0 or (config.train.flush and (
      config.train.update_every or config.train.stream)):
    raise ConfigError(
        f'config.train.flush={config.train.flush} must be >= 0, and 0 with '
        'config.train.update_every or config.train.stream (a flush ends a '
        'stream)')
  for error in multigrid.config_errors(config):
    raise ConfigError(error)
  if any(kind == 'convbn' for kind, _, _ in kinds):
    for error in _norm_config_errors(config):
      raise ConfigError(error)
  if config.train.update_every and config.data.num_frames % \
      config.train.update_every:
    raise ConfigError(
        f'config.train.update_every={config.train.update_every} must divide '
        f'config.data.num_frames={config.data.num_frames}')


def build_network(config: ml_collections.ConfigDict,
                  frame_shape: tuple[int, ...], num_classes: int,
                  rngs: nnx.Rngs) -> network.Network:
  """The network described by ``config.model`` for frames of ``frame_shape``."""
  layers, shape = [], tuple(frame_shape)  # Features of one frame, (..., C).
  for kind, out, stride in parse_stages(config.model.stages):
    width = shape[-1]
    out = out or width
    if kind == 'mlp':
      layers.append(stages.Mlp(int(np.prod(shape)), [out], rngs=rngs))
      shape = (out,)
      continue
    if kind == 'tconv':
      layers.append(stages.TemporalConv(width, rngs=rngs))
      continue
    if kind in ('conv', 'convbn'):
      base = config.model.get('norm_base_size', 8) if kind == 'convbn' else 0
      layers.append(stages.Conv(width, out, stride=stride,
                                norm_base_size=base, rngs=rngs))
    else:
      layers.append(stages.ResidualConv(width, out, stride=stride, rngs=rngs))
    shape = tuple(-(-d // stride) for d in shape[:-1]) + (out,)
  width = shape[-1]
  if config.model.head == 'classifier':
    head, loss = stages.ClassifierHead(width, num_classes, rngs=rngs), 'xent'
  else:
    h, w = frame_shape[:2]
    stride = (h // shape[0], w // shape[1]) if len(shape) == 3 else (1, 1)
    head = stages.FrameDecoderHead(
        width, frame_shape[:2], frame_shape[-1], rngs=rngs,
        upscale=math.gcd(4, h, w, *stride))  # Never above the net's stride.
    loss = 'mse'
  skips = [tuple(int(v) for v in e) for e in config.model.skips]
  try:
    return network.Network(layers, head, frame_shape=frame_shape, skips=skips,
                           combine=config.model.combine, loss=loss, rngs=rngs)
  except ValueError as e:
    raise ConfigError(f'config.model: {e}') from e


# ---------------------------------------------------------------------------
# The depth-parallel mesh: config.mesh.data x config.mesh.stage > 1.

def use_mesh(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config`` runs on the ``('data', 'stage')`` mesh engine."""
  return config.mesh.data * config.mesh.stage > 1


def parse_groups(value, num_stages: int,
                 num_devices: int) -> tuple[tuple[int, ...], ...]:
  """``config.mesh.groups`` -> one run of stages per device on 'stage'.

  ``value``: ``'0-1,2,3-4'`` (``a-b`` is stages a..b inclusive) or a tuple
  of tuples; trailing empty groups are added (``placement.validate_groups``).
  """
  if isinstance(value, str):
    groups = []
    for item in (s.strip() for s in value.split(',')):
      lo, _, hi = item.partition('-')
      try:
        groups.append(tuple(range(int(lo), int(hi or lo) + 1)))
      except ValueError as e:
        raise ValueError(f'item {item!r} is not a stage or a run a-b') from e
  else:
    groups = [tuple(g) for g in value]
  return placement.validate_groups(groups, num_stages, num_devices)


def _mesh_config_errors(config, num_stages: int, devices: int) -> list[str]:
  errors = []
  groups = config.mesh.get('groups')
  if groups:
    try:
      parse_groups(groups, num_stages, config.mesh.stage)
    except ValueError as e:
      errors.append(f'config.mesh.groups={groups!r}: {e}')
  size = config.mesh.data * config.mesh.stage
  if jax.process_count() > 1 and size != devices:
    errors.append(
        f'config.mesh ({config.mesh.data} x {config.mesh.stage}) must use all '
        f'{devices} devices of a multi-process job')
  return errors


def _norm_config_errors(config) -> list[str]:
  """Batch sizes sub-batch norm cannot split into equal groups of
  ``config.model.norm_base_size`` clips (per device and whole batch)."""
  base = config.model.norm_base_size
  batch = config.data.batch_size
  per_device = batch // config.mesh.data
  if base < 1:
    return [f'config.model.norm_base_size={base} must be >= 1']
  errors = []
  for what, b in (('config.data.batch_size', batch),
                  ('the batch per device (config.data.batch_size / '
                   'config.mesh.data)', per_device)):
    if b > base and b % base:
      errors.append(f'{what} = {b} does not split into sub-batches of '
                    f'config.model.norm_base_size={base} clips')
  return errors


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The ``config.mesh.data x config.mesh.stage`` mesh (global if
  multi-process; the first devices if the mesh is smaller than the job)."""
  size = config.mesh.data * config.mesh.stage
  devices = None if size == jax.device_count() else jax.devices()[:size]
  return mesh_lib.make_mesh(config.mesh.data, config.mesh.stage,
                            devices=devices)


def place(config: ml_collections.ConfigDict, spec: network.NetworkSpec,
          params: PyTree, mesh: jax.sharding.Mesh) -> mesh_lib.MeshSpec:
  """``spec`` on ``mesh``: ``config.mesh.groups`` if set, else groups
  balanced on each stage's XLA flops at the per-device batch."""
  groups = config.mesh.get('groups')
  if groups:
    return mesh_lib.place(spec, mesh, parse_groups(
        groups, spec.num_stages, mesh.shape['stage']), params=params)
  return mesh_lib.place(spec, mesh, params=params,
                        batch_size=config.data.batch_size // config.mesh.data)


def _replicated(mesh: jax.sharding.Mesh, tree: PyTree) -> PyTree:
  """Every leaf as a global array replicated over ``mesh`` (multi-process:
  each process holds the same value)."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
  return jax.tree.map(one, tree)


def _host(x) -> np.ndarray:
  """A (possibly multi-process) array as a host array on every process."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _data_shard(mesh: jax.sharding.Mesh, batch_size: int) -> tuple[int, int]:
  """``(shard_index, shard_count)`` of the rows this process feeds: its
  'data' rows (``mesh.process_rows``); processes that share rows (the
  'stage' axis spans them) load the same shard."""
  rows = mesh_lib.process_rows(mesh, batch_size)
  n = rows.stop - rows.start
  return rows.start // n, batch_size // n


def _eval_feed(eng, batches, batch_size: int, *, mode: str, compute_dtype,
               compiled=None):
  """``(batches, forward)`` for ``evaluate`` on engine ``eng`` (params in its
  state layout): every array of a batch as the engine takes it
  (``eng.put_batch``: global arrays on a mesh), outputs as host arrays.
  ``compiled(params, clip, targets)`` replaces ``_eval_step`` (multigrid:
  compiled ahead of time)."""
  def feed():
    for batch in batches:
      yield {k: eng.put_batch(np.asarray(v), batch_size)
             for k, v in batch.items()
             if k in ('video', 'target', 'label', 'mask')}

  def forward(params, clip, targets):
    out = (compiled(params, clip, targets) if compiled else _eval_step(
        eng, params, clip, targets, mode=mode, compute_dtype=compute_dtype))
    host = lambda x: None if x is None else _host(x)  # noqa: E731
    return out._replace(predictions=host(out.predictions),
                        example_loss=host(out.example_loss), metrics={
                            k: _host(v) for k, v in out.metrics.items()})
  return feed(), forward


# ---------------------------------------------------------------------------
# State and checkpoints.

@dataclasses.dataclass
class TrainState:
  """Everything a resumed run needs, besides the data iterator's JSON state.

  ``carry`` is the stream carry (``None`` unless ``train.stream``).
  """
  step: int
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  carry: PyTree = None

  def tree(self) -> dict:
    t = {'step': np.asarray(self.step, np.int64), 'params': self.params,
         'opt_state': self.opt_state, 'rng': jax.random.key_data(self.rng)}
    if self.carry is not None:
      t['carry'] = self.carry
    return t

  @classmethod
  def from_tree(cls, t: dict) -> 'TrainState':
    return cls(step=int(t['step']), params=t['params'],
               opt_state=t['opt_state'], rng=jax.random.wrap_key_data(t['rng']),
               carry=t.get('carry'))


# Keys a resumed run may change: they alter neither the train state nor what
# it means (cadence, length, where data lives, evaluation, the mesh layout:
# checkpoints are plain pytrees that restore on any mesh).
HARMLESS_KEYS = ('train.num_steps', 'train.log_every', 'train.eval_every',
                 'train.checkpoint_every', 'train.keep_checkpoints',
                 'train.on_nonfinite', 'eval.', 'mesh.', 'data.data_dir',
                 'data.prepare', 'data.num_threads', 'data.prefetch',
                 'data.num_workers', 'data.shard_index', 'data.shard_count',
                 'multigrid.compile_cache_dir', 'multigrid.compile_threads')


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """``(harmful, harmless)`` keys that differ between two flat configs
  (``_flat`` of their JSON). A key only one side has is harmless: a key
  added to (or dropped from) skipside since the run started."""
  changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
  harmless = [k for k in changed
              if any(k == h or (h.endswith('.') and k.startswith(h))
                     for h in HARMLESS_KEYS)]
  harmful = [k for k in changed if k not in harmless]
  return harmful, harmless + sorted(old.keys() ^ new.keys())


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                    restart: bool = False, move: bool = True) -> None:
  """Refuses a used ``workdir`` whose checkpoints ``config`` would not
  continue, before anything is written; with ``restart`` moves its run
  aside (``replaced-<time>/``: nothing is deleted; only where ``move``,
  the main process) and starts over.

  Raises:
    WorkdirConflictError: one line naming the differing keys and the ways
      out. Harmless differences (``HARMLESS_KEYS``) are printed and allowed.
  """
  path = os.path.join(workdir, 'config.json')
  ckpts = os.path.join(workdir, 'checkpoints')
  if not (os.path.exists(path) and os.path.isdir(ckpts)
          and any(d.isdigit() for d in os.listdir(ckpts))):
    return  # No run to continue (or a start-up that failed before saving).
  with open(path) as f:
    old = _flat(json.load(f))
  new = _flat(json.loads(config.to_json_best_effort(sort_keys=True)))
  harmful, harmless = config_changes(old, new)
  if harmful and restart:
    if not move:
      return
    aside = os.path.join(workdir, time.strftime('replaced-%Y%m%d-%H%M%S'))
    os.makedirs(aside)
    for name in os.listdir(workdir):
      if name != os.path.basename(aside) and not name.startswith('replaced-'):
        os.replace(os.path.join(workdir, name), os.path.join(aside, name))
    print(f'--restart: moved the previous run of {workdir} to {aside}',
          flush=True)
    return
  if harmful:
    shown = ', '.join(f'config.{k} ({old.get(k)!r} -> {new.get(k)!r})'
                      for k in harmful[:4])
    more = f' and {len(harmful) - 4} more' if len(harmful) > 4 else ''
    raise WorkdirConflictError(
        f'{workdir} holds a run of another config: {shown}{more} differ; '
        'use a new --workdir, or --restart to move that run aside and start '
        'over here')
  if harmless:
    note = (' (the learning-rate schedule and multigrid phases are sized in '
            'train.num_steps: they change from here on)'
            if 'train.num_steps' in harmless else '')
    print(f'Resuming {workdir} with changed '
          f'{", ".join("config." + k for k in harmless)}{note}', flush=True)


class Checkpointer:
  """orbax CheckpointManager over ``workdir/checkpoints``, keep-last-N.

  A checkpoint holds the train state (StandardSave) and two JSON items: the
  data iterator's state and ``meta`` (step, schedule position, mode).
  """

  def __init__(self, workdir: str, keep: int):
    self.workdir = os.path.abspath(workdir)
    self.manager = ocp.CheckpointManager(
        os.path.join(self.workdir, 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, state: TrainState, data_state: dict, meta: dict,
           wait: bool = False) -> None:
    self.manager.save(state.step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.tree()),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)))
    if wait:
      self.manager.wait_until_finished()

  def restore(self, like: TrainState | None = None, *, repair: bool = False):
    """Latest readable checkpoint as ``(state, data_state, meta)`` or ``None``.

    ``like`` gives the structure, shapes and dtypes to restore into; without
    it the saved tree comes back as saved (evaluation). A checkpoint that
    fails to restore (corrupt, truncated) is skipped with a warning and the
    previous one is tried. With ``repair`` (a training run) the unreadable
    ones newer than it are moved to ``workdir/unreadable_checkpoints/``
    (kept for inspection), so that the run saves those steps again: orbax
    saves no step older than the latest on disk.
    """
    abstract = None if like is None else jax.tree.map(
        ocp.utils.to_shape_dtype_struct, like.tree())
    unreadable, found = [], None
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
      except Exception as e:  # Any failure: fall back to the previous one.
        logging.warning('checkpoint at step %d is unreadable (%s: %s); '
                        'falling back to the previous one', step,
                        type(e).__name__, e)
        print(f'WARNING: checkpoint at step {step} is unreadable '
              f'({type(e).__name__}); falling back to the previous one',
              flush=True)
        unreadable.append(step)
        continue
      found = TrainState.from_tree(got.state), got.data, got.meta
      break
    if unreadable and found is None and like is not None:
      # Every checkpoint failing is a mismatch (code, config), not damage:
      # training from scratch would bury them.
      raise CheckpointMismatchError(
          f'no checkpoint in {self.workdir}/checkpoints restores into this '
          f'run\'s state (latest: step {unreadable[0]}); use a new '
          '--workdir, or --restart to move that run aside')
    if repair and unreadable:  # Older ones restored: the newer are damaged.
      self._move_aside(unreadable)
    return found

  def _move_aside(self, steps) -> None:
    """Unreadable step directories -> ``workdir/unreadable_checkpoints``."""
    aside = os.path.join(self.workdir, 'unreadable_checkpoints')
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        src = os.path.join(self.workdir, 'checkpoints', str(step))
        dst = os.path.join(aside, time.strftime(f'{step}-%Y%m%d-%H%M%S'))
        os.replace(src, dst)
        print(f'Moved the unreadable checkpoint at step {step} to {dst}',
              flush=True)
    if jax.process_count() > 1:  # Every process sees the move, then reloads.
      multihost_utils.sync_global_devices('skipside_unreadable_checkpoints')
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------------------
# Metrics.

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


# ---------------------------------------------------------------------------
# Steps.

@functools.partial(jax.jit, static_argnames=('eng', 'optimizer', 'mode',
                                             'compute_dtype', 'update_every',
                                             'flush', 'skip_nonfinite'),
                   donate_argnames=('params', 'opt_state'))
def _train_step(eng, optimizer, params, opt_state, clip, targets, carry, *,
                mode, compute_dtype, update_every, flush, skip_nonfinite):
  """The loop's step on any engine (``engine.LocalEngine``,
  ``mesh.MeshEngine``): ``params`` and ``opt_state`` in its state layout,
  donated; the carry in and out as an ``engine.StreamCarry`` (checkpoints
  fit every engine)."""
  new = eng.train_step(optimizer, params, opt_state, clip, targets,
                       mode=mode, carry=carry, compute_dtype=compute_dtype,
                       update_every=update_every, flush=flush)
  out = new[2]
  out = out._replace(carry=eng.to_stream_carry(out.carry))
  params, opt_state = optim.finish_step(
      (params, opt_state), new[:2], out.metrics['loss'],
      skip_nonfinite=skip_nonfinite)
  return params, opt_state, out


@functools.partial(jax.jit, static_argnames=('eng', 'mode', 'compute_dtype'))
def _eval_step(eng, params, clip, targets, *, mode, compute_dtype):
  """The loop's evaluation forward on any engine (params in its layout)."""
  out = eng.forward(params, clip, targets, mode=mode,
                    compute_dtype=compute_dtype)
  return out._replace(carry=None)


def _targets(batch: dict, spec: network.NetworkSpec) -> np.ndarray:
  return batch['target'] if spec.loss == 'mse' else batch['label']


def eval_params(config: ml_collections.ConfigDict, spec: network.NetworkSpec,
                params: PyTree, data_config, moments_fn=None) -> PyTree:
  """The params evaluation uses: with sub-batch norm stages, their population
  statistics over ``config.eval.norm_batches`` training batches
  (``batchnorm.population_statistics``), else ``params`` unchanged.

  Every process reads the same batches (shard 0 of 1), so all of them set
  the same statistics. The result lives on the host's default device.
  """
  if not batchnorm.has_norms(spec, params):
    return params
  dc = data_config.copy_and_resolve_references()
  dc.shard_index, dc.shard_count = 0, 1
  it = data_lib.make_iterator(dc, train=True)
  try:
    clips = (next(it)['video'] for _ in range(config.eval.norm_batches))
    return batchnorm.population_statistics(
        spec, jax.tree.map(_host, params), clips, moments_fn=moments_fn)
  finally:
    it.close()


def evaluate(spec: network.NetworkSpec, params: PyTree, batches, *, mode: str,
             compute_dtype=jnp.float32, max_batches: int | None = None,
             forward=None) -> dict:
  """Clip-level metrics over an eval iterator (one pass).

  ``forward(params, clip, targets) -> ClipOutput`` replaces
  ``engine.forward`` (e.g. ``_eval_step`` on an engine, or an executable of
  it compiled ahead of time).

  Classification: top-1 accuracy of the logits averaged over the valid ticks
  of each clip (and mAP for multi-hot labels); next-frame: MSE. Padded and
  unreadable clips (``mask`` False) are left out.
  """
  loss_sum, n, correct, scores, labels = 0.0, 0, 0.0, [], []
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    mask = _host(batch.get('mask', np.ones(len(batch['video']), bool)))
    if forward is None:
      out, _ = engine.forward(spec, params, batch['video'],
                              _targets(batch, spec), mode=mode,
                              compute_dtype=compute_dtype)
    else:
      out = forward(params, batch['video'], _targets(batch, spec))
    k = int(mask.sum())
    if out.example_loss is not None:  # Padded clips left out.
      loss_sum += float(np.asarray(out.example_loss)[mask].sum())
    else:  # A batch mean: exact without padding.
      loss_sum += float(out.metrics['loss']) * k
    n += k
    if out.predictions is not None:
      pred = np.asarray(out.predictions)[mask]
      label = _host(batch['label'])[mask]
      if spec.loss == 'xent':
        correct += float((pred.argmax(-1) == label).sum())
      else:
        scores.append(pred)
        labels.append(label)
  metrics = {'eval/loss': loss_sum / max(n, 1), 'eval/clips': n}
  if spec.loss == 'xent':
    metrics['eval/accuracy'] = correct / max(n, 1)
  elif spec.loss == 'sigmoid_xent' and scores:
    metrics['eval/mAP'] = mean_average_precision(np.concatenate(scores),
                                                 np.concatenate(labels))
  else:
    metrics['eval/next_frame_mse'] = metrics['eval/loss']
  return metrics


# ---------------------------------------------------------------------------
# The loop.

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


def _data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.data.to_dict())
  if config.model.head == 'next_frame':
    c.task = 'next_frame'
  return c


def _frame_shape(info) -> tuple[int, ...]:
  return tuple(info.element_shape[1:])


def _progress(total: int, initial: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
              mininterval=1.0, disable=jax.process_index() != 0)


def init_state(config: ml_collections.ConfigDict, info,
               schedule: multigrid.Schedule | None = None
               ) -> tuple[network.NetworkSpec, optax.GradientTransformation,
                          TrainState]:
  """The network, optimizer and a fresh train state for data with ``info``
  (the optimizer's LR follows a multigrid ``schedule`` if given)."""
  net = build_network(config, _frame_shape(info), info.num_classes,
                      nnx.Rngs(config.seed))
  spec, params = network.split(net)
  trainable = functools.partial(network.trainable_mask, spec)
  # Only a net with batch statistics pays for the mask in optimizer state.
  masked = not all(jax.tree.leaves(trainable(params)))
  optimizer = optim.make_optimizer(config, schedule,
                                   trainable=trainable if masked else None)
  state = TrainState(step=0, params=params, opt_state=optimizer.init(params),
                     rng=jax.random.key(config.seed))
  return spec, optimizer, state


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


def _abstract_carry(config, spec, params, info):
  """Shapes of the stream carry of a global training batch."""
  b, t = config.data.batch_size, config.data.num_frames
  frame = tuple(info.element_shape[1:])
  clip = jax.ShapeDtypeStruct((b, t, *frame), jnp.float32)
  targets = (jax.ShapeDtypeStruct((b, t, *frame), jnp.float32)
             if spec.loss == 'mse' else jax.ShapeDtypeStruct((b,), jnp.int32))
  return jax.eval_shape(lambda: engine.init_carry(
      spec, params, clip, targets, config.mode, PRECISIONS[config.precision]))


def evaluate_workdir(workdir: str,
                     config: ml_collections.ConfigDict | None = None) -> dict:
  """Evaluates the latest checkpoint of ``workdir`` on the eval split.

  ``config`` defaults to the run's own ``workdir/config.json``.
  """
  if config is None:
    with open(os.path.join(workdir, 'config.json')) as f:
      config = ml_collections.ConfigDict(json.load(f))
  validate_config(config)
  data_config = _data_config(config)
  it = data_lib.make_eval_iterator(data_config)
  try:
    spec, _, state = init_state(config, it.info)
    if config.train.stream:  # The checkpoint holds a carry: restore into one.
      state.carry = _abstract_carry(config, spec, state.params, it.info)
    ckpt = Checkpointer(workdir, config.train.keep_checkpoints)
    # Restoring into this process's own structure (not the saved one) lets a
    # checkpoint written on other devices or processes load here.
    restored = ckpt.restore(state)
    ckpt.close()
    if restored is None:
      raise FileNotFoundError(f'no readable checkpoint in {workdir}/checkpoints')
    state = restored[0]
    params = eval_params(config, spec, state.params, data_config)
    metrics = evaluate(spec, params, it, mode=config.mode,
                       compute_dtype=PRECISIONS[config.precision],
                       max_batches=config.eval.max_batches or None)
  finally:
    it.close()
  return {'step': state.step, **metrics}


def _compile_multigrid(config, eng, optimizer, state, schedule, info,
                       compute_dtype, tree_params):
  """Every train shape of ``schedule`` and the eval shape, compiled ahead of
  time: ``(train step table, eval forward table)`` (``multigrid.BucketTable``,
  keyed by the clip shape the loop passes: per process on one device, global
  on a mesh).

  Each bucket runs the loop's own step functions (``_train_step``,
  ``_eval_step``, PGT's ``make_train_step``) on engine ``eng`` with the spec
  of its frame size (``network.for_frame_shape``; on a mesh the same stage
  groups). ``state``: the train state in the engine's layout;
  ``tree_params``: the params pytree's shapes.
  """
  static = dict(mode=config.mode, compute_dtype=compute_dtype,
                update_every=None, flush=config.train.flush,
                skip_nonfinite=config.train.on_nonfinite == 'skip')
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
      raise ConfigError(f'multigrid bucket of clip shape {key}: {e} '
                        '(config.mesh.data)') from e

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
        raise ConfigError(f'multigrid bucket of clip shape {key}: '
                          f'config.progressive: {e}') from e
      step = progressive.make_train_step(
          bucket_engine(key), optimizer, config,
          compute_dtype=compute_dtype, skip_nonfinite=static['skip_nonfinite'])
      return step.lower(params, opt_state, clip, targets, None)
    return _train_step.lower(bucket_engine(key), optimizer, params,
                             opt_state, clip, targets, None, **static)

  def lower_eval(local_key):
    clip, targets = abstract(local_key)
    return _eval_step.lower(bucket_engine(tuple(clip.shape)), params, clip,
                            targets,
                            mode=config.mode, compute_dtype=compute_dtype)

  channels = info.element_shape[-1]
  local_keys = [multigrid.clip_spec(s, channels, info.shard_count)[0].shape
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
  (``WorkdirConflictError``) unless ``restart``, which moves that run aside
  (``prepare_workdir``).

  Returns a summary: final step, last train and eval metrics, wall time,
  ``'preempted': True`` if a SIGTERM or Ctrl-C ended the run early,
  ``compile_s``
  (multigrid: every shape compiled before the loop) and
  ``compilations_in_loop`` (XLA compilations of steps and evaluations after
  the loop started, checkpoint writes aside; 0 with multigrid).
  """
  validate_config(config)
  is_main = jax.process_index() == 0
  # Before anything is written: config.json describes the checkpoints.
  prepare_workdir(config, workdir, restart=restart, move=is_main)
  if jax.process_count() > 1:  # Every process checked before main writes.
    multihost_utils.sync_global_devices('skipside_workdir_checked')
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  data_config = _data_config(config)
  mesh = make_mesh(config) if use_mesh(config) else None
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
      raise ConfigError(str(e)) from e
    # Before the iterator's threads and any compile: buckets too short for
    # the pipeline would make zero-gradient steps.
    for error in multigrid.depth_errors(
        schedule, len(parse_stages(config.model.stages)) - 1, config.mode):
      raise ConfigError(error)
    train_iter = multigrid.MultigridIterator(data_config, schedule, source)
    if is_main:
      print(f'Multigrid schedule ({schedule.num_steps} steps):\n'
            f'{schedule.table()}', flush=True)
  else:
    train_iter = data_lib.make_iterator(data_config, train=True)
  spec, optimizer, state = init_state(config, train_iter.info, schedule)
  starved = starved_stages_warning(config, spec, schedule)
  if starved and is_main:
    logging.warning(starved)
    print(f'WARNING: {starved}', flush=True)
  compute_dtype = PRECISIONS[config.precision]
  if config.train.stream:
    batch = next(data_lib.make_iterator(data_config, train=True))
    clip, targets = batch['video'], _targets(batch, spec)
    if mesh is not None:  # The carry holds the global batch.
      clip, targets = (jax.ShapeDtypeStruct(
          (config.data.batch_size, *x.shape[1:]), x.dtype)
                       for x in (clip, targets))
    state.carry = engine.init_carry(spec, state.params, clip, targets,
                                    config.mode, compute_dtype)
  mspec = None
  if mesh is not None:  # Same pytrees, replicated: checkpoints fit both.
    mspec = place(config, spec, state.params, mesh)
    state = dataclasses.replace(
        state, params=_replicated(mesh, state.params),
        opt_state=_replicated(mesh, state.opt_state),
        carry=_replicated(mesh, state.carry),
        rng=jax.random.wrap_key_data(
            _replicated(mesh, jax.random.key_data(state.rng))))

  ckpt = Checkpointer(workdir, config.train.keep_checkpoints)
  try:
    restored = ckpt.restore(state, repair=True)
  except CheckpointMismatchError:
    ckpt.close()
    train_iter.close()
    raise
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

  def as_tree(state: TrainState) -> TrainState:
    """``state`` with params and optimizer state as pytrees."""
    return dataclasses.replace(state, params=eng.to_tree(state.params),
                               opt_state=eng.to_tree(state.opt_state))

  writer = MetricWriter(workdir, enabled=is_main)
  step_fn = functools.partial(
      _train_step, eng, optimizer, mode=config.mode,
      compute_dtype=compute_dtype,
      update_every=config.train.update_every or None,
      flush=config.train.flush,
      skip_nonfinite=config.train.on_nonfinite == 'skip')
  eval_forward, norm_moments, compile_s = None, None, 0.0
  if schedule is not None:  # Every shape compiled before the first step.
    step_fn, eval_forward = _compile_multigrid(
        config, eng, optimizer, state, schedule, train_iter.info,
        compute_dtype, tree_params)
    compile_s = step_fn.wall_seconds + eval_forward.wall_seconds
    if batchnorm.has_norms(spec, tree_params):  # Its statistics pass too.
      norm_moments = _compile_norm_moments(spec, tree_params,
                                           train_iter.info)
      compile_s += norm_moments.wall_seconds
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
      params = eval_params(config, spec, eng.to_tree(params), data_config,
                           norm_moments)
      params = eng.to_state(params if mesh is None else
                            _replicated(mesh, params))
    it = data_lib.make_eval_iterator(data_config)
    batches, forward = _eval_feed(
        eng, it, config.data.batch_size, mode=config.mode,
        compute_dtype=compute_dtype, compiled=eval_forward)
    try:
      return evaluate(spec, params, batches, mode=config.mode,
                      compute_dtype=compute_dtype,
                      max_batches=config.eval.max_batches or None,
                      forward=forward)
    finally:
      it.close()

  as_tree(state)  # Compile the pytree conversions before the loop counts.
  total = schedule.num_steps if schedule else config.train.num_steps
  summary = {'preempted': False, 'start_step': state.step}
  train_metrics, eval_metrics = {}, {}
  clips, t0, t_log = 0, time.time(), time.time()
  bar = _progress(total, state.step)
  with _Preemption().installed() as preemption, \
      multigrid.CompileCounter() as compiles:
    while state.step < total:
      batch = next(train_iter)
      clip, targets = batch['video'], _targets(batch, spec)
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
      loss = float(out.metrics['loss'])
      if not np.isfinite(loss):
        if config.train.on_nonfinite == 'stop':
          bar.close()
          ckpt.close()
          writer.close()
          raise NonFiniteLossError(
              f'non-finite loss {loss} at step {state.step + 1}; stopping. The '
              f'last good checkpoint in {workdir}/checkpoints is kept '
              "(set config.train.on_nonfinite='skip' to skip such steps)")
        logging.warning('non-finite loss at step %d: update skipped',
                        state.step + 1)
        summary['skipped_steps'] = summary.get('skipped_steps', 0) + 1
      state = dataclasses.replace(
          state, step=state.step + 1, params=params, opt_state=opt_state,
          carry=out.carry if config.train.stream else None)
      clips += len(batch['video'])
      bar.update(1)
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
        with compiles.paused():
          ckpt.save(as_tree(state), train_iter.get_state(), meta())
      if state.step % config.train.eval_every == 0 or state.step == total:
        eval_metrics = run_eval()
        writer.write(state.step, eval_metrics)
        if is_main:
          bar.write(f'step {state.step}: ' + ', '.join(
              f'{k}={v:.4f}' for k, v in eval_metrics.items()))
      if preemption.requested and state.step < total:
        with compiles.paused():
          ckpt.save(as_tree(state), train_iter.get_state(), meta(),
                    wait=True)
        summary['preempted'] = True
        if is_main:
          bar.write(f'{preemption.requested}: saved a checkpoint at step '
                    f'{state.step}; exiting. Run again with the same '
                    '--workdir to resume.')
        break
  bar.close()
  ckpt.close()
  writer.close()
  train_iter.close()
  summary.update(step=state.step, wall_s=time.time() - t0, **train_metrics,
                 **eval_metrics, compile_s=compile_s,
                 compilations_in_loop=compiles.count)
  return summary
