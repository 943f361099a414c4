"""One tick of each mode as pure functions: the math of DESIGN.md §1.

Notation (stages ``0 .. L-1``): at tick ``t`` frame ``x_t`` arrives.

- Pipelined forward: ``in_0(t) = x_t``, ``in_l(t) = combine_l(out_k(t-1) for
  k -> l)``, ``out_l(t) = f_l(in_l(t))``. Every edge has one tick of latency,
  so the chain output at tick ``t`` belongs to frame ``t - (L-1)``.
- Synchronous forward (``bp``): the same graph with zero latency; a frame
  passes all stages within its tick.
- Sideways backward: stage ``l`` holds the message ``g_l(t)`` its successors
  sent at tick ``t-1`` (the loss gradient w.r.t. ``out_l``, summed over its
  out-edges). It takes one VJP of its block at its *current* input: the
  parameter gradient is accumulated, the input gradient is split over the
  in-edges and arrives at the sources at tick ``t+1``. A temporal stage's
  gradients w.r.t. its cached past inputs are added to that input gradient
  (``stages.link_cache``): they travel with the message.
- The head and the loss sit on the top stage's tick (the same device in the
  mesh engine): the top stage's cotangent is the loss gradient of the same
  tick, so the top stage's gradient is exact and the bottom stage's is exact
  on a constant video from tick ``2L-2`` on.

Nothing here loops over time. The functions run over a *group* of
consecutive stages (``forward_group``, ``sideways_group``):
``skipside.engine`` scans them with one group of all stages, and
``skipside.mesh`` runs one group per device, each in-edge value brought by a
transport; ``batchnorm.clip_moments`` scans the synchronous
``forward_group`` with a block call that collects its norm statistics.

Example (the single-device engine's tick)::

    outs, msgs, states, grads, (loss, pred) = tick.sideways_tick(
        spec, params, outs, msgs, states, frame, target, weight)
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from skipside.network import NetworkSpec

PyTree = Any


def per_example_loss(loss: str, pred: jax.Array,
                     target: jax.Array) -> jax.Array:
  """Loss per example, shape ``(B,)``.

  ``xent``: ``pred (B, K)`` logits, ``target (B,)`` int labels.
  ``sigmoid_xent``: ``pred (B, K)``, ``target (B, K)`` multi-hot.
  ``mse``: ``pred`` and ``target`` of equal shape ``(B, ...)``.
  """
  if loss == 'xent':
    return optax.softmax_cross_entropy_with_integer_labels(
        pred, target.astype(jnp.int32))
  if loss == 'sigmoid_xent':
    return optax.sigmoid_binary_cross_entropy(
        pred, target.astype(pred.dtype)).mean(axis=-1)
  if loss == 'mse':
    err = (pred - target.astype(pred.dtype)) ** 2
    return err.reshape(err.shape[0], -1).mean(axis=1)
  raise ValueError(f'loss {loss!r} is unknown')


def head_loss(spec: NetworkSpec, head_params: PyTree, top: jax.Array,
              target: jax.Array, weight: jax.Array):
  """Weighted mean loss of one tick and the head's predictions.

  Args:
    top: the top stage's output ``(B, *out_shapes[-1])``.
    target: this tick's target (already aligned to the pipeline delay).
    weight: scalar, ``mask / valid ticks`` of the objective
      (``engine.tick_weights``); 0 during fill and flush.

  Returns:
    ``(weight * mean_b loss, (pred, unweighted loss per example (B,)))``.
  """
  pred = spec.apply_head(head_params, top)
  losses = per_example_loss(spec.loss, pred.astype(jnp.float32), target)
  return weight * losses.mean(), (pred, losses)


# -- One tick over a group of consecutive stages. ------------------------------
#
# Every engine runs these: the single-device engine with one group holding all
# stages, the mesh engine with one group per device on the 'stage' axis. What
# differs is only where a value on an in-edge comes from and where an input
# gradient goes, and that is the caller's ``value_of``: a local buffer for a
# source inside the group, a transfer buffer (``ppermute``) for one outside.

def stage_inputs(spec: NetworkSpec, l: int, x: jax.Array,
                 value_of: Callable[[int], jax.Array]) -> tuple:
  """In-edge values of stage ``l``, chain first: ``(x,)`` for stage 0, else
  ``value_of(k)`` for every source ``k``."""
  if l == 0:
    return (x,)
  return tuple(value_of(k) for k in spec.in_edges[l])


def forward_group(spec: NetworkSpec, group: Sequence[int], params_of,
                  value_of, states_of, x: jax.Array, *, sync: bool,
                  apply_block=None):
  """One forward tick of the stages in ``group`` (consecutive, ascending).

  Args:
    params_of, states_of: stage index -> its params / temporal state.
    value_of: source stage -> the value its in-edge carries: last tick's
      output (pipelined) or, with ``sync``, this tick's output of a stage
      outside the group (a stage inside the group is read from this tick's
      results directly).
    x: the frame ``(B, *frame_shape)`` (read by stage 0 only).
    apply_block: ``(l, params, inputs, state) -> (y, state)``; default
      ``spec.apply_block`` (statistics passes call the block their way).

  Returns:
    ``(ys, states)``: dicts stage -> this tick's output / new state.
  """
  apply_block = apply_block or spec.apply_block
  ys, new_states = {}, {}
  source = (lambda k: ys[k] if k in ys else value_of(k)) if sync else value_of
  for l in group:
    ys[l], new_states[l] = apply_block(
        l, params_of(l), stage_inputs(spec, l, x, source), states_of(l))
  return ys, new_states


def _gated(gate_of, l: int, grads: PyTree) -> PyTree:
  """``grads`` where stage ``l``'s gate is open, zeros where it is shut."""
  if gate_of is None:
    return grads
  return jax.tree.map(lambda g: jnp.where(gate_of(l), g, 0), grads)


