"""The clip runner on one device: a ``lax.scan`` over the ticks of a clip.

Three modes, the same network and data (DESIGN.md §1):

=================  ===========  =====================  =================
mode               forward      gradient               activation memory
=================  ===========  =====================  =================
``bp``             synchronous  exact (through clip)   O(L·T)
``pipelined_bp``   pipelined    exact (through clip)   O(L·T)
``sideways``       pipelined    Sideways rule          O(L)
=================  ===========  =====================  =================

With skip edges, ``sideways`` is Skip-Sideways.

Defaults, stated once:

- ``mask_fill=True``: in pipelined modes the first ``L-1`` ticks of a fresh
  stream (before the chain output holds a real frame) are masked out of the
  loss. A stream continued through ``carry`` is past its fill and masks none.
- ``flush=0``: no flush. ``flush=n`` appends ``n`` ticks that repeat the last
  frame with the loss masked, so the last errors reach the bottom stages
  (``n = L-1`` lets every in-flight message land). A flushed carry should not
  be continued.
- Targets: a clip label ``(B,)`` (or ``(B, K)`` multi-hot) applies to every
  tick; per-frame targets ``(B, T, ...)`` are delayed by the pipeline depth
  (the chain output at tick ``t`` belongs to frame ``t-(L-1)``) through a FIFO
  in the carry, so a stream's targets stay aligned across clips.
- One optax step per clip, the gradient averaged over valid ticks and the
  batch (``train_step``); ``update_every=k`` is the online mode: a step every
  ``k`` ticks, the stream carried between them (exact modes truncate their
  gradient at those boundaries).
- The gradient of ``bp`` / ``pipelined_bp`` does not cross clip boundaries:
  the incoming carry is a constant.

Memory: the clip is read frame by frame inside the scan (no time-major copy)
and per-tick metrics are reduced in the carry, so ``sideways``' temporary
memory does not grow with T.

Building blocks that other runners (``skipside.mesh``,
``skipside.progressive``) share with this one, so that every runner has the
same semantics: ``read_frame``, ``align_target``, ``tick_weights``,
``update_metrics``, ``run_ticks``, ``window_grads``, ``finish``,
``apply_gradients``, ``optimize_clip``.

Example::

    spec, params = network.split(net)
    loss, grads, out = engine.loss_and_grads(spec, params, clip, labels,
                                             mode='sideways')
    # Continue the stream into the next clip:
    loss, grads, out = engine.loss_and_grads(spec, params, clip2, labels,
                                             mode='sideways', carry=out.carry)
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from skipside import network
from skipside import tick as tick_lib
from skipside.network import NetworkSpec

PyTree = Any
MODES = ('bp', 'pipelined_bp', 'sideways')


class StreamCarry(NamedTuple):
  """What a stream carries from one clip to the next.

  Attributes:
    outs: per stage, its output of the last tick ``(B, *out_shapes[l])``.
    msgs: per stage, the Sideways message it holds (zeros in other modes).
    states: per stage, its temporal state (``()`` if stateless).
    targets: FIFO of targets not yet matched to an output,
      ``(B, delay, *target_shape)``.
    tick: int32 scalar, ticks this stream has run.
  """
  outs: tuple
  msgs: tuple
  states: tuple
  targets: jax.Array
  tick: jax.Array


class ClipOutput(NamedTuple):
  """Result of running a clip.

  Attributes:
    carry: the stream carry after the clip.
    metrics: scalars: ``loss`` (mean over valid ticks and batch),
      ``valid_ticks``, and ``accuracy`` (per tick, ``xent`` only).
    predictions: the head output averaged over valid ticks ``(B, K)`` for
      classification losses (clip-level logits), ``None`` for ``mse``.
  """
  carry: StreamCarry
  metrics: dict
  predictions: jax.Array | None


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'mode {mode!r} is unknown; use one of {MODES}')


def delay(spec: NetworkSpec, mode: str) -> int:
  """Ticks between a frame entering and its chain output reaching the loss."""
  return 0 if mode == 'bp' else spec.depth


def is_per_frame(spec: NetworkSpec, clip: jax.Array, targets: jax.Array) -> bool:
  """Whether ``targets`` holds one target per frame (else one per clip)."""
  clip_ndim = {'xent': 1, 'sigmoid_xent': 2}.get(spec.loss)
  if clip_ndim is None:  # mse: always per frame.
    per_frame = True
  else:
    per_frame = targets.ndim == clip_ndim + 1
  if per_frame and targets.shape[:2] != clip.shape[:2]:
    raise ValueError(
        f'per-frame targets {targets.shape} do not match the clip '
        f'{clip.shape}: expected (batch, frames) = {clip.shape[:2]} first')
  return per_frame


def _tick_target_like(spec, clip, targets) -> jax.ShapeDtypeStruct:
  if is_per_frame(spec, clip, targets):
    return jax.ShapeDtypeStruct((targets.shape[0], *targets.shape[2:]),
                                targets.dtype)
  return jax.ShapeDtypeStruct(targets.shape, targets.dtype)


def init_carry(spec: NetworkSpec, params: PyTree, clip: jax.Array,
               targets: jax.Array, mode: str,
               compute_dtype=jnp.float32) -> StreamCarry:
  """A fresh stream: zero buffers, messages, states and target FIFO.

  Only shapes of ``clip (B, T, H, W, C)`` and ``targets`` are used (any
  spatial size the network accepts: ``network.for_frame_shape``);
  buffers and states are in ``compute_dtype``.
  """
  check_mode(mode)
  spec = network.for_frame_shape(spec, params, clip.shape[2:])
  b = clip.shape[0]
  outs = tuple(jnp.zeros((b, *s), compute_dtype) for s in spec.out_shapes)
  target = _tick_target_like(spec, clip, targets)
  fifo = jnp.zeros((b, delay(spec, mode), *target.shape[1:]), target.dtype)
  return StreamCarry(outs=outs, msgs=outs,
                     states=spec.init_states(params, b, compute_dtype),
                     targets=fifo, tick=jnp.zeros((), jnp.int32))


def read_frame(clip: jax.Array, t: jax.Array, dtype) -> jax.Array:
  """Frame ``t`` of ``clip (B, T, ...)`` in ``dtype``, read in place (no copy)."""
  return lax.dynamic_index_in_dim(clip, t, axis=1, keepdims=False).astype(dtype)


def _cast(tree: PyTree, dtype) -> PyTree:
  """Floating leaves of ``tree`` in ``dtype`` (mixed precision compute)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


