"""The depth-parallel engine on a ``('data', 'stage')`` mesh (DESIGN.md §2).

The same modes, networks, loss normalization, fill masking, flush and target
alignment as ``skipside.engine`` (the oracle), executed as one SPMD program:

- each device on the ``stage`` axis holds one *group* of consecutive stages
  (``placement``); the batch is split over ``data``;
- a clip is one ``lax.scan`` over ticks inside one ``jax.shard_map`` inside one
  ``jax.jit``; in every tick each device runs its own group through
  ``lax.switch`` on ``lax.axis_index('stage')``;
- every edge between devices (chain or skip, any span) moves through
  ``lax.ppermute``: one *round* per device offset ``d``, each device sending
  one padded buffer to the device ``d`` above it (activations) or below it
  (Sideways gradient messages, same buffer layout, summed by the receiver);
- the head and the loss run on the device of the top stage, in the same tick.

Heterogeneous stages are the normal case. Per device, parameters are raveled
and padded to one length and stacked as ``[S, P]`` (sharded over ``stage``);
each device's stage outputs, messages and temporal states live in one padded
per-example buffer ``(B, W)``; transfers gather the needed outputs into a
padded buffer per round. Every padded slot holds ``pad_value`` (NaN in tests:
nothing padded ever reaches a result).

Modes on the mesh:

- ``pipelined_bp`` / ``sideways``: every stage computes every tick, one round
  of transfers per tick.
- ``bp`` (synchronous, the baseline): a frame passes all stages within its
  tick, so the devices run one after the other inside the tick (one phase per
  device; a device waits for its predecessors' ``ppermute``). Slow by design.
- ``pipelined_bp`` and ``bp`` take ``jax.grad`` through the whole mesh program
  (``ppermute`` transposes to the reverse permutation).

Params keep the ``network.split`` pytree structure in and out of
``loss_and_grads`` and ``train_step``: optax, orbax and the training loop do
not care which engine ran. The stream carry has a mesh layout
(``MeshCarry``); ``to_stream_carry`` / ``from_stream_carry`` convert it to and
from ``engine.StreamCarry`` exactly.

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
batch and turns them into a global array with ``global_batch``.
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
from skipside.conv import varying_axes
from skipside.network import NetworkSpec

PyTree = Any
AXES = ('data', 'stage')
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


@dataclasses.dataclass(frozen=True, eq=False)
class MeshSpec:
  """A network placed on a mesh. Hashable by identity (a static jit argument).

  Attributes:
    spec: the network's static structure.
    mesh: a mesh with axes ``('data', 'stage')``.
    groups: one tuple of consecutive stages per device on ``stage``.
    costs: the per-stage costs the groups were balanced on (``None`` if
      given explicitly).
    pad_value: fills every padded slot of every buffer.
  """
  spec: NetworkSpec
  mesh: Mesh
  groups: tuple[tuple[int, ...], ...]
  costs: tuple[float, ...] | None = None
  pad_value: float = 0.0

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
          pad_value: float = 0.0) -> MeshSpec:
  """Places ``spec`` on ``mesh``: groups of consecutive stages per device.

  Args:
    groups: explicit placement (one run of consecutive stages per device;
      missing trailing groups are empty). Overrides everything else.
    params: if given (and no ``groups``/``costs``), stages are balanced on the
      flops XLA counts for each stage's forward + backward
      (``placement.stage_costs``).
    costs: per-stage costs to balance on (e.g. measured times).
    batch_size: per-device batch for the flops count.
    pad_value: value of every padded buffer slot (NaN proves no leaks).

  Without ``groups``, ``costs`` or ``params`` stages are balanced by count.
  """
  if tuple(mesh.axis_names) != AXES:
    raise ValueError(f'the mesh axes must be {AXES}, got {mesh.axis_names}')
  num_stage = mesh.shape['stage']
  if groups is not None:
    return MeshSpec(spec, mesh, placement.validate_groups(
        groups, spec.num_stages, num_stage), None, pad_value)
  if costs is None and params is not None:
    costs = placement.stage_costs(spec, params, batch_size)
  weights = costs if costs is not None else (1.0,) * spec.num_stages
  if len(weights) != spec.num_stages:
    raise ValueError(f'{len(weights)} costs for {spec.num_stages} stages')
  return MeshSpec(spec, mesh, placement.balance(weights, num_stage),
                  None if costs is None else tuple(costs), pad_value)


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of a global batch this process must load (its 'data' shards)."""
  sharding = NamedSharding(mesh, P('data'))
  index = sharding.addressable_devices_indices_map((global_batch_size,))
  starts = [i[0].start or 0 for i in index.values()]
  stops = [global_batch_size if i[0].stop is None else i[0].stop
           for i in index.values()]
  return slice(min(starts), max(stops))