def sideways_group(spec: NetworkSpec, group: Sequence[int], params_of,
                   value_of, states_of, msg_of, x: jax.Array, head_params,
                   target: jax.Array, weight: jax.Array, gate_of=None):
  """One Sideways tick (DESIGN.md §1) of the stages in ``group``.

  Each stage takes one VJP of its block at its *current* input with the
  message ``msg_of(l)`` its successors sent last tick as cotangent; the top
  stage (if in the group) uses this tick's loss gradient instead, with the
  head run here.

  Args:
    params_of, value_of, states_of, x: as in ``forward_group`` (pipelined).
    msg_of: stage -> the message it holds (gradient w.r.t. its output).
    head_params, target, weight: the head and this tick's aligned target
      and loss weight; used only if the top stage is in ``group``.
    gate_of: stage -> whether its parameter gradient of this tick counts
      (``engine.stage_gates``; the head goes with the top stage); ``None``:
      all count. Messages are sent either way.

  Returns:
    ``(ys, states, grads, sent, head)``: dicts stage -> output, new state,
    parameter-gradient contribution; ``sent``: source stage -> the sum of
    the input gradients this group's stages send it (every in-edge, inside
    the group or not); ``head``: ``(head_grads, losses (B,), pred)`` or
    ``None``.
  """
  top = spec.num_stages - 1
  ys, new_states, vjps = {}, {}, {}
  for l in group:
    # sideways=True: a temporal stage's cached inputs are linked to ins, so
    # their gradients join the input gradient sent down (stages.link_cache).
    def block(p, ins, l=l):
      return spec.apply_block(l, p, ins, states_of(l), sideways=True)
    ys[l], vjps[l], new_states[l] = jax.vjp(
        block, params_of(l), stage_inputs(spec, l, x, value_of), has_aux=True)

  cotangents = {l: msg_of(l) for l in group if l != top}
  head = None
  if top in group:  # Its only successor is the head (edges go up), same tick.
    (_, (pred, losses)), (head_grads, cotangents[top]) = jax.value_and_grad(
        head_loss, argnums=(1, 2), has_aux=True)(
            spec, head_params, ys[top], target, weight)
    head = (_gated(gate_of, top, head_grads), losses, pred)

  grads, sent = {}, {}
  for l in group:
    grads[l], in_grads = vjps[l](cotangents[l].astype(ys[l].dtype))
    grads[l] = _gated(gate_of, l, grads[l])
    # (A VJP's input gradient has its input's dtype: the source's.)
    for k, g in zip(spec.in_edges[l], in_grads if l else ()):
      sent[k] = sent[k] + g if k in sent else g
  return ys, new_states, grads, sent, head


# -- The whole network as one group (the single-device engine). ---------------

def _all(spec: NetworkSpec) -> range:
  return range(spec.num_stages)


def pipelined_forward(spec: NetworkSpec, params: PyTree, outs: tuple,
                      states: tuple, x: jax.Array):
  """One pipelined forward tick of all stages: ``(new_outs, new_states)``."""
  ys, new_states = forward_group(
      spec, _all(spec), lambda l: params['blocks'][l], lambda k: outs[k],
      lambda l: states[l], x, sync=False)
  return tuple(ys.values()), tuple(new_states.values())


def synchronous_forward(spec: NetworkSpec, params: PyTree, states: tuple,
                        x: jax.Array):
  """One synchronous tick (``bp``): ``x`` passes every stage. (outs, states)."""
  ys, new_states = forward_group(
      spec, _all(spec), lambda l: params['blocks'][l], None,
      lambda l: states[l], x, sync=True)
  return tuple(ys.values()), tuple(new_states.values())


def sideways_tick(spec: NetworkSpec, params: PyTree, outs: tuple, msgs: tuple,
                  states: tuple, x: jax.Array, target: jax.Array,
                  weight: jax.Array, gate_of=None):
  """One Sideways tick of the whole network (``sideways_group`` of all
  stages).

  Args:
    outs: every stage's output of the previous tick.
    msgs: every stage's message, sent at the previous tick.
    states: temporal states.
    x: the frame ``(B, *frame_shape)``; ``target``: the aligned target.
    weight: the loss weight of this tick (0 during fill and flush).
    gate_of: as in ``sideways_group``.

  Returns:
    ``(new_outs, new_msgs, new_states, grads, (losses, pred))`` where
    ``grads`` has the params' structure and is this tick's gradient
    contribution, ``losses (B,)`` the unweighted loss per example.
  """
  ys, new_states, grads, sent, head = sideways_group(
      spec, _all(spec), lambda l: params['blocks'][l], lambda k: outs[k],
      lambda l: states[l], lambda l: msgs[l], x, params['head'], target,
      weight, gate_of)
  head_grads, losses, pred = head
  new_msgs = tuple(sent[l] if l in sent else jnp.zeros_like(ys[l])
                   for l in _all(spec))
  grads = {'blocks': [grads[l] for l in _all(spec)], 'head': head_grads}
  return (tuple(ys.values()), new_msgs, tuple(new_states.values()), grads,
          (losses, pred))