def align_target(fifo: jax.Array, target: jax.Array):
  """Pushes this tick's target, pops the one that matches the output now."""
  if fifo.shape[1] == 0:
    return target, fifo
  return fifo[:, 0], jnp.concatenate([fifo[:, 1:], target[:, None]], axis=1)


def tick_weights(carry: StreamCarry, start, length: int, num_frames: int,
                  depth: int, mask_fill: bool):
  """Loss weight of each tick of a window: ``mask / number of valid ticks``."""
  local = start + jnp.arange(length)
  valid = local < num_frames
  if mask_fill:
    valid &= (carry.tick + jnp.arange(length)) >= depth
  count = valid.sum()
  return valid / jnp.maximum(count, 1), count


def _init_metrics(spec: NetworkSpec, batch: int):
  m = {'loss': jnp.zeros(()), 'accuracy': jnp.zeros(())}
  if spec.loss != 'mse':
    m['predictions'] = jnp.zeros((batch, *spec.prediction_shape))
  return m


def update_metrics(spec, m, weight, loss, pred, target):
  m = dict(m, loss=m['loss'] + weight * loss)
  if spec.loss == 'xent':
    correct = (pred.argmax(-1) == target).mean()
    m['accuracy'] = m['accuracy'] + weight * correct
  if 'predictions' in m:
    m['predictions'] = m['predictions'] + weight * pred.astype(jnp.float32)
  return m


def run_ticks(spec: NetworkSpec, params: PyTree, clip: jax.Array,
         targets: jax.Array, carry: StreamCarry, *, mode: str, start,
         length: int, mask_fill: bool, compute_dtype, collect: bool = False):
  """Scans ``length`` ticks from clip frame ``start`` (frames past the end
  repeat the last one: the flush).

  Returns ``(loss, (carry, metrics, grads, collected))``; ``grads`` is the
  accumulated Sideways gradient (``None`` in other modes, whose gradient is
  taken through this function), ``collected`` the per-tick stage outputs and
  predictions when ``collect`` (tests and analysis only: it grows with T).
  """
  num_frames = clip.shape[1]
  per_frame = is_per_frame(spec, clip, targets)
  weights, count = tick_weights(carry, start, length, num_frames,
                                 delay(spec, mode), mask_fill)
  sideways = mode == 'sideways'
  # Sideways sums its per-tick gradients in the params' own dtype (float32).
  zero_grads = jax.tree.map(jnp.zeros_like, params) if sideways else None
  params = _cast(params, compute_dtype)

  def body(state, i):
    c, m, g = state
    t = jnp.minimum(start + i, num_frames - 1)
    x = read_frame(clip, t, compute_dtype)
    target_now = (lax.dynamic_index_in_dim(targets, t, 1, keepdims=False)
                  if per_frame else targets)
    target, fifo = align_target(c.targets, target_now)
    w = weights[i]
    msgs = c.msgs
    if mode == 'bp':
      outs, states = tick_lib.synchronous_forward(spec, params, c.states, x)
    elif mode == 'pipelined_bp':
      outs, states = tick_lib.pipelined_forward(spec, params, c.outs,
                                                c.states, x)
    else:
      outs, msgs, states, tick_grads, (loss, pred) = tick_lib.sideways_tick(
          spec, params, c.outs, c.msgs, c.states, x, target, w)
      g = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g, tick_grads)
    if not sideways:
      _, (pred, loss) = tick_lib.head_loss(spec, params['head'], outs[-1],
                                           target, w)
    m = update_metrics(spec, m, w, loss, pred, target)
    c = StreamCarry(outs=outs, msgs=msgs, states=states, targets=fifo,
                    tick=c.tick + 1)
    return (c, m, g), ((outs, pred) if collect else None)

  init = (carry, _init_metrics(spec, clip.shape[0]), zero_grads)
  (carry, m, grads), collected = lax.scan(body, init, jnp.arange(length))
  m['valid_ticks'] = count
  return m['loss'], (carry, m, grads, collected)


