"""What a config describes: its validation, the network, the mesh.

Every key is in ``experiments/configs/default.py``. Errors are
``ConfigError``s whose message names the key (the launcher prints them as
one line).

Example::

    from experiments.configs import default
    config = default.get_config('tiny')
    config_lib.validate_config(config)
    net = config_lib.build_network(config, (32, 32, 1), 4, nnx.Rngs(0))
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from skipside import engine, multigrid, network, optim, placement, stages
from skipside import mesh as mesh_lib

PyTree = Any


PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


STAGE_KINDS = ('conv', 'convbn', 'res', 'tconv', 'mlp')


class ConfigError(ValueError):
  """A config value is wrong; the message names the key."""


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
  data = mesh_axes(config)[0]
  if config.data.batch_size % data:
    axis = (f'the data axis config.mesh.data={data}' if data == config.mesh.data
            else f"the {data} devices of this multi-process job (all on "
            "'data' when config.mesh is 1 x 1)")
    raise ConfigError(
        f'config.data.batch_size={config.data.batch_size} is not divisible by '
        f'{axis}')
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


def mesh_axes(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """``(data, stage)`` of the run's mesh: ``config.mesh``, except that a
  multi-process job that sets neither (1 x 1) puts every device on 'data':
  data parallelism, each process loading its own rows of the global batch
  (one process per host would otherwise train alone)."""
  data, stage = config.mesh.data, config.mesh.stage
  if data * stage == 1 and jax.process_count() > 1:
    return jax.device_count(), 1
  return data, stage


def use_mesh(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config`` runs on the ``('data', 'stage')`` mesh engine."""
  data, stage = mesh_axes(config)
  return data * stage > 1


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
  per_device = batch // mesh_axes(config)[0]
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
  data, stage = mesh_axes(config)
  size = data * stage
  devices = None if size == jax.device_count() else jax.devices()[:size]
  return mesh_lib.make_mesh(data, stage, devices=devices)


def place(config: ml_collections.ConfigDict, spec: network.NetworkSpec,
          params: PyTree, mesh: jax.sharding.Mesh) -> mesh_lib.MeshSpec:
  """``spec`` on ``mesh``: ``config.mesh.groups`` if set, else groups
  balanced on each stage's XLA flops at the per-device batch."""
  groups = config.mesh.get('groups')
  if groups:
    return mesh_lib.place(spec, mesh, parse_groups(
        groups, spec.num_stages, mesh.shape['stage']), params=params)
  return mesh_lib.place(spec, mesh, params=params,
                        batch_size=config.data.batch_size // mesh.shape['data'])


def data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.data.to_dict())
  if config.model.head == 'next_frame':
    c.task = 'next_frame'
  return c


def frame_shape_of(info) -> tuple[int, ...]:
  return tuple(info.element_shape[1:])
