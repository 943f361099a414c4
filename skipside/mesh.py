"""The depth-parallel engine on a ``('data', 'stage')`` mesh (DESIGN.md §2).

The same modes, networks, loss normalization, fill masking, flush and target
alignment as ``skipside.engine`` (the oracle), executed as one SPMD program:

- each device on the ``stage`` axis holds one *group* of consecutive stages
  (``placement``); the batch is split over ``data``;
- a clip is one ``lax.scan`` over ticks inside one ``jax.shard_map`` inside one
  ``jax.jit``; in every tick each device runs its own group through
  ``lax.switch`` on ``lax.axis_index('stage')``, and each branch is the
  tick of ``skipside.tick`` (``forward_group`` / ``sideways_group``) over the
  device's group, with a transport (``_transport``) that reads an in-edge
  from the device's own buffer or from the round buffer that brought it;
- every edge between devices (chain or skip, any span) moves through
  ``lax.ppermute``: one *round* per device offset ``d``, each device sending
  one padded buffer to the device ``d`` above it (activations) or below it
  (Sideways gradient messages, same buffer layout, summed by the receiver);
- the head and the loss run on the device of the top stage, in the same tick;
- only stage 0 reads frames, so no device keeps the whole clip: with ``T``
  divisible by the 'stage' axis each device holds ``T / S`` consecutive
  frames (``time_sharded``, ``batch_sharding``; per-frame targets too) and
  each tick's frame reaches the devices from its holder (one ``psum`` of one
  frame per tick). A device's share of a clip shrinks with the stage axis,
  and Sideways' per-device memory grows only by that share with ``T``.

Heterogeneous stages are the normal case. Per device, parameters are raveled
and padded to one length and stacked as ``[S, P]`` (sharded over ``stage``);
each device's stage outputs, messages and temporal states live in one padded
per-example buffer ``(B, W)``; each branch packs the outputs it sends (and
the messages) into one padded buffer per round. Every padded slot holds
``pad_value`` (NaN in tests: nothing padded ever reaches a result); the
gradient of every padded parameter slot is exactly zero.

Modes on the mesh:

- ``pipelined_bp`` / ``sideways``: every stage computes every tick, one round
  of transfers per tick.
- ``bp`` (synchronous, the baseline): a frame passes all stages within its
  tick, so the devices run one after the other inside the tick (one phase per
  device; a device waits for its predecessors' ``ppermute``). Slow by design.
- ``pipelined_bp`` and ``bp`` take ``jax.grad`` through the whole mesh program
  (``ppermute`` transposes to the reverse permutation); each device's tick is
  rematerialized, so a device saves its own padded operands per tick, not
  the residuals of every branch of the switch.

Params keep the ``network.split`` pytree structure in and out of
``loss_and_grads``, ``forward`` and ``train_step``. A training loop keeps a
*sharded* train state instead (``shard_tree``, ``train_step_sharded``,
``unshard_tree``), in one of two layouts (``MeshSpec.state_sharding``):
``'stage'``, the packed ``[S, P]`` params and an optimizer state of the same
layout sharded over ``stage``, or ``'even'``, the same values unpadded in
one vector split evenly over every device (ZeRO), each window gathering its
rows; donated to every step; evaluation runs
on it (``forward_sharded``) and checkpoints hold the pytree, so they do not
care which engine ran. ``MeshEngine`` is this engine behind the interface
every runner uses (``engine.LocalEngine``'s methods). The stream carry has a
mesh layout (``MeshCarry``); ``to_stream_carry`` / ``from_stream_carry``
convert it to and from ``engine.StreamCarry`` exactly.

Example::

    mesh = make_mesh(data=2, stage=4)
    mspec = place(spec, mesh, params=params)        # flops-balanced groups
    loss, grads, out = loss_and_grads(mspec, params, clip, labels,
                                      mode='sideways')
    loss, grads, out = loss_and_grads(mspec, params, clip2, labels,
                                      mode='sideways', carry=out.carry)
    params, opt_state, out = train_step(mspec, optimizer, params, opt_state,
                                        clip, labels, mode='sideways')

Multi-host: every process builds the same global mesh (``make_mesh`` after
``jax.distributed.initialize``), loads only ``process_rows(...)`` of the
batch and turns them into a global array with ``global_batch`` (each device
receiving only its own rows and frames).
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from skipside import engine
from skipside import placement
from skipside import tick as tick_lib
from skipside import conv
from skipside.conv import varying_axes
from skipside.network import NetworkSpec

PyTree = Any
AXES = ('data', 'stage')
STATE_SHARDINGS = ('stage', 'even')
MODES = engine.MODES


# -- Mesh, placement, process-local data. ------------------------------------

def make_mesh(data: int, stage: int, *, devices=None) -> Mesh:
  """A ``('data', 'stage')`` mesh of ``data * stage`` devices.

  Axis types are ``Auto``: ``jit`` reshards arguments to the engine's specs,
  so callers pass ordinary arrays (with ``Explicit`` axes every caller would
  have to ``jax.reshard`` and enter ``jax.set_mesh``).
  """
  return jax.make_mesh((data, stage), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """A network placed on a mesh. Hashable by value (a static jit argument:
  equal placements of equal networks share their compilations).

  Attributes:
    spec: the network's static structure.
    mesh: a mesh with axes ``('data', 'stage')``.
    groups: one tuple of consecutive stages per device on ``stage``.
    costs: the per-stage costs the groups were balanced on (``None`` if
      given explicitly).
    pad_value: fills every padded slot of every buffer.
    param_shapes: ``(treedef, ((shape, dtype), ...))`` of the params when
      ``place`` was given them: what the sharded train state
      (``shard_tree``, ``train_step_sharded``) is laid out by
      (``params_like``).
    state_sharding: the train state's layout (``STATE_SHARDINGS``):
      ``'stage'``, packed ``(S, P)`` over 'stage' (each device its own
      group's, padded to the widest group, replicated over 'data'); or
      ``'even'``, the same values unpadded in one flat vector spread evenly
      over every device of the mesh (ZeRO / FSDP), each step gathering its
      group's rows from it and scattering the gradient back.
  """
  spec: NetworkSpec
  mesh: Mesh
  groups: tuple[tuple[int, ...], ...]
  costs: tuple[float, ...] | None = None
  pad_value: float = 0.0
  param_shapes: tuple | None = None
  state_sharding: str = 'stage'
  # Layouts per (params' shapes, activation dtype), built on first use; they
  # live as long as this spec (no module-global cache keeps specs alive).
  plans: dict = dataclasses.field(default_factory=dict, repr=False,
                                  compare=False)

  @property
  def params_like(self) -> PyTree:
    """The params' ``ShapeDtypeStruct`` pytree (``None`` if not given)."""
    if self.param_shapes is None:
      return None
    treedef, leaves = self.param_shapes
    return jax.tree.unflatten(
        treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])

  @property
  def num_data(self) -> int:
    return self.mesh.shape['data']

  @property
  def num_stage(self) -> int:
    return self.mesh.shape['stage']

  @property
  def device_of(self) -> tuple[int, ...]:
    """The ``stage``-axis index of each network stage."""
    return tuple(g for l in range(self.spec.num_stages)
                 for g, grp in enumerate(self.groups) if l in grp)


def place(spec: NetworkSpec, mesh: Mesh, groups=None, *, params=None,
          costs: Sequence[float] | None = None, batch_size: int = 1,
          pad_value: float = 0.0, state_sharding: str = 'stage') -> MeshSpec:
  """Places ``spec`` on ``mesh``: groups of consecutive stages per device.

  Args:
    groups: explicit placement (one run of consecutive stages per device;
      missing trailing groups are empty). Overrides everything else.
    params: the params (or their ``ShapeDtypeStruct``s): recorded as
      ``params_like`` for the sharded train state; if no
      ``groups``/``costs`` are given, stages are balanced on the flops XLA
      counts for each stage's forward + backward (``placement.stage_costs``).
    costs: per-stage costs to balance on (e.g. measured times).
    batch_size: per-device batch for the flops count.
    pad_value: value of every padded buffer slot (NaN proves no leaks).
    state_sharding: the train state's layout, ``'stage'`` or ``'even'``
      (``MeshSpec.state_sharding``).

  Without ``groups``, ``costs`` or ``params`` stages are balanced by count.
  """
  if tuple(mesh.axis_names) != AXES:
    raise ValueError(f'the mesh axes must be {AXES}, got {mesh.axis_names}')
  if state_sharding not in STATE_SHARDINGS:
    raise ValueError(f'state_sharding {state_sharding!r}: expected one of '
                     f'{STATE_SHARDINGS}')
  num_stage = mesh.shape['stage']
  like = None if params is None else (
      jax.tree.structure(params),
      tuple((tuple(x.shape), jnp.dtype(x.dtype))
            for x in jax.tree.leaves(params)))
  if groups is not None:
    return MeshSpec(spec, mesh, placement.validate_groups(
        groups, spec.num_stages, num_stage), None, pad_value, like,
                    state_sharding)
  if costs is None and params is not None:
    costs = placement.stage_costs(spec, params, batch_size)
  weights = costs if costs is not None else (1.0,) * spec.num_stages
  if len(weights) != spec.num_stages:
    raise ValueError(f'{len(weights)} costs for {spec.num_stages} stages')
  return MeshSpec(spec, mesh, placement.balance(weights, num_stage),
                  None if costs is None else tuple(costs), pad_value, like,
                  state_sharding)