def finish(spec, carry, m) -> ClipOutput:
  """Packs accumulated metrics into a ``ClipOutput`` (predictions apart)."""
  predictions = m.pop('predictions', None)
  if spec.loss != 'xent':
    m.pop('accuracy')
  return ClipOutput(carry=carry, metrics=m, predictions=predictions)


def window_grads(spec, params, clip, targets, carry, *, mode, start, length,
                  mask_fill, compute_dtype):
  """Loss, gradient and output of one window of ticks, in any mode."""
  carry = jax.lax.stop_gradient(carry)
  if mode == 'sideways':
    loss, (carry, m, grads, _) = run_ticks(
        spec, params, clip, targets, carry, mode=mode, start=start,
        length=length, mask_fill=mask_fill, compute_dtype=compute_dtype)
  else:
    def loss_fn(p):
      loss, (c, m, _, _) = run_ticks(spec, p, clip, targets, carry, mode=mode,
                                start=start, length=length,
                                mask_fill=mask_fill,
                                compute_dtype=compute_dtype)
      return loss, (c, m)
    (loss, (carry, m)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
  return loss, grads, finish(spec, carry, m)


def _prepare(spec, params, clip, targets, carry, mode, compute_dtype):
  """The spec for the clip's frame size (any spatial size with the
  network's channels: multigrid) and the carry, fresh if ``None``."""
  check_mode(mode)
  try:
    spec = network.for_frame_shape(spec, params, clip.shape[2:])
  except ValueError as e:
    raise ValueError(f'clip of shape {clip.shape} does not match the '
                     f'network: {e}') from e
  if carry is None:
    carry = init_carry(spec, params, clip, targets, mode, compute_dtype)
  return spec, carry


@functools.partial(jax.jit, static_argnames=('spec', 'mode', 'flush',
                                             'mask_fill', 'compute_dtype'))
def loss_and_grads(spec: NetworkSpec, params: PyTree, clip: jax.Array,
                   targets: jax.Array, *, mode: str,
                   carry: StreamCarry | None = None, flush: int = 0,
                   mask_fill: bool = True, compute_dtype=jnp.float32):
  """Loss and accumulated parameter gradients of one clip, in any mode.

  Args:
    spec, params: from ``network.split``.
    clip: ``(B, T, *frame_shape)``, float or uint8 (cast per frame).
    targets: ``(B,)`` int labels (``xent``), ``(B, K)`` multi-hot
      (``sigmoid_xent``), or per frame ``(B, T, ...)``.
    mode: ``'bp'``, ``'pipelined_bp'`` or ``'sideways'``.
    carry: a stream carry from a previous clip; ``None`` starts a new stream.
    flush: extra ticks repeating the last frame, loss masked.
    mask_fill: mask the pipeline fill out of the loss.
    compute_dtype: dtype of activations and messages (``jnp.bfloat16`` for
      mixed precision); params, gradients and the loss stay float32.

  Returns:
    ``(loss, grads, ClipOutput)``; ``grads`` has the structure of ``params``:
    the exact gradient of ``loss`` for ``bp``/``pipelined_bp``, the Sideways
    approximation of it for ``sideways``.
  """
  spec, carry = _prepare(spec, params, clip, targets, carry, mode,
                        compute_dtype)
  return window_grads(spec, params, clip, targets, carry, mode=mode, start=0,
                       length=clip.shape[1] + flush, mask_fill=mask_fill,
                       compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=('spec', 'mode', 'flush',
                                             'mask_fill', 'collect',
                                             'compute_dtype'))
def forward(spec: NetworkSpec, params: PyTree, clip: jax.Array,
            targets: jax.Array, *, mode: str, carry: StreamCarry | None = None,
            flush: int = 0, mask_fill: bool = True, collect: bool = False,
            compute_dtype=jnp.float32):
  """Runs a clip forward (evaluation): ``(ClipOutput, collected)``.

  ``sideways`` and ``pipelined_bp`` share the pipelined forward. With
  ``collect``, ``collected = (outs, preds)``: per-tick outputs of every stage,
  each ``(T + flush, B, ...)``, and the head's predictions; otherwise ``None``.
  """
  spec, carry = _prepare(spec, params, clip, targets, carry, mode,
                        compute_dtype)
  fwd_mode = 'pipelined_bp' if mode == 'sideways' else mode
  _, (carry, m, _, collected) = run_ticks(
      spec, params, clip, targets, carry, mode=fwd_mode, start=0,
      length=clip.shape[1] + flush, mask_fill=mask_fill,
      compute_dtype=compute_dtype, collect=collect)
  return finish(spec, carry, m), collected


def apply_gradients(optimizer, params, opt_state, grads):
  """One optax update: ``(params, opt_state)``."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def optimize_clip(grads_fn, optimizer, params, opt_state, carry, *,
                  num_frames: int, flush: int, update_every: int | None):
  """Optimizer steps over one clip: once per clip, or every ``update_every``.

  ``grads_fn(params, carry, start, length) -> (loss, grads, ClipOutput)``
  runs ticks ``[start, start + length)`` of the clip (any engine). Shared by
  every runner so that the online mode means the same everywhere.

  Returns:
    ``(params, opt_state, ClipOutput)``; with ``update_every`` the metrics
    and predictions are averaged over the windows by their valid ticks.
  """
  if update_every is None:
    _, grads, out = grads_fn(params, carry, 0, num_frames + flush)
    params, opt_state = apply_gradients(optimizer, params, opt_state, grads)
    return params, opt_state, out
  if update_every <= 0 or num_frames % update_every or flush:
    raise ValueError(
        f'update_every={update_every} must be positive and divide the clip '
        f'length {num_frames}, with flush=0 (got flush={flush})')

  def window(state, w):
    p, o, c = state
    _, grads, out = grads_fn(p, c, w * update_every, update_every)
    p, o = apply_gradients(optimizer, p, o, grads)
    return (p, o, out.carry), (out.metrics, out.predictions)

  (params, opt_state, carry), (ms, preds) = lax.scan(
      window, (params, opt_state, carry), jnp.arange(num_frames // update_every))
  counts = ms['valid_ticks']
  share = counts / jnp.maximum(counts.sum(), 1)
  metrics = {k: (v * share).sum() for k, v in ms.items() if k != 'valid_ticks'}
  metrics['valid_ticks'] = counts.sum()
  if preds is not None:
    preds = jnp.einsum('w,w...->...', share, preds)
  return params, opt_state, ClipOutput(carry=carry, metrics=metrics,
                                       predictions=preds)


@functools.partial(jax.jit, static_argnames=('spec', 'optimizer', 'mode',
                                             'flush', 'mask_fill',
                                             'update_every', 'compute_dtype'))
def train_step(spec: NetworkSpec, optimizer: optax.GradientTransformation,
               params: PyTree, opt_state: PyTree, clip: jax.Array,
               targets: jax.Array, *, mode: str,
               carry: StreamCarry | None = None, flush: int = 0,
               mask_fill: bool = True, update_every: int | None = None,
               compute_dtype=jnp.float32):
  """One training step on a clip: gradients in ``mode``, then optax.

  By default one optimizer step per clip. ``update_every=k`` is the online
  mode: a step every ``k`` ticks (``T`` must be a multiple of ``k``; no
  flush), the stream carried through.

  Nothing is donated, so the inputs stay usable; a training loop that owns
  its state should donate it (``skipside.train`` does).

  Returns:
    ``(params, opt_state, ClipOutput)``; with ``update_every`` the metrics are
    averaged over the windows by their valid ticks.

  Example::

    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    params, opt_state, out = engine.train_step(
        spec, optimizer, params, opt_state, clip, labels, mode='sideways')
  """
  spec, carry = _prepare(spec, params, clip, targets, carry, mode,
                        compute_dtype)

  def grads_fn(p, c, start, length):
    return window_grads(spec, p, clip, targets, c, mode=mode, start=start,
                        length=length, mask_fill=mask_fill,
                        compute_dtype=compute_dtype)
  return optimize_clip(grads_fn, optimizer, params, opt_state, carry,
                       num_frames=clip.shape[1], flush=flush,
                       update_every=update_every)