def global_batch(mesh: Mesh, local: PyTree, global_batch_size: int) -> PyTree:
  """Process-local rows (``process_rows``) -> global arrays sharded on 'data'.

  Each leaf of ``local`` is ``(rows, ...)``; the result is ``(B, ...)`` with
  ``B = global_batch_size``, sharded over ``data`` and replicated over
  ``stage``.
  """
  sharding = NamedSharding(mesh, P('data'))

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        sharding, x, (global_batch_size, *x.shape[1:]))
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
  its sender's buffer; ``index``: ``(S, width)`` gather indices into each
  device's output buffer (padded slots point at the pad column).
  """
  offset: int
  payload: tuple[tuple[int, ...], ...]
  slots: dict
  width: int
  index: np.ndarray
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
    width, slots, rows = 1, {}, []
    for g in range(num_dev):
      offset, idx = 0, []
      for k in payload[g]:
        slots[k] = _Slot(offset, spec.out_shapes[k])
        offset += slots[k].size
        o = out_slots[k][0]
        idx.extend(range(o.offset, o.offset + o.size))
      rows.append(idx)
      width = max(width, offset)
    index = np.full((num_dev, width), owidth, np.int32)  # Pad column.
    for g, idx in enumerate(rows):
      index[g, :len(idx)] = idx
    up = tuple((g, g + d) for g in range(num_dev) if payload[g])
    rounds.append(_Round(d, payload, slots, width, index, up))

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


_PLANS = {}


def _plan(mspec: MeshSpec, params: PyTree,
          act_dtype=jnp.float32) -> _Plan:
  """The (cached) plan for these params' shapes."""
  key = (id(mspec), jax.tree.structure(params), jnp.dtype(act_dtype),
         tuple((x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(params)))
  if key not in _PLANS or _PLANS[key].mspec is not mspec:
    _PLANS[key] = _make_plan(mspec, params, act_dtype)
  return _PLANS[key]


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


def _stage_inputs(plan: _Plan, g: int, l: int, x, own, recvs):
  """In-edge values of stage ``l`` on device ``g`` (chain first).

  ``own(k)`` gives a same-device source's value; remote sources are read
  from the round buffers ``recvs``.
  """
  if l == 0:
    return (x,)
  values = []
  for k in plan.spec.in_edges[l]:
    src = plan.device_of[k]
    if src == g:
      values.append(own(k))
    else:
      r = plan.round_of[g - src]
      values.append(_unpack(recvs[r], plan.rounds[r].slots[k]))
  return tuple(values)


def _states_of(plan: _Plan, st: jax.Array, l: int):
  td, slots = plan.state_defs[l]
  return jax.tree.unflatten(td, [_unpack(st, s) for s in slots])


def _pack_group(plan, values: dict, grp, width, lead, leaves=lambda v: [v]):
  parts = [x for l in grp for x in leaves(values[l])]
  return _pack(parts, width, plan.mspec.pad_value, plan.act_dtype, lead)


def _forward_branch(plan: _Plan, g: int, sync: bool):
  """Device ``g``'s forward tick: pipelined, or synchronous (``bp``).

  Operands: ``(pflat (P,), recvs, own (b, W_out), st (b, W_state), x, target,
  w, metrics)``; returns ``(own, st, metrics)``.
  """
  spec, grp = plan.spec, plan.mspec.groups[g]

  def branch(ops):
    pflat, recvs, own, st, x, target, w, m = ops
    b = x.shape[0]
    ys, states = {}, {}
    for l in grp:
      source = (lambda k: ys[k]) if sync else (
          lambda k: _unpack(own, plan.out_slots[k]))
      ins = _stage_inputs(plan, g, l, x, source, recvs)
      p = _unravel(pflat, *plan.param_defs[l], plan.act_dtype)
      ys[l], states[l] = spec.apply_block(l, p, ins, _states_of(plan, st, l))
    top = spec.num_stages - 1
    if top in grp:
      head = _unravel(pflat, *plan.param_defs[top + 1], plan.act_dtype)
      _, (pred, loss) = tick_lib.head_loss(spec, head, ys[top], target, w)
      m = engine.update_metrics(spec, m, w, loss, pred, target)
    own = _pack_group(plan, ys, grp, plan.out_width, (b,))
    st = _pack_group(plan, states, grp, plan.state_width, (b,),
                     jax.tree.leaves)
    return _varying((own, st, m))
  return branch


def _idle_forward(ops):
  _, _, own, st, _, _, _, m = ops
  return _varying((own, st, m))


def _sideways_branch(plan: _Plan, g: int):
  """Device ``g``'s Sideways tick (DESIGN.md §1, ``tick.sideways_tick``).

  Operands: ``(pflat, recvs, own, msgs, st, x, target, w, metrics)``.
  Returns ``(own, local_msgs, sends, st, grads (P,), metrics)``:
  ``local_msgs`` are the messages this device's stages send to its own
  stages, ``sends`` one buffer per round for the devices below.
  """
  spec, grp = plan.spec, plan.mspec.groups[g]
  top = spec.num_stages - 1
  num_data = plan.mspec.num_data

  def branch(ops):
    pflat, recvs, own, msgs, st, x, target, w, m = ops
    b = x.shape[0]
    ys, states, vjps, pgrads = {}, {}, {}, {}
    for l in grp:
      ins = _stage_inputs(plan, g, l, x,
                          lambda k: _unpack(own, plan.out_slots[k]), recvs)
      s = _states_of(plan, st, l)

      def block(p, ins, l=l, s=s):
        return spec.apply_block(l, p, ins, s)
      p = _unravel(pflat, *plan.param_defs[l], plan.act_dtype)
      ys[l], vjps[l], states[l] = jax.vjp(block, p, ins, has_aux=True)

    cot = {l: _unpack(msgs, plan.out_slots[l]) for l in grp if l != top}
    if top in grp:
      head = _unravel(pflat, *plan.param_defs[top + 1], plan.act_dtype)
      # Each device's loss is a mean over its b examples; / num_data makes
      # the messages and gradients those of the global batch mean.
      (_, (pred, loss)), (pgrads['head'], cot[top]) = jax.value_and_grad(
          tick_lib.head_loss, argnums=(1, 2), has_aux=True)(
              spec, head, ys[top], target, w / num_data)
      m = engine.update_metrics(spec, m, w, loss, pred, target)

    local = {k: jnp.zeros_like(ys[k]) for k in grp}
    remote = {}
    for l in grp:
      pgrads[l], in_grads = vjps[l](cot[l].astype(ys[l].dtype))
      if l == 0:
        continue
      for k, gi in zip(spec.in_edges[l], in_grads):
        if plan.device_of[k] == g:
          local[k] = local[k] + gi
        else:
          remote[k] = remote[k] + gi if k in remote else gi

    sends = []
    for r in plan.rounds:
      src = g - r.offset  # This device sends messages down to ``src``.
      keys = r.payload[src] if src >= 0 else ()
      sends.append(_pack([remote[k] for k in keys], r.width,
                         plan.mspec.pad_value, plan.act_dtype, (b,)))
    keys = list(grp) + (['head'] if top in grp else [])
    grads = _pack([x for k in keys for x in jax.tree.leaves(pgrads[k])],
                  plan.param_width, plan.mspec.pad_value, plan.dtype)
    return _varying((
        _pack_group(plan, ys, grp, plan.out_width, (b,)),
        _pack_group(plan, local, grp, plan.out_width, (b,)),
        tuple(sends),
        _pack_group(plan, states, grp, plan.state_width, (b,),
                    jax.tree.leaves),
        grads, m))
  return branch


def _idle_sideways(plan: _Plan):
  def branch(ops):
    pflat, _, own, msgs, st, x, _, _, m = ops
    b = x.shape[0]
    sends = tuple(jnp.full((b, r.width), plan.mspec.pad_value, plan.act_dtype)
                  for r in plan.rounds)
    return _varying((own, msgs, sends, st, jnp.zeros_like(pflat), m))
  return branch


# -- The clip on the mesh. ---------------------------------------------------

def _transfer_up(plan: _Plan, own: jax.Array, g) -> tuple:
  """Last tick's outputs to the devices above: one ppermute per round."""
  ext = jnp.concatenate(
      [own, jnp.full((own.shape[0], 1), plan.mspec.pad_value, own.dtype)], 1)
  return tuple(
      lax.ppermute(jnp.take(ext, jnp.asarray(r.index)[g], axis=1), 'stage',
                   r.up) for r in plan.rounds)


def _messages_down(plan: _Plan, local: jax.Array, sends, g) -> jax.Array:
  """Messages to the devices below; received ones add to the local ones."""
  ext = jnp.concatenate(
      [local, jnp.full((local.shape[0], 1), plan.mspec.pad_value,
                       local.dtype)], 1)
  for r, send in zip(plan.rounds, sends):
    got = lax.ppermute(send, 'stage', r.down)
    ext = ext.at[:, jnp.asarray(r.index)[g]].add(got)  # Pads: last column.
  return ext[:, :-1]


def _sync_tick(plan: _Plan, branches, pflat, own, st, x, target, w, m, g):
  """A ``bp`` tick: devices run one after another, each waiting for the
  activations its predecessors send within the tick."""
  b = x.shape[0]
  inbox = [_varying(jnp.full((b, r.width), plan.mspec.pad_value,
                             plan.act_dtype))
           for r in plan.rounds]
  for p, branch in branches:
    own, st, m = lax.switch(jnp.where(g == p, 1, 0),
                            [_idle_forward, branch],
                            (pflat, tuple(inbox), own, st, x, target, w, m))
    ext = jnp.concatenate(
        [own, jnp.full((b, 1), plan.mspec.pad_value, own.dtype)], 1)
    for i, r in enumerate(plan.rounds):
      if r.payload[p]:
        got = lax.ppermute(ext[:, r.index[p]], 'stage', ((p, p + r.offset),))
        inbox[i] = jnp.where(g == p + r.offset, got, inbox[i])
  return own, st, m


def _device_clip(plan: _Plan, *, mode: str, length: int, per_frame: bool,
                 num_frames: int):
  """The per-device program of ``length`` ticks (the body of shard_map)."""
  spec, groups = plan.spec, plan.mspec.groups
  sideways = mode == 'sideways'
  if mode == 'bp':
    sync = [(g, _forward_branch(plan, g, True))
            for g, grp in enumerate(groups) if grp]
  else:
    make = _sideways_branch if sideways else functools.partial(
        _forward_branch, sync=False)
    idle = _idle_sideways(plan) if sideways else _idle_forward
    branches = [make(plan, g) if grp else idle for g, grp in enumerate(groups)]

  def fn(pstack, clip, targets, outs, msgs, states, fifo, start, weights):
    g = lax.axis_index('stage')
    # Varying over 'data' here, once: per-tick VJPs then give each shard's own
    # gradient (an invariant input would make every VJP psum over 'data').
    pflat = _varying(pstack[0])
    b = clip.shape[0]
    m = {'loss': jnp.zeros(()), 'accuracy': jnp.zeros(())}
    if spec.loss != 'mse':
      m['predictions'] = jnp.zeros((b, *spec.prediction_shape))
    gacc = jnp.zeros_like(pflat) if sideways else None
    init = (_varying((outs[0], msgs[0], states[0], m, gacc)), fifo)

    def body(c, i):
      (own, msg, st, m, gacc), fifo = c
      t = jnp.minimum(start + i, num_frames - 1)
      x = engine.read_frame(clip, t, plan.act_dtype)
      target_now = (lax.dynamic_index_in_dim(targets, t, 1, keepdims=False)
                    if per_frame else targets)
      if fifo is None:  # No delay (bp).
        target = target_now
      else:
        target, fifo = engine.align_target(fifo, target_now)
      w = weights[i]
      if mode == 'bp':
        own, st, m = _sync_tick(plan, sync, pflat, own, st, x, target, w, m, g)
      elif not sideways:
        recvs = _transfer_up(plan, own, g)
        own, st, m = lax.switch(g, branches,
                                (pflat, recvs, own, st, x, target, w, m))
      else:
        recvs = _transfer_up(plan, own, g)
        own, local, sends, st, gtick, m = lax.switch(
            g, branches, (pflat, recvs, own, msg, st, x, target, w, m))
        msg = _messages_down(plan, local, sends, g)
        gacc = gacc + gtick
      return ((own, msg, st, m, gacc), fifo), None

    ((own, msg, st, m, gacc), fifo), _ = lax.scan(body, init,
                                                  jnp.arange(length))
    # Only the top device adds to the metrics; each data shard's are means.
    metrics = {k: lax.psum(v, 'stage') for k, v in m.items()}
    for k in ('loss', 'accuracy'):
      metrics[k] = lax.pmean(metrics[k], 'data')
    grads = None if gacc is None else lax.psum(gacc, 'data')[None]
    return (metrics['loss'], metrics, own[None], msg[None], st[None], fifo,
            grads)
  return fn


def _check_batch(mspec: MeshSpec, clip: jax.Array):
  if clip.shape[0] % mspec.num_data:
    raise ValueError(f'batch {clip.shape[0]} does not split over '
                     f"{mspec.num_data} devices on 'data'")


def _run(mspec: MeshSpec, params: PyTree, clip, targets, carry: MeshCarry, *,
         mode: str, start, length: int, mask_fill: bool, compute_dtype):
  """``length`` ticks from clip frame ``start`` on the mesh.

  Returns ``(loss, (carry, metrics, grads))``; ``grads`` is the Sideways
  gradient (params pytree) or ``None``.
  """
  spec = mspec.spec
  plan = _plan(mspec, params, compute_dtype)
  num_frames = clip.shape[1]
  per_frame = engine.is_per_frame(spec, clip, targets)
  weights, count = engine.tick_weights(carry, start, length, num_frames,
                                        engine.delay(spec, mode), mask_fill)
  pstack = _ravel_params(plan, params, mspec.pad_value)
  metric_specs = {'loss': P(), 'accuracy': P()}
  if spec.loss != 'mse':
    metric_specs['predictions'] = P('data')
  sharded = P('stage', 'data')
  fn = jax.shard_map(
      _device_clip(plan, mode=mode, length=length, per_frame=per_frame,
                   num_frames=num_frames),
      mesh=mspec.mesh,
      in_specs=(P('stage'), P('data'), P('data'), sharded, sharded, sharded,
                P('data'), P(), P()),
      out_specs=(P(), metric_specs, sharded, sharded, sharded, P('data'),
                 None if mode != 'sideways' else P('stage')))
  # A zero-size FIFO (no delay) stays outside: XLA:CPU in jax 0.11 crashes
  # compiling zero-size arrays through this shard_map + scan.
  fifo = carry.targets if carry.targets.size else None
  loss, m, outs, msgs, states, fifo, gstack = fn(
      pstack, clip, targets, carry.outs, carry.msgs, carry.states, fifo,
      jnp.asarray(start, jnp.int32), weights)
  m = dict(m, valid_ticks=count)
  carry = MeshCarry(outs=outs, msgs=msgs, states=states,
                    targets=carry.targets if fifo is None else fifo,
                    tick=carry.tick + length)
  grads = None if gstack is None else _unravel_params(plan, gstack)
  return loss, (carry, m, grads)


def _window_grads(mspec, params, clip, targets, carry, *, mode, start, length,
                  mask_fill, compute_dtype):
  carry = lax.stop_gradient(carry)
  if mode == 'sideways':
    loss, (carry, m, grads) = _run(mspec, params, clip, targets, carry,
                                   mode=mode, start=start, length=length,
                                   mask_fill=mask_fill,
                                   compute_dtype=compute_dtype)
  else:
    def loss_fn(p):
      loss, (c, m, _) = _run(mspec, p, clip, targets, carry, mode=mode,
                             start=start, length=length, mask_fill=mask_fill,
                             compute_dtype=compute_dtype)
      return loss, (c, m)
    (loss, (carry, m)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
  return loss, grads, engine.finish(mspec.spec, carry, m)


def _prepare(mspec, params, clip, targets, carry, mode,
             compute_dtype) -> MeshCarry:
  engine.check_mode(mode)
  _check_batch(mspec, clip)
  if tuple(clip.shape[2:]) != mspec.spec.frame_shape:
    raise ValueError(
        f'clip of shape {clip.shape} does not match the network: expected '
        f'(batch, frames, *{mspec.spec.frame_shape})')
  if carry is None:
    return init_carry(mspec, params, clip, targets, mode, compute_dtype)
  if isinstance(carry, engine.StreamCarry):
    return from_stream_carry(mspec, params, carry)
  return carry


@functools.partial(jax.jit, static_argnames=('mspec', 'mode', 'flush',
                                             'mask_fill', 'compute_dtype'))
def loss_and_grads(mspec: MeshSpec, params: PyTree, clip: jax.Array,
                   targets: jax.Array, *, mode: str, carry=None,
                   flush: int = 0, mask_fill: bool = True,
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
                   compute_dtype)
  return _window_grads(mspec, params, clip, targets, carry, mode=mode,
                       start=0, length=clip.shape[1] + flush,
                       mask_fill=mask_fill, compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=('mspec', 'mode', 'flush',
                                             'mask_fill', 'compute_dtype'))
def forward(mspec: MeshSpec, params: PyTree, clip: jax.Array,
            targets: jax.Array, *, mode: str, carry=None, flush: int = 0,
            mask_fill: bool = True,
            compute_dtype=jnp.float32) -> engine.ClipOutput:
  """Runs a clip forward on the mesh (evaluation); as ``engine.forward``
  without ``collect``. ``sideways`` uses the pipelined forward."""
  carry = _prepare(mspec, params, clip, targets, carry, mode,
                   compute_dtype)
  fwd_mode = 'pipelined_bp' if mode == 'sideways' else mode
  _, (carry, m, _) = _run(mspec, params, clip, targets, carry, mode=fwd_mode,
                          start=0, length=clip.shape[1] + flush,
                          mask_fill=mask_fill, compute_dtype=compute_dtype)
  return engine.finish(mspec.spec, carry, m)


@functools.partial(jax.jit, static_argnames=('mspec', 'optimizer', 'mode',
                                             'flush', 'mask_fill',
                                             'update_every', 'compute_dtype'))
def train_step(mspec: MeshSpec, optimizer: optax.GradientTransformation,
               params: PyTree, opt_state: PyTree, clip: jax.Array,
               targets: jax.Array, *, mode: str, carry=None, flush: int = 0,
               mask_fill: bool = True, update_every: int | None = None,
               compute_dtype=jnp.float32):
  """One training step on the mesh; as ``engine.train_step``.

  Returns ``(params, opt_state, ClipOutput)`` with ``params`` in the
  ``network.split`` structure.
  """
  carry = _prepare(mspec, params, clip, targets, carry, mode,
                   compute_dtype)

  def grads_fn(p, c, start, length):
    return _window_grads(mspec, p, clip, targets, c, mode=mode, start=start,
                         length=length, mask_fill=mask_fill,
                         compute_dtype=compute_dtype)
  return engine.optimize_clip(grads_fn, optimizer, params, opt_state, carry,
                              num_frames=clip.shape[1], flush=flush,
                              update_every=update_every)