def time_sharded(mesh: Mesh, shape: Sequence[int]) -> bool:
  """Whether a batch leaf of ``shape`` is split over 'stage' along time.

  A clip ``(B, T, *frame)`` is read only by the device of stage 0, one frame
  per tick, so no device needs the whole clip: with ``T`` divisible by the
  'stage' axis each device holds ``T / S`` frames, and the frame of a tick
  reaches stage 0 from its holder (``_frame_reader``). Leaves of rank < 3
  (labels) and clips of other lengths stay whole on every stage device.
  """
  num_stage = mesh.shape['stage']
  return (len(shape) >= 3 and num_stage > 1 and shape[1] >= num_stage
          and shape[1] % num_stage == 0)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """The sharding of a batch leaf: rows over 'data', time over 'stage' where
  ``time_sharded``."""
  return NamedSharding(
      mesh, P('data', 'stage') if time_sharded(mesh, shape) else P('data'))


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of a global batch this process must load (its 'data' shards)."""
  sharding = NamedSharding(mesh, P('data'))
  index = sharding.addressable_devices_indices_map((global_batch_size,))
  starts = [i[0].start or 0 for i in index.values()]
  stops = [global_batch_size if i[0].stop is None else i[0].stop
           for i in index.values()]
  return slice(min(starts), max(stops))


def global_batch(mesh: Mesh, local: PyTree, global_batch_size: int) -> PyTree:
  """Process-local rows (``process_rows``) -> global arrays.

  Each leaf of ``local`` is ``(rows, ...)``; the result is ``(B, ...)`` with
  ``B = global_batch_size``, sharded as ``batch_sharding`` says: rows over
  ``data``, a clip's frames over ``stage`` (each device receives only its
  own shard, whichever process holds the other stage devices).
  """
  rows = process_rows(mesh, global_batch_size)

  def one(x):
    x = np.asarray(x)
    shape = (global_batch_size, *x.shape[1:])

    def shard(index):  # Global index -> this process's local rows.
      r = index[0]
      start = (r.start or 0) - rows.start
      stop = (shape[0] if r.stop is None else r.stop) - rows.start
      return x[(slice(start, stop),) + tuple(index[1:])]
    return jax.make_array_from_callback(shape, batch_sharding(mesh, shape),
                                        shard)
  return jax.tree.map(one, local)


# -- The static layout of every buffer. ---------------------------------------

@dataclasses.dataclass(frozen=True)
class _Slot:
  """A contiguous slice of a flat buffer holding one array of ``shape``."""
  offset: int
  shape: tuple[int, ...]

  @property
  def size(self) -> int:
    return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class _Round:
  """Transfers between devices ``d`` apart on the ``stage`` axis.

  ``payload[g]``: stages of device ``g`` whose outputs device ``g + d`` reads
  (and whose messages it sends back); ``slots[k]``: where stage ``k`` sits in
  its sender's buffer.
  """
  offset: int
  payload: tuple[tuple[int, ...], ...]
  slots: dict
  width: int
  up: tuple[tuple[int, int], ...]  # ppermute pairs, activations.

  @property
  def down(self) -> tuple[tuple[int, int], ...]:  # Messages.
    return tuple((b, a) for a, b in self.up)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about a placed network at one batch size."""
  mspec: MeshSpec
  device_of: tuple[int, ...]
  param_defs: tuple  # Per stage, then the head: (treedef, [_Slot]).
  param_width: int
  dtype: Any
  out_slots: tuple[_Slot, ...]
  out_width: int
  state_defs: tuple  # Per stage: (treedef, [_Slot]).
  state_width: int
  rounds: tuple[_Round, ...]
  round_of: dict  # Device offset -> round index.
  act_dtype: Any  # Activations, messages, states, transfers.

  @property
  def spec(self) -> NetworkSpec:
    return self.mspec.spec

  @property
  def top_device(self) -> int:
    return self.device_of[-1]


def _layout(groups, shapes_of) -> tuple[dict, int]:
  """Offsets of each key's items per device; returns (slots, max width)."""
  slots, width = {}, 1
  for grp in groups:
    offset = 0
    for key in grp:
      items = []
      for shape in shapes_of(key):
        items.append(_Slot(offset, tuple(shape)))
        offset += items[-1].size
      slots[key] = items
    width = max(width, offset)
  return slots, width


def _make_plan(mspec: MeshSpec, params: PyTree, act_dtype) -> _Plan:
  spec, groups = mspec.spec, mspec.groups
  num = spec.num_stages
  device_of = mspec.device_of
  leaves = jax.tree.leaves(params)
  dtypes = {jnp.dtype(x.dtype) for x in leaves}
  if len(dtypes) != 1:
    raise ValueError(f'the mesh engine needs one parameter dtype, got {dtypes}')

  trees = list(params['blocks']) + [params['head']]
  defs = [jax.tree.structure(t) for t in trees]
  head_key = num  # The head rides with the top stage.
  param_groups = [list(g) + ([head_key] if device_of[-1] == i else [])
                  for i, g in enumerate(groups)]
  pslots, pwidth = _layout(param_groups, lambda k: [
      x.shape for x in jax.tree.leaves(trees[k])])

  out_slots, owidth = _layout(groups, lambda l: [spec.out_shapes[l]])

  states = jax.eval_shape(lambda p: spec.init_states(p, 2), params)
  for l, s in enumerate(states):
    for x in jax.tree.leaves(s):
      if x.shape[:1] != (2,):
        raise ValueError(f'the temporal state of stage {l} must be batch-first')
  sslots, swidth = _layout(groups, lambda l: [
      x.shape[1:] for x in jax.tree.leaves(states[l])])

  num_dev = len(groups)
  offsets = sorted({device_of[l] - device_of[k] for l in range(1, num)
                    for k in spec.in_edges[l]} - {0})
  rounds = []
  for d in offsets:
    payload = tuple(
        tuple(k for k in groups[g] if g + d < num_dev and any(
            device_of[l] == g + d for l in spec.out_edges[k]))
        for g in range(num_dev))
    width, slots = 1, {}
    for g in range(num_dev):
      offset = 0
      for k in payload[g]:
        slots[k] = _Slot(offset, spec.out_shapes[k])
        offset += slots[k].size
      width = max(width, offset)
    up = tuple((g, g + d) for g in range(num_dev) if payload[g])
    rounds.append(_Round(d, payload, slots, width, up))

  return _Plan(
      mspec=mspec, device_of=device_of,
      param_defs=tuple((defs[k], tuple(pslots[k])) for k in range(num + 1)),
      param_width=pwidth, dtype=dtypes.pop(),
      out_slots=tuple(out_slots[l][0] for l in range(num)), out_width=owidth,
      state_defs=tuple((jax.tree.structure(states[l]), tuple(sslots[l]))
                       for l in range(num)),
      state_width=swidth, rounds=tuple(rounds),
      round_of={r.offset: i for i, r in enumerate(rounds)},
      act_dtype=jnp.dtype(act_dtype))


def _plan(mspec: MeshSpec, params: PyTree = None,
          act_dtype=jnp.float32) -> _Plan:
  """The (cached) plan for these params' shapes (default: the placed ones)."""
  if params is None:
    if mspec.params_like is None:
      raise ValueError(
          'the sharded train state needs the params\' shapes: place '
          'the network with mesh.place(spec, mesh, ..., params=params)')
    params = mspec.params_like
  key = (jax.tree.structure(params), jnp.dtype(act_dtype),
         tuple((x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(params)))
  if key not in mspec.plans:
    mspec.plans[key] = _make_plan(mspec, params, act_dtype)
  return mspec.plans[key]


def layout_report(mspec: MeshSpec, params: PyTree, batch_size: int,
                  compute_dtype=jnp.float32) -> dict:
  """Bytes used and padded in each kind of buffer (for benchmarks).

  Per tick transfers (``transfers``) count one buffer per ``ppermute`` pair;
  the others are the stacked buffers that live for the whole clip.
  """
  plan = _plan(mspec, params, compute_dtype)
  spec, groups = plan.spec, mspec.groups
  item, act_item = plan.dtype.itemsize, plan.act_dtype.itemsize
  s = len(groups)
  used_params = sum(x.size for x in jax.tree.leaves(params))
  used_outs = sum(math.prod(spec.out_shapes[l]) for l in range(spec.num_stages))
  used_states = sum(slot.size for _, slots in plan.state_defs for slot in slots)
  rows = {
      'params': (used_params, s * plan.param_width),
      'outs': (batch_size * used_outs, batch_size * s * plan.out_width),
      'msgs': (batch_size * used_outs, batch_size * s * plan.out_width),
      'states': (batch_size * used_states, batch_size * s * plan.state_width),
  }
  t_used = t_total = 0
  for r in plan.rounds:
    for g, _ in r.up:
      t_used += batch_size * sum(r.slots[k].size for k in r.payload[g])
      t_total += batch_size * r.width
  rows['transfers'] = (t_used, t_total)
  return {k: {'used_bytes': u * (item if k == 'params' else act_item),
              'total_bytes': t * (item if k == 'params' else act_item),
              'padding_share': 1 - u / t if t else 0.0}
          for k, (u, t) in rows.items()}


# -- Flat buffers: pack and unpack. -----------------------------------------

def _pack(parts: Sequence[jax.Array], width: int, pad_value, dtype,
          lead: tuple[int, ...] = ()) -> jax.Array:
  """Concatenates ``parts`` raveled after the ``lead`` axes, padded to width."""
  flat = [p.reshape(*lead, -1).astype(dtype) for p in parts]
  used = sum(f.shape[-1] for f in flat)
  if width > used:
    flat.append(jnp.full((*lead, width - used), pad_value, dtype))
  return jnp.concatenate(flat, axis=-1)


def _unpack(buf: jax.Array, slot: _Slot, lead: int = 1) -> jax.Array:
  """The array in ``slot`` of ``buf (*lead, W)``."""
  x = buf[..., slot.offset:slot.offset + slot.size]
  return x.reshape(*buf.shape[:lead], *slot.shape)


def _unravel(pflat: jax.Array, treedef, slots, dtype=None) -> PyTree:
  leaves = [_unpack(pflat, s, lead=0) for s in slots]
  if dtype is not None:  # Mixed precision: compute in the activation dtype.
    leaves = [x.astype(dtype) for x in leaves]
  return jax.tree.unflatten(treedef, leaves)


def _ravel_params(plan: _Plan, params: PyTree, pad_value) -> jax.Array:
  """Params pytree -> ``(S, P)``, each device's groups raveled and padded."""
  trees = list(params['blocks']) + [params['head']]
  rows = []
  for g, grp in enumerate(plan.mspec.groups):
    keys = list(grp) + ([len(trees) - 1] if plan.top_device == g else [])
    parts = [x for k in keys for x in jax.tree.leaves(trees[k])]
    rows.append(_pack(parts, plan.param_width, pad_value, plan.dtype))
  return jnp.stack(rows)


def _unravel_params(plan: _Plan, stack: jax.Array) -> PyTree:
  """``(S, P)`` -> the ``network.split`` params pytree."""
  num = plan.spec.num_stages
  owner = list(plan.device_of) + [plan.top_device]
  trees = [_unravel(stack[owner[k]], *plan.param_defs[k])
           for k in range(num + 1)]
  return {'blocks': trees[:num], 'head': trees[num]}


class MeshCarry(NamedTuple):
  """What a stream carries between clips on a mesh.

  Attributes:
    outs: ``(S, B, W_out)``: each device's stage outputs of the last tick.
    msgs: ``(S, B, W_out)``: each device's stages' Sideways messages.
    states: ``(S, B, W_state)``: each device's temporal states.
    targets: the target FIFO, as in ``engine.StreamCarry``.
    tick: int32 scalar, ticks this stream has run.
  """
  outs: jax.Array
  msgs: jax.Array
  states: jax.Array
  targets: jax.Array
  tick: jax.Array


def from_stream_carry(mspec: MeshSpec, params: PyTree,
                      carry: engine.StreamCarry) -> MeshCarry:
  """Packs an ``engine.StreamCarry`` into the mesh layout (exact)."""
  batch = carry.targets.shape[0]
  plan = _plan(mspec, params, carry.outs[0].dtype)
  pad, lead = mspec.pad_value, (batch,)

  def stack(per_stage, width, leaves_of):
    return jnp.stack([
        _pack([x for l in grp for x in leaves_of(per_stage[l])], width, pad,
              plan.act_dtype, lead) for grp in mspec.groups])
  return MeshCarry(
      outs=stack(carry.outs, plan.out_width, lambda x: [x]),
      msgs=stack(carry.msgs, plan.out_width, lambda x: [x]),
      states=stack(carry.states, plan.state_width, jax.tree.leaves),
      targets=carry.targets, tick=carry.tick)


def to_stream_carry(mspec: MeshSpec, params: PyTree,
                    carry: MeshCarry) -> engine.StreamCarry:
  """Unpacks a ``MeshCarry`` into an ``engine.StreamCarry`` (exact)."""
  plan = _plan(mspec, params, carry.outs.dtype)
  dev = plan.device_of
  num = plan.spec.num_stages
  outs = tuple(_unpack(carry.outs[dev[l]], plan.out_slots[l])
               for l in range(num))
  msgs = tuple(_unpack(carry.msgs[dev[l]], plan.out_slots[l])
               for l in range(num))
  states = tuple(
      jax.tree.unflatten(td, [_unpack(carry.states[dev[l]], s) for s in sl])
      for l, (td, sl) in enumerate(plan.state_defs))
  return engine.StreamCarry(outs=outs, msgs=msgs, states=states,
                            targets=carry.targets, tick=carry.tick)


def init_carry(mspec: MeshSpec, params: PyTree, clip: jax.Array,
               targets: jax.Array, mode: str,
               compute_dtype=jnp.float32) -> MeshCarry:
  """A fresh stream in the mesh layout (shapes of ``clip``/``targets`` only)."""
  return from_stream_carry(mspec, params, engine.init_carry(
      mspec.spec, params, clip, targets, mode, compute_dtype))


# -- One device's work in one tick (the branches of lax.switch). -------------

def _varying(tree: PyTree) -> PyTree:
  """Marks every leaf as varying over both axes (scan carries and switch
  branches must agree on it, DESIGN.md §6)."""
  def one(x):
    missing = tuple(a for a in AXES if a not in varying_axes(x))
    return lax.pcast(x, missing, to='varying') if missing else x
  return jax.tree.map(one, tree)


def _transport(plan: _Plan, g: int, own: jax.Array, recvs):
  """``value_of`` of the group tick on device ``g`` (``tick.forward_group``):
  a source on this device is read from its output buffer ``own``, a remote
  one from the round buffer that brought it (``recvs``, ``ppermute``)."""
  def value_of(k):
    src = plan.device_of[k]
    if src == g:
      return _unpack(own, plan.out_slots[k])
    r = plan.round_of[g - src]
    return _unpack(recvs[r], plan.rounds[r].slots[k])
  return value_of


def _ups(plan: _Plan, g: int, ys: dict, b: int) -> tuple:
  """This tick's outputs of device ``g`` that the devices above read next
  tick: one buffer per round, packed here where ``g`` is static (a gather
  on the traced device index would cost every tick)."""
  return tuple(
      _pack([ys[k] for k in r.payload[g]], r.width, plan.mspec.pad_value,
            plan.act_dtype, (b,)) for r in plan.rounds)


def _messages_of(plan: _Plan, g: int, local: jax.Array, got):
  """Stage -> the message it holds: what its own device's stages sent
  (``local``) plus what came down in each round (``got``)."""
  def msg_of(l):
    msg = _unpack(local, plan.out_slots[l])
    for r, buf in zip(plan.rounds, got):
      if l in r.payload[g]:
        msg = msg + _unpack(buf, r.slots[l])
    return msg
  return msg_of


def _params_of(plan: _Plan, pflat: jax.Array):
  """Stage (or ``num_stages``: the head) -> its params, read from ``pflat``."""
  return lambda l: _unravel(pflat, *plan.param_defs[l], plan.act_dtype)


def _states_of(plan: _Plan, st: jax.Array, l: int):
  td, slots = plan.state_defs[l]
  return jax.tree.unflatten(td, [_unpack(st, s) for s in slots])


def _pack_group(plan, values: dict, grp, width, lead, leaves=lambda v: [v]):
  parts = [x for l in grp for x in leaves(values[l])]
  return _pack(parts, width, plan.mspec.pad_value, plan.act_dtype, lead)


def _forward_branch(plan: _Plan, g: int, sync: bool):
  """Device ``g``'s forward tick: pipelined, or synchronous (``bp``).

  Operands: ``(pflat (P,), recvs, own (b, W_out), st (b, W_state), x, target,
  w, metrics)``; returns ``(own, ups, st, metrics)``: ``ups`` one buffer per
  round for the devices above (``_ups``).
  """
  spec, grp = plan.spec, plan.mspec.groups[g]
  top = spec.num_stages - 1

  def branch(ops):
    pflat, recvs, own, st, x, target, w, m = ops
    b = x.shape[0]
    params_of = _params_of(plan, pflat)
    ys, states = tick_lib.forward_group(
        spec, grp, params_of, _transport(plan, g, own, recvs),
        lambda l: _states_of(plan, st, l), x, sync=sync)
    if top in grp:
      _, (pred, loss) = tick_lib.head_loss(spec, params_of(top + 1), ys[top],
                                           target, w)
      m = engine.update_metrics(spec, m, w, loss, pred, target)
    own = _pack_group(plan, ys, grp, plan.out_width, (b,))
    st = _pack_group(plan, states, grp, plan.state_width, (b,),
                     jax.tree.leaves)
    return _varying((own, _ups(plan, g, ys, b), st, m))
  return branch


def _idle_forward(plan: _Plan):
  def branch(ops):
    _, _, own, st, x, _, _, m = ops
    pads = tuple(jnp.full((x.shape[0], r.width), plan.mspec.pad_value,
                          plan.act_dtype) for r in plan.rounds)
    return _varying((own, pads, st, m))
  return branch


def _sideways_branch(plan: _Plan, g: int, mask_fill):
  """Device ``g``'s Sideways tick: ``tick.sideways_group`` of its stages.

  Operands: ``(pflat, recvs, own, local, got, st, x, target, w, tick,
  metrics)``: ``local`` the messages this device's stages sent its own
  stages last tick, ``got`` the buffers that came down in each round,
  ``tick`` the stream tick (``mask_fill='stages'`` gates by it).
  Returns ``(own, ups, local, sends, st, grads (P,), metrics)``: ``ups``
  one buffer per round for the devices above, ``sends`` for those below.
  """
  spec, grp = plan.spec, plan.mspec.groups[g]
  top = spec.num_stages - 1
  num_data = plan.mspec.num_data

  def branch(ops):
    pflat, recvs, own, local, got, st, x, target, w, tick, m = ops
    b = x.shape[0]
    params_of = _params_of(plan, pflat)
    # Each device's loss is a mean over its b examples; / num_data makes
    # the messages and gradients those of the global batch mean.
    ys, states, pgrads, sent, head = tick_lib.sideways_group(
        spec, grp, params_of, _transport(plan, g, own, recvs),
        lambda l: _states_of(plan, st, l), _messages_of(plan, g, local, got),
        x,
        params_of(top + 1) if top in grp else None, target, w / num_data,
        engine.stage_gates(spec, mask_fill, tick))
    keys = list(grp)
    if head is not None:
      pgrads['head'], loss, pred = head
      m = engine.update_metrics(spec, m, w, loss, pred, target)
      keys.append('head')
    local = {k: sent.get(k, jnp.zeros_like(ys[k])) for k in grp}
    sends = []
    for r in plan.rounds:
      src = g - r.offset  # This device sends messages down to ``src``.
      ks = r.payload[src] if src >= 0 else ()
      sends.append(_pack([sent[k] for k in ks], r.width,
                         plan.mspec.pad_value, plan.act_dtype, (b,)))
    # Padding gets an exact zero gradient: the packed buffer is the train
    # state, and the optimizer must leave its padding alone.
    grads = _pack([x for k in keys for x in jax.tree.leaves(pgrads[k])],
                  plan.param_width, 0.0, plan.dtype)
    return _varying((
        _pack_group(plan, ys, grp, plan.out_width, (b,)),
        _ups(plan, g, ys, b),
        _pack_group(plan, local, grp, plan.out_width, (b,)),
        tuple(sends),
        _pack_group(plan, states, grp, plan.state_width, (b,),
                    jax.tree.leaves),
        grads, m))
  return branch


def _idle_sideways(plan: _Plan):
  def branch(ops):
    pflat, _, own, local, _, st, x, _, _, _, m = ops
    b = x.shape[0]
    pads = tuple(jnp.full((b, r.width), plan.mspec.pad_value, plan.act_dtype)
                 for r in plan.rounds)
    return _varying((own, pads, local, pads, st, jnp.zeros_like(pflat), m))
  return branch


# -- The clip on the mesh. ---------------------------------------------------

def _const_key(c) -> tuple:
  try:
    a = np.asarray(c)
    return (a.shape, str(a.dtype), a.tobytes())
  except Exception:  # pylint: disable=broad-except
    return ('object', id(c))  # A traced constant: equal only to itself.


def _printable(jaxpr) -> bool:
  """Whether ``jaxpr``'s text says all it computes, at any depth.

  A Python callable in an equation's parameters (a ``custom_vjp``'s backward
  rule, a ``custom_jvp``'s, a host callback) prints by name only, so two
  different rules would look equal; only the rules of
  ``conv.RULES_DECIDED_BY_TEXT`` (decided by what the forward prints) and
  meshes (printed) pass.
  """
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'custom_vjp_call':
      bwd = eqn.params.get('bwd')
      if getattr(bwd, 'f', None) not in conv.RULES_DECIDED_BY_TEXT:
        return False
      params = {'call_jaxpr': eqn.params['call_jaxpr']}
    else:
      params = eqn.params
    for value in params.values():
      for v in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(v, 'jaxpr', v)
        if hasattr(inner, 'eqns'):
          if not _printable(inner):
            return False
        elif callable(v) and not isinstance(
            v, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
          return False
  return True


def _switch(index, branches, *operands):
  """``lax.switch(index, branches, *operands)`` with equal branches merged.

  Every device's program holds every branch of a switch (SPMD: one program
  for all devices), so XLA compiles each branch and every device carries its
  code. Branches whose jaxprs are equal -- same text, same constants, and
  nothing the text leaves out (``_printable``): e.g. the middle stages of a
  homogeneous net, one stage per device -- are compiled once and chosen
  through a table (``make_jaxpr`` traces each branch here; ``lax.switch``
  traces only the distinct ones again).
  """
  ids, distinct, which = {}, [], []
  for i, branch in enumerate(branches):
    closed = jax.make_jaxpr(branch)(*operands)
    key = (str(closed.jaxpr), tuple(_const_key(c) for c in closed.consts))
    if not _printable(closed.jaxpr):
      key = ('unmerged', i)
    if key not in ids:
      ids[key] = len(distinct)
      distinct.append(branch)
    which.append(ids[key])
  if len(distinct) == len(branches):
    return lax.switch(index, branches, *operands)
  return lax.switch(jnp.asarray(which, jnp.int32)[index], distinct, *operands)


def _on_device(plan: _Plan, g, make, *operands):
  """``make(device)(*operands)`` on the traced device index ``g``: a switch
  over static branches (once per clip, at the ends of the tick scan)."""
  return _switch(g, [lambda *ops, i=i: _varying(make(i)(*ops))
                     for i in range(len(plan.mspec.groups))], *operands)


def _gather_ups(plan: _Plan, own: jax.Array, g) -> tuple:
  """The per-round up-going buffers of the outputs in ``own`` (``_ups``)."""
  def make(i):
    return lambda own: _ups(plan, i, {
        k: _unpack(own, plan.out_slots[k]) for k in plan.mspec.groups[i]},
                            own.shape[0])
  return _on_device(plan, g, make, own)


def _merge_messages(plan: _Plan, local: jax.Array, got, g) -> jax.Array:
  """The per-stage message buffer ``(b, W_out)`` (``_messages_of``)."""
  def make(i):
    grp = plan.mspec.groups[i]

    def merge(local, got):
      msg_of = _messages_of(plan, i, local, got)
      return _pack_group(plan, {l: msg_of(l) for l in grp}, grp,
                         plan.out_width, (local.shape[0],))
    return merge
  return _on_device(plan, g, make, local, got)


def _send(plan: _Plan, bufs, down: bool) -> tuple:
  """One ``ppermute`` per round: up (activations) or down (messages)."""
  return tuple(lax.ppermute(buf, 'stage', r.down if down else r.up)
               for r, buf in zip(plan.rounds, bufs))


def _sync_tick(plan: _Plan, branches, pflat, own, st, x, target, w, m, g):
  """A ``bp`` tick: devices run one after another, each waiting for the
  activations its predecessors send within the tick."""
  b = x.shape[0]
  inbox = [_varying(jnp.full((b, r.width), plan.mspec.pad_value,
                             plan.act_dtype))
           for r in plan.rounds]
  for p, branch in branches:
    own, ups, st, m = lax.switch(
        jnp.where(g == p, 1, 0), [_idle_forward(plan), branch],
        (pflat, tuple(inbox), own, st, x, target, w, m))
    for i, r in enumerate(plan.rounds):
      if r.payload[p]:
        got = lax.ppermute(ups[i], 'stage', ((p, p + r.offset),))
        inbox[i] = jnp.where(g == p + r.offset, got, inbox[i])
  return own, st, m


def _frame_reader(read, sharded: bool):
  """``(buf, t) -> read(buf, t)``: tick ``t``'s frame of a clip (or of
  per-frame targets) on every device.

  ``sharded``: each device holds ``C`` consecutive frames (``time_sharded``;
  ``buf`` is ``(b, C, ...)``); the holder of frame ``t`` gives it and a
  ``psum`` over 'stage' brings it to all (only one term is non-zero, so the
  sum is exact): one frame per tick moves instead of every device keeping
  the whole clip.
  """
  if not sharded:
    return read

  def read_sharded(buf, t):
    c = buf.shape[1]
    x = read(buf, t % c)
    mine = lax.axis_index('stage') == t // c
    return lax.psum(jnp.where(mine, x, jnp.zeros_like(x)), 'stage')
  return read_sharded


def _device_clip(plan: _Plan, *, mode: str, length: int, per_frame: bool,
                 num_frames: int, mask_fill, clip_sharded: bool,
                 targets_sharded: bool):
  """The per-device program of ``length`` ticks (the body of shard_map)."""
  spec, groups = plan.spec, plan.mspec.groups
  sideways = mode == 'sideways'
  # Exact modes differentiate through the scan. A lax.switch's residuals are
  # the union over its branches (every device would keep every stage's), so
  # each branch is rematerialized: what it saves per tick is its operands,
  # the same padded buffers on every device, and its backward recomputes
  # its own stages' forward (one more forward per tick).
  # (``bp`` runs one switch per device phase within a tick: the whole tick is
  # rematerialized, saving its operands once.)
  # (prevent_cse=False: inside a scan CSE cannot merge the recomputation.)
  remat = ((lambda f: f) if sideways else
           functools.partial(jax.checkpoint, prevent_cse=False))
  if mode == 'bp':
    sync = [(g, _forward_branch(plan, g, True))
            for g, grp in enumerate(groups) if grp]
    sync_tick = remat(functools.partial(_sync_tick, plan, sync))
  else:
    make = (functools.partial(_sideways_branch, mask_fill=mask_fill)
            if sideways else functools.partial(_forward_branch, sync=False))
    idle = _idle_sideways(plan) if sideways else _idle_forward(plan)
    branches = [remat(make(plan, g)) if grp else idle
                for g, grp in enumerate(groups)]

  read_frame = _frame_reader(
      lambda buf, t: engine.read_frame(buf, t, plan.act_dtype), clip_sharded)
  read_target = _frame_reader(
      lambda buf, t: lax.dynamic_index_in_dim(buf, t, 1, keepdims=False),
      targets_sharded)

  def fn(pstack, clip, targets, outs, msgs, states, fifo, start, weights,
         tick0):
    g = lax.axis_index('stage')
    # Varying over 'data' here, once: per-tick VJPs then give each shard's own
    # gradient (an invariant input would make every VJP psum over 'data').
    pflat = _varying(pstack[0])
    b = clip.shape[0]
    m = engine.init_metrics(spec, b)
    gacc = jnp.zeros_like(pflat) if sideways else None
    # In flight between ticks: the outputs going up and, under Sideways, the
    # messages: ``local`` (within the device) and ``got`` (per round).
    ups = _gather_ups(plan, outs[0], g)
    got = tuple(jnp.zeros((b, r.width), plan.act_dtype) for r in plan.rounds)
    init = (_varying((outs[0], ups, msgs[0], got, states[0], m, gacc)), fifo)

    def body(c, i):
      (own, ups, local, got, st, m, gacc), fifo = c
      t = jnp.minimum(start + i, num_frames - 1)
      x = read_frame(clip, t)
      if per_frame:  # This tick's target, read as the frame is.
        target, fifo = engine.tick_target(read_target(targets, t)[:, None], 0,
                                          fifo, True, tick0 + i)
      else:
        target, fifo = engine.tick_target(targets, t, fifo, False, tick0 + i)
      w = weights[i]
      if mode == 'bp':
        own, st, m = sync_tick(pflat, own, st, x, target, w, m, g)
      elif not sideways:
        own, ups, st, m = _switch(
            g, branches, (pflat, _send(plan, ups, down=False), own, st, x,
                          target, w, m))
      else:
        own, ups, local, sends, st, gtick, m = _switch(
            g, branches, (pflat, _send(plan, ups, down=False), own, local,
                          got, st, x, target, w, tick0 + i, m))
        got = _send(plan, sends, down=True)
        gacc = gacc + gtick
      return ((own, ups, local, got, st, m, gacc), fifo), None

    ((own, _, local, got, st, m, gacc), fifo), _ = lax.scan(
        body, init, jnp.arange(length))
    msg = _merge_messages(plan, local, got, g) if sideways else local
    # Only the top device adds to the metrics; each data shard's are means.
    metrics = {k: lax.psum(v, 'stage') for k, v in m.items()}
    for k in ('loss', 'accuracy'):
      metrics[k] = lax.pmean(metrics[k], 'data')
    grads = None if gacc is None else lax.psum(gacc, 'data')[None]
    return (metrics['loss'], metrics, own[None], msg[None], st[None], fifo,
            grads)
  return fn


def _check_batch(mspec: MeshSpec, batch_size: int):
  if batch_size % mspec.num_data:
    raise ValueError(f'batch {batch_size} does not split over '
                     f"{mspec.num_data} devices on 'data'")


def _run_packed(mspec: MeshSpec, pstack: jax.Array, clip, targets,
                carry: MeshCarry, *, mode: str, start, length: int,
                mask_fill: bool | str, compute_dtype, params_like=None,
                total=None):
  """``length`` ticks from clip frame ``start`` on the mesh.

  ``pstack (S, P)``: the packed params (``shard_tree``); ``params_like``:
  their pytree's shapes (default ``mspec.params_like``); ``total`` as in
  ``engine.run_ticks``.

  Returns ``(loss, (carry, metrics, grads))``; ``grads`` is the Sideways
  gradient in the packed layout ``(S, P)`` (zero on padding) or ``None``.
  """
  spec = mspec.spec
  plan = _plan(mspec, params_like, compute_dtype)
  num_frames = clip.shape[1]
  per_frame = engine.is_per_frame(spec, clip, targets)
  weights, count = engine.tick_weights(carry, start, length, num_frames,
                                        engine.delay(spec, mode), mask_fill,
                                        total)
  metric_specs = {'loss': P(), 'accuracy': P(), 'example_loss': P('data')}
  if spec.loss != 'mse':
    metric_specs['predictions'] = P('data')
  sharded = P('stage', 'data')
  clip_spec, targets_spec = (batch_sharding(mspec.mesh, x.shape).spec
                             for x in (clip, targets))
  fn = jax.shard_map(
      _device_clip(plan, mode=mode, length=length, per_frame=per_frame,
                   num_frames=num_frames, mask_fill=mask_fill,
                   clip_sharded=clip_spec != P('data'),
                   targets_sharded=targets_spec != P('data')),
      mesh=mspec.mesh,
      in_specs=(P('stage'), clip_spec, targets_spec, sharded, sharded,
                sharded, P('data'), P(), P(), P()),
      out_specs=(P(), metric_specs, sharded, sharded, sharded, P('data'),
                 None if mode != 'sideways' else P('stage')))
  # A zero-size FIFO (no delay) stays outside: XLA:CPU in jax 0.11 crashes
  # compiling zero-size arrays through this shard_map + scan.
  fifo = carry.targets if carry.targets.size else None
  loss, m, outs, msgs, states, fifo, gstack = fn(
      pstack, clip, targets, carry.outs, carry.msgs, carry.states, fifo,
      jnp.asarray(start, jnp.int32), weights, carry.tick)
  m = dict(engine.window_means(m, count, total), valid_ticks=count)
  carry = MeshCarry(outs=outs, msgs=msgs, states=states,
                    targets=carry.targets if fifo is None else fifo,
                    tick=carry.tick + length)
  return loss, (carry, m, gstack)


def _run(mspec: MeshSpec, params: PyTree, clip, targets, carry: MeshCarry, *,
         mode: str, start, length: int, mask_fill: bool | str, compute_dtype,
         total=None):
  """``_run_packed`` on a params pytree (packed here, every call).

  Returns ``(loss, (carry, metrics, grads))``; ``grads`` is the Sideways
  gradient (params pytree) or ``None``.
  """
  plan = _plan(mspec, params, compute_dtype)
  pstack = _ravel_params(plan, params, mspec.pad_value)
  loss, (carry, m, gstack) = _run_packed(
      mspec, pstack, clip, targets, carry, mode=mode, start=start,
      length=length, mask_fill=mask_fill, compute_dtype=compute_dtype,
      params_like=params, total=total)
  grads = None if gstack is None else _unravel_params(plan, gstack)
  return loss, (carry, m, grads)


def _window_grads_of(run, mspec, params, clip, targets, carry, *, mode,
                     start, length, mask_fill, compute_dtype, total=None):
  """Loss, gradient and output of one window, for ``run`` = ``_run`` (params
  pytree) or ``_run_packed`` (packed params, packed gradient)."""
  carry = lax.stop_gradient(carry)
  kw = dict(mode=mode, start=start, length=length, mask_fill=mask_fill,
            compute_dtype=compute_dtype, total=total)
  if mode == 'sideways':
    loss, (carry, m, grads) = run(mspec, params, clip, targets, carry, **kw)
  else:
    def loss_fn(p):
      loss, (c, m, _) = run(mspec, p, clip, targets, carry, **kw)
      return loss, (c, m)
    (loss, (carry, m)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
  return loss, grads, engine.finish(mspec.spec, carry, m)


_window_grads = functools.partial(_window_grads_of, _run)
_window_grads_packed = functools.partial(_window_grads_of, _run_packed)


def _prepare(mspec, params, clip, targets, carry, mode, compute_dtype, *,
             flush, mask_fill, needs_loss=True) -> MeshCarry:
  engine.check_mode(mode)
  if tuple(clip.shape[2:]) != mspec.spec.frame_shape:
    raise ValueError(
        f'clip of shape {clip.shape} does not match the network: expected '
        f'(batch, frames, *{mspec.spec.frame_shape})')
  engine.check_inputs(mspec.spec, clip, targets, mode=mode, carry=carry,
                      flush=flush, mask_fill=mask_fill,
                      needs_loss=needs_loss)
  _check_batch(mspec, clip.shape[0])
  if carry is None:
    return init_carry(mspec, params, clip, targets, mode, compute_dtype)
  if isinstance(carry, engine.StreamCarry):
    return from_stream_carry(mspec, params, carry)
  return carry


@functools.partial(jax.jit, static_argnames=('mspec', 'mode', 'flush',
                                             'mask_fill', 'compute_dtype'))
def loss_and_grads(mspec: MeshSpec, params: PyTree, clip: jax.Array,
                   targets: jax.Array, *, mode: str, carry=None,
                   flush: int = 0, mask_fill: bool | str = True,
                   compute_dtype=jnp.float32):
  """Loss and gradients of one clip on the mesh; as ``engine.loss_and_grads``.

  Args:
    mspec: from ``place``.
    params: the ``network.split`` params pytree.
    clip: ``(B, T, *frame_shape)``, ``B`` divisible by the 'data' axis.
    targets: as in ``engine.loss_and_grads``.
    carry: a ``MeshCarry`` (or an ``engine.StreamCarry``); ``None`` starts a
      new stream.

  Returns:
    ``(loss, grads, ClipOutput)``: ``grads`` in the params' structure, the
    output's carry a ``MeshCarry``.
  """
  carry = _prepare(mspec, params, clip, targets, carry, mode,
                   compute_dtype, flush=flush, mask_fill=mask_fill)
  return _window_grads(mspec, params, clip, targets, carry, mode=mode,
                       start=0, length=clip.shape[1] + flush,
                       mask_fill=mask_fill, compute_dtype=compute_dtype)


def _forward(mspec, pstack, params, clip, targets, *, mode, carry, flush,
             mask_fill, compute_dtype) -> engine.ClipOutput:
  """The pipelined (or ``bp``) forward of a clip on packed params; ``params``
  the pytree (or its shapes) for the shapes of a fresh carry."""
  carry = _prepare(mspec, params, clip, targets, carry, mode,
                   compute_dtype, flush=flush, mask_fill=mask_fill,
                   needs_loss=False)
  fwd_mode = engine.forward_mode(mode)
  _, (carry, m, _) = _run_packed(
      mspec, pstack, clip, targets, carry, mode=fwd_mode, start=0,
      length=clip.shape[1] + flush, mask_fill=mask_fill,
      compute_dtype=compute_dtype, params_like=params)
  return engine.finish(mspec.spec, carry, m)


@functools.partial(jax.jit, static_argnames=('mspec', 'mode', 'flush',
                                             'mask_fill', 'compute_dtype'))
def forward(mspec: MeshSpec, params: PyTree, clip: jax.Array,
            targets: jax.Array, *, mode: str, carry=None, flush: int = 0,
            mask_fill: bool | str = True,
            compute_dtype=jnp.float32) -> engine.ClipOutput:
  """Runs a clip forward on the mesh (evaluation); as ``engine.forward``
  without ``collect``. ``sideways`` uses the pipelined forward."""
  pstack = _ravel_params(_plan(mspec, params, compute_dtype), params,
                         mspec.pad_value)
  return _forward(mspec, pstack, params, clip, targets, mode=mode,
                  carry=carry, flush=flush, mask_fill=mask_fill,
                  compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=('mspec', 'optimizer', 'mode',
                                             'flush', 'mask_fill',
                                             'update_every', 'compute_dtype'))
def train_step(mspec: MeshSpec, optimizer: optax.GradientTransformation,
               params: PyTree, opt_state: PyTree, clip: jax.Array,
               targets: jax.Array, *, mode: str, carry=None, flush: int = 0,
               mask_fill: bool | str = True, update_every: int | None = None,
               compute_dtype=jnp.float32):
  """One training step on the mesh, as ``engine.train_step``.

  A convenience: it packs the params pytree into the mesh layout and back
  at every step; training loops keep the sharded state instead
  (``shard_tree``, ``train_step_sharded``).

  Returns ``(params, opt_state, ClipOutput)`` with ``params`` in the
  ``network.split`` structure.
  """
  carry = _prepare(mspec, params, clip, targets, carry, mode,
                   compute_dtype, flush=flush, mask_fill=mask_fill)

  def grads_fn(p, c, start, length):
    return _window_grads(mspec, p, clip, targets, c, mode=mode, start=start,
                         length=length, mask_fill=mask_fill,
                         compute_dtype=compute_dtype)
  return engine.optimize_clip(grads_fn, optimizer, params, opt_state, carry,
                              num_frames=clip.shape[1], flush=flush,
                              update_every=update_every)


# -- The sharded train state. -------------------------------------------------
#
# On the mesh the train state is one of two layouts (``STATE_SHARDINGS``):
# 'stage', the packed layout itself, params ``(S, P)`` sharded over 'stage'
# (each device holds its own group's parameters and their padding), or
# 'even', the rows' parameters without padding in one vector ``(N,)`` split
# evenly over ('stage', 'data') (each device ``N / (S * D)`` values, whatever
# the groups' sizes; each window gathers its rows from it, ``_to_packed``,
# and scatters its gradient back, ``_from_packed``). The optimizer state has
# the params' layout. Elementwise optimizers (sgd, momentum, adam, adamw)
# and global-norm clipping act on either exactly as on the params pytree,
# because every padded slot's gradient is exactly zero; optimizers that take per-leaf norms
# (LARS, LAMB) would see one leaf per device instead and are not supported.
# Checkpoints and evaluation use the plain pytree (``unshard_tree``), so they
# move between the single-device engine and every mesh shape.

def _row_used(plan: _Plan) -> tuple[int, ...]:
  """Parameters (unpadded) in each device's row of the packed layout."""
  owner = list(plan.device_of) + [plan.top_device]  # The head rides on top.
  used = [0] * len(plan.mspec.groups)
  for k, (_, slots) in enumerate(plan.param_defs):
    used[owner[k]] += sum(s.size for s in slots)
  return tuple(used)


def _flat_width(plan: _Plan) -> int:
  """The even layout's length: every parameter, padded to a multiple of the
  mesh's devices."""
  devices = plan.mspec.mesh.size
  return -(-sum(_row_used(plan)) // devices) * devices


def _flat_of_packed(plan: _Plan, stack: jax.Array, pad_value) -> jax.Array:
  """``(S, P)`` -> ``(N,)``: the rows without their padding, in order (the
  params' leaves in pytree order), then ``pad_value`` up to ``N``."""
  used = _row_used(plan)
  parts = [stack[g, :u] for g, u in enumerate(used) if u]
  tail = _flat_width(plan) - sum(used)
  if tail:
    parts.append(jnp.full((tail,), pad_value, stack.dtype))
  return jnp.concatenate(parts)


def _packed_of_flat(plan: _Plan, flat: jax.Array) -> jax.Array:
  """``(N,)`` -> ``(S, P)``, the inverse of ``_flat_of_packed``."""
  rows, offset = [], 0
  for u in _row_used(plan):
    rows.append(_pack([flat[offset:offset + u]] if u else [],
                      plan.param_width, plan.mspec.pad_value, flat.dtype))
    offset += u
  return jnp.stack(rows)


def _state_shape(mspec: MeshSpec) -> tuple[int, ...]:
  """The shape of a params-shaped leaf of the train state."""
  plan = _plan(mspec)
  if mspec.state_sharding == 'even':
    return (_flat_width(plan),)
  return (len(mspec.groups), plan.param_width)


def _is_packed(mspec: MeshSpec, x) -> bool:
  return hasattr(x, 'shape') and tuple(x.shape) == _state_shape(mspec)


# 'even': dim 0 split over 'stage', then 'data' (device (d, s) holds piece
# s * D + d), so that segment s of the vector is the D pieces on stage s:
# a row's exchange is then a shift over 'stage' alone.
_EVEN = P(('stage', 'data'))


def _state_sharding(mspec: MeshSpec) -> NamedSharding:
  return NamedSharding(mspec.mesh, _EVEN if mspec.state_sharding == 'even'
                       else P('stage'))


def _exchange_rounds(plan: _Plan):
  """The static plan of the even layout's exchange over 'stage'.

  Device ``s`` on 'stage' holds segment ``s`` of the vector
  (``[s * C, (s + 1) * C)``, ``C = N / S``, its data row's pieces together);
  its row ``g = s`` spans ``[a_g, a_g + used_g)``, which overlaps a few
  consecutive segments. Round ``k`` moves segment ``g + k`` to device ``g``
  (a shift: one ``ppermute``, none for ``k = 0``).

  Returns ``(seg, rounds)``: ``seg`` = ``C``; ``rounds`` a tuple of
  ``(k, needed, at)``, ``needed[g]`` whether device ``g`` uses segment
  ``g + k`` and ``at[g]`` where it starts in ``g``'s row, plus ``C`` (the
  row sits at ``C`` in a buffer of ``C + P + C``).
  """
  num = len(plan.mspec.groups)
  used = np.asarray(_row_used(plan))
  starts = np.concatenate([[0], np.cumsum(used)[:-1]])
  seg = _flat_width(plan) // num
  spans = [(a // seg, (a + u - 1) // seg) if u else None
           for a, u in zip(starts, used)]
  shifts = sorted({q - g for g, sp in enumerate(spans) if sp
                   for q in range(sp[0], sp[1] + 1)})
  rounds = []
  for k in shifts:
    needed = np.array([bool(sp) and sp[0] <= g + k <= sp[1]
                       for g, sp in enumerate(spans)])
    at = np.where(needed, (np.arange(num) + k) * seg - starts + seg, 0)
    rounds.append((k, needed, at.astype(np.int32)))
  return seg, tuple(rounds)


def _shift(x, k: int, num: int):
  """Device ``g`` on 'stage' receives ``x`` of device ``g + k`` (zeros
  where there is none)."""
  if k == 0:
    return x
  return lax.ppermute(x, 'stage', [(g + k, g) for g in range(num)
                                   if 0 <= g + k < num])


def _gather_rows(mspec: MeshSpec, flat: jax.Array) -> jax.Array:
  """The even layout ``(N,)`` -> ``(S, P)`` sharded over 'stage'.

  Each stage's pieces are summed into their segment (a ``psum`` over 'data'
  of each piece in place, twice an ``all_gather``'s bytes: jax 0.10.2 types
  an ``all_gather``'s result as varying over the axis, and the rows must
  leave replicated over 'data'), then the segments a row overlaps are
  shifted to its device (``_exchange_rounds``). Temporaries per device: a
  buffer of a row and two segments (``P + 2 N / S``), not the whole vector
  when the groups are balanced (``P`` about ``N / S``); at ``S = 1`` the
  row is the whole vector anyway.
  """
  plan = _plan(mspec)
  num, width = len(mspec.groups), plan.param_width
  seg, rounds = _exchange_rounds(plan)
  used = jnp.asarray(_row_used(plan))

  def fn(piece):
    at = lax.axis_index('data') * piece.shape[0]
    segment = lax.psum(lax.dynamic_update_slice(
        jnp.zeros((seg,), piece.dtype), piece, (at,)), 'data')
    g = lax.axis_index('stage')
    buf = jnp.zeros((seg + width + seg,), piece.dtype)
    for k, needed, start in rounds:
      at = jnp.asarray(start)[g]
      # Written in place; a round this device does not need rewrites what
      # is there (segments land on disjoint parts of the buffer).
      got = jnp.where(jnp.asarray(needed)[g], _shift(segment, k, num),
                      lax.dynamic_slice(buf, (at,), (seg,)))
      buf = lax.dynamic_update_slice(buf, got, (at,))
    row = buf[seg:seg + width]
    return jnp.where(jnp.arange(width) < used[g], row,
                     jnp.asarray(mspec.pad_value, row.dtype))[None]
  return jax.shard_map(fn, mesh=mspec.mesh, in_specs=_EVEN,
                       out_specs=P('stage'))(flat)


def _scatter_rows(mspec: MeshSpec, stack: jax.Array) -> jax.Array:
  """``(S, P)`` over 'stage' (equal on every data row; zero on padding, as
  gradients are) -> the even layout ``(N,)``, zero on its tail: the
  transpose of ``_gather_rows`` (each overlapped segment's part of a row
  shifted back to the segment's device and added)."""
  plan = _plan(mspec)
  num, width = len(mspec.groups), plan.param_width
  seg, rounds = _exchange_rounds(plan)
  used = jnp.asarray(_row_used(plan))
  piece = _flat_width(plan) // mspec.mesh.size

  def fn(row):
    g = lax.axis_index('stage')
    row = jnp.where(jnp.arange(width) < used[g], row[0], 0)
    buf = jnp.concatenate([jnp.zeros((seg,), row.dtype), row,
                           jnp.zeros((seg,), row.dtype)])
    segment = jnp.zeros((seg,), row.dtype)
    for k, needed, start in rounds:
      part = jnp.where(jnp.asarray(needed)[g], lax.dynamic_slice(
          buf, (jnp.asarray(start)[g],), (seg,)), 0)
      segment = segment + _shift(part, -k, num)
    return lax.dynamic_slice(segment, (lax.axis_index('data') * piece,),
                             (piece,))
  return jax.shard_map(fn, mesh=mspec.mesh, in_specs=P('stage'),
                       out_specs=_EVEN)(stack)


def _to_packed(mspec: MeshSpec, x: jax.Array) -> jax.Array:
  """A params-shaped state leaf -> ``(S, P)`` sharded over 'stage' (the
  layout the ticks run on)."""
  if mspec.state_sharding == 'even':
    return _gather_rows(mspec, x)
  return lax.with_sharding_constraint(x, NamedSharding(mspec.mesh,
                                                       P('stage')))


def _from_packed(mspec: MeshSpec, grads: jax.Array) -> jax.Array:
  """A packed gradient ``(S, P)`` -> the state's layout."""
  if mspec.state_sharding == 'even':
    return _scatter_rows(mspec, grads)
  return grads


def _ravel_state(mspec: MeshSpec, params: PyTree) -> jax.Array:
  """A params-shaped pytree (replicated) -> the state's layout."""
  plan = _plan(mspec)
  stack = _ravel_params(plan, params, mspec.pad_value)
  if mspec.state_sharding == 'even':
    return _flat_of_packed(plan, stack, mspec.pad_value)
  return stack


def _unravel_state(mspec: MeshSpec, x: jax.Array) -> PyTree:
  """The inverse of ``_ravel_state``: the pytree, replicated."""
  plan = _plan(mspec)
  if mspec.state_sharding == 'even':
    x = _packed_of_flat(plan, lax.with_sharding_constraint(
        x, NamedSharding(mspec.mesh, P())))
  return _unravel_params(plan, x)


def _window_grads_state(mspec: MeshSpec, state: jax.Array, clip, targets,
                        carry, **kw):
  """``_window_grads_packed`` on the state's layout: the rows gathered,
  the gradient scattered back (zero on padding)."""
  loss, grads, out = _window_grads_packed(mspec, _to_packed(mspec, state),
                                          clip, targets, carry, **kw)
  return loss, _from_packed(mspec, grads), out


def _constrain(mspec: MeshSpec, tree: PyTree) -> PyTree:
  """Params-shaped leaves in the state's sharding, every other leaf
  replicated."""
  whole = NamedSharding(mspec.mesh, P())
  return jax.tree.map(lambda x: lax.with_sharding_constraint(
      x, _state_sharding(mspec) if _is_packed(mspec, x) else whole), tree)


def _check_like(sub: PyTree, like: PyTree) -> PyTree:
  """``sub`` if its leaves have the params' shapes and dtypes; else a named
  error (bf16 or factored moments do not fit the packed layout)."""
  for x, y in zip(jax.tree.leaves(sub), jax.tree.leaves(like)):
    if x.shape != y.shape or jnp.dtype(x.dtype) != y.dtype:
      raise ValueError(
          f"shard_tree: a subtree with the params' structure holds "
          f'{x.dtype}{list(x.shape)} where the params hold '
          f'{y.dtype}{list(y.shape)}; the sharded state needs '
          'optimizer states shaped like the params (sgd, momentum, adam, '
          "adamw in the params' dtype)")
  return sub


@functools.partial(jax.jit, static_argnames=('mspec',))
def shard_tree(mspec: MeshSpec, tree: PyTree) -> PyTree:
  """Params (or an optimizer state over them) -> the sharded train state.

  Every subtree of ``tree`` with the params' structure becomes one array in
  the placement's layout (``MeshSpec.state_sharding``: packed ``(S, P)``
  sharded over 'stage', or ``(N,)`` split evenly over every device); other
  leaves (step counts) are replicated. Needs ``place(..., params=params)``.

  Example::

    mspec = mesh.place(spec, m, params=params)
    pstack = mesh.shard_tree(mspec, params)
    opt_state = mesh.shard_tree(mspec, optimizer.init(params))
    pstack, opt_state, out = mesh.train_step_sharded(
        mspec, optimizer, pstack, opt_state, clip, labels, mode='sideways')
    params = mesh.unshard_tree(mspec, pstack)   # checkpoints, evaluation
  """
  _plan(mspec)  # A named error without the params' shapes.
  like = mspec.params_like
  treedef = jax.tree.structure(like)

  packed = jax.tree.map(
      lambda sub: (_ravel_state(mspec, _check_like(sub, like))
                   if jax.tree.structure(sub) == treedef else sub),
      tree, is_leaf=lambda sub: jax.tree.structure(sub) == treedef)
  return _constrain(mspec, packed)


@functools.partial(jax.jit, static_argnames=('mspec',))
def unshard_tree(mspec: MeshSpec, tree: PyTree) -> PyTree:
  """The inverse of ``shard_tree``: every packed leaf back to a params
  pytree (replicated over the mesh)."""
  whole = NamedSharding(mspec.mesh, P())
  return jax.tree.map(
      lambda x: jax.tree.map(
          lambda y: lax.with_sharding_constraint(y, whole),
          _unravel_state(mspec, x) if _is_packed(mspec, x) else x), tree)


def train_step_sharded(mspec: MeshSpec,
                       optimizer: optax.GradientTransformation,
                       pstack: jax.Array, opt_state: PyTree, clip: jax.Array,
                       targets: jax.Array, *, mode: str, carry=None,
                       flush: int = 0, mask_fill: bool | str = True,
                       update_every: int | None = None,
                       compute_dtype=jnp.float32):
  """One training step on the sharded train state (``shard_tree``).

  As ``train_step``, but params and optimizer state stay sharded: nothing
  is packed, unpacked or replicated per step, each device updates only its
  own part (its group's row, or its even piece: then each window gathers
  its rows and scatters the gradient back), and both are donated (the step
  reuses their buffers).

  Returns:
    ``(pstack, opt_state, ClipOutput)`` in the same layouts.
  """
  carry = _prepare(mspec, mspec.params_like, clip, targets, carry, mode,
                   compute_dtype, flush=flush, mask_fill=mask_fill)

  def grads_fn(p, c, start, length):
    return _window_grads_state(mspec, p, clip, targets, c, mode=mode,
                               start=start, length=length,
                               mask_fill=mask_fill,
                               compute_dtype=compute_dtype)
  pstack, opt_state, out = engine.optimize_clip(
      grads_fn, optimizer, pstack, opt_state, carry, num_frames=clip.shape[1],
      flush=flush, update_every=update_every)
  return _constrain(mspec, pstack), _constrain(mspec, opt_state), out


_STEP_STATIC = ('mspec', 'optimizer', 'mode', 'flush', 'mask_fill',
                'update_every', 'compute_dtype')
# The engine interface's step keeps its inputs (as engine.train_step); the
# public one donates them (a loop that owns its state).
_train_step_kept = jax.jit(train_step_sharded, static_argnames=_STEP_STATIC)
train_step_sharded = jax.jit(train_step_sharded, static_argnames=_STEP_STATIC,
                             donate_argnames=('pstack', 'opt_state'))


@functools.partial(jax.jit, static_argnames=('mspec', 'mode', 'flush',
                                             'mask_fill', 'compute_dtype'))
def forward_sharded(mspec: MeshSpec, pstack: jax.Array, clip: jax.Array,
                    targets: jax.Array, *, mode: str, carry=None,
                    flush: int = 0, mask_fill: bool | str = True,
                    compute_dtype=jnp.float32) -> engine.ClipOutput:
  """``forward`` on the sharded params (``shard_tree``): evaluation
  without unpacking them."""
  return _forward(mspec, _to_packed(mspec, pstack), mspec.params_like, clip,
                  targets, mode=mode, carry=carry, flush=flush,
                  mask_fill=mask_fill, compute_dtype=compute_dtype)


def sharded_like(mspec: MeshSpec, tree: PyTree) -> PyTree:
  """``ShapeDtypeStruct``s (with shardings) of ``shard_tree(mspec, tree)``:
  the sharded state's shapes, for ``lower`` and compile-only plans."""
  whole = NamedSharding(mspec.mesh, P())
  shapes = jax.eval_shape(functools.partial(shard_tree, mspec), tree)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=(_state_sharding(mspec)
                                  if _is_packed(mspec, x) else whole)),
                      shapes)


# -- The engine interface (``engine.LocalEngine``'s methods). -----------------

@dataclasses.dataclass(frozen=True)
class MeshEngine:
  """The mesh engine behind the interface every runner uses.

  The same methods and return types as ``engine.LocalEngine`` (see there);
  the state layout is the sharded one (``shard_tree``): params and
  optimizer state spread evenly over every device
  (``state_sharding='even'``) or packed ``(S, P)`` and sharded over 'stage',
  each device holding its own group's. Carries are ``MeshCarry``s.

  Example::

    mspec = mesh.place(spec, mesh.make_mesh(2, 4), params=params)
    eng = mesh.MeshEngine(mspec)
    pstack = eng.to_state(params)
    opt_state = eng.to_state(optimizer.init(params))
    pstack, opt_state, out = eng.train_step(optimizer, pstack, opt_state,
                                            clip, labels, mode='sideways')
    params = eng.to_tree(pstack)             # checkpoints, export
  """
  mspec: MeshSpec

  def __post_init__(self):
    if self.mspec.param_shapes is None:
      raise ValueError(
          'mesh.MeshEngine needs the params\' shapes for its sharded '
          'state: place the network with mesh.place(spec, mesh, ..., '
          'params=params)')

  @property
  def spec(self) -> NetworkSpec:
    return self.mspec.spec

  def with_spec(self, spec: NetworkSpec) -> 'MeshEngine':
    """The same groups and padding for another spec of the network (its
    params' shapes must be the same)."""
    m = self.mspec
    if spec == m.spec:
      return self
    return MeshEngine(place(spec, m.mesh, m.groups, params=m.params_like,
                            pad_value=m.pad_value,
                            state_sharding=m.state_sharding))

  def to_state(self, tree: PyTree) -> PyTree:
    return shard_tree(self.mspec, tree)

  def to_tree(self, state: PyTree) -> PyTree:
    return unshard_tree(self.mspec, state)

  def state_like(self, tree: PyTree) -> PyTree:
    return sharded_like(self.mspec, tree)

  def params_like(self, params: PyTree) -> PyTree:
    del params  # Fixed by the placement.
    return self.mspec.params_like

  def put_batch(self, tree: PyTree, global_size: int) -> PyTree:
    return global_batch(self.mspec.mesh, tree, global_size)

  def batch_like(self, tree: PyTree, global_size: int) -> PyTree:
    """``ShapeDtypeStruct``s of ``put_batch(x, global_size)``: the global
    batch, sharded as ``batch_sharding`` says."""
    _check_batch(self.mspec, global_size)
    def one(x):
      shape = (global_size, *x.shape[1:])
      return jax.ShapeDtypeStruct(
          shape, x.dtype, sharding=batch_sharding(self.mspec.mesh, shape))
    return jax.tree.map(one, tree)

  def init_carry(self, params, clip, targets, mode: str,
                 compute_dtype=jnp.float32) -> MeshCarry:
    del params  # Its shapes are the placement's (and a fresh carry's).
    return init_carry(self.mspec, self.mspec.params_like, clip, targets,
                      mode, compute_dtype)

  def from_stream_carry(self, carry) -> MeshCarry:
    """A ``StreamCarry`` in the mesh layout (a ``MeshCarry`` as it is)."""
    if isinstance(carry, MeshCarry):
      return carry
    return from_stream_carry(self.mspec, None, carry)

  def to_stream_carry(self, carry: MeshCarry) -> engine.StreamCarry:
    return to_stream_carry(self.mspec, None, carry)

  def run(self, params, clip, targets, carry, *, mode: str, start,
          length: int, mask_fill: bool | str, compute_dtype, total=None):
    """``length`` ticks without gradients: ``(loss, ClipOutput)``."""
    loss, (carry, m, _) = _run_packed(
        self.mspec, _to_packed(self.mspec, params), clip, targets, carry,
        mode=mode, start=start,
        length=length, mask_fill=mask_fill, compute_dtype=compute_dtype,
        total=total)
    return loss, engine.finish(self.spec, carry, m)

  def window_grads(self, params, clip, targets, carry, **kw):
    """``(loss, grads, ClipOutput)`` of a window; ``grads`` in the
    state's layout (zero on padding)."""
    return _window_grads_state(self.mspec, params, clip, targets, carry,
                               **kw)

  def forward(self, params, clip, targets, **kw) -> engine.ClipOutput:
    return forward_sharded(self.mspec, params, clip, targets, **kw)

  def train_step(self, optimizer, params, opt_state, clip, targets, **kw):
    """Keeps its inputs (the loop's ``programs.train_step`` donates)."""
    return _train_step_kept(self.mspec, optimizer, params, opt_state, clip,
                            targets, **kw)
