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

- Fill, ``mask_fill=True``: in pipelined modes the first ``L-1`` ticks of a
  fresh stream (before the chain output holds a real frame) are masked out
  of the loss. A stream continued through ``carry`` is past its fill and
  masks none. Under Sideways a message needs ``d_l`` ticks from the loss to
  stage ``l`` (``message_distances``: ``L-1-l`` on a chain, fewer with skip
  edges), so in a fresh clip stage ``l`` learns from tick ``L-1+d_l`` on
  (``2L-2-l`` on a chain; ``gradient_ticks`` counts them, and the training
  loop warns when a stage gets none). Use clips well over ``2L`` frames, a
  flush, or a stream of consecutive clips. A fresh training clip with no loss
  tick (``T <= L-1``) is an error; a stream of short clips starts from an
  explicit ``init_carry``. ``mask_fill=False`` scores every tick.
  DESIGN.md's second fill convention is ``mask_fill='stages'`` (Sideways
  only): the loss of every tick is scored (and normalised) as with
  ``False``, but stage ``l``'s parameter gradient counts only from stream
  tick ``L-1+d_l``, when its messages first carry the loss of a real frame,
  and the head's from tick ``L-1``. On a chain this is the default's
  gradient times ``(T-L+1)/T`` (every message before then carries fill
  loss only); with skip edges the longer paths still bring some fill
  ticks' loss to the lower stages, which the default never scores. The
  messages themselves are never gated.
- ``flush=0``: no flush. ``flush=n`` appends ``n`` ticks that repeat the last
  frame with the loss masked, so the last errors reach the bottom stages
  (``n = L-1`` lets every in-flight message land). A flushed carry should not
  be continued.
- Targets: a clip label ``(B,)`` (or ``(B, K)`` multi-hot) is the target of
  every tick, fill included when it is not masked; per-frame targets
  ``(B, T, ...)`` are delayed by the pipeline depth (the chain output at
  tick ``t`` belongs to frame ``t-(L-1)``). Both go through a FIFO in the
  carry (``tick_target``), so in a stream the outputs of the previous
  clip's last frames keep its targets.
- Temporal stages (a cache of past inputs): the exact modes differentiate
  through the cache; Sideways takes the stage's VJP at its current input and
  adds the gradients w.r.t. the cached inputs to the input gradient, so they
  travel down with the message (``stages.link_cache``; exact on a constant
  video).
- Inputs: float clips as they are; a uint8 clip is scaled to [0, 1] frame by
  frame. Shapes are checked at trace time (``check_inputs``); values
  (labels in range, finite pixels) by ``check_values``, which the training
  loop runs on every batch.
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
same semantics: ``read_frame``, ``tick_target``, ``tick_weights``,
``update_metrics``, ``run_ticks``, ``window_grads``, ``finish``,
``apply_gradients``, ``optimize_clip``.

The engine interface: ``LocalEngine`` (this module) and
``mesh.MeshEngine`` have the same methods and return types; the training
loop, PGT and the TPU planner take either and never ask which it is.

Example::

    spec, params = network.split(net)
    loss, grads, out = engine.loss_and_grads(spec, params, clip, labels,
                                             mode='sideways')
    # Continue the stream into the next clip:
    loss, grads, out = engine.loss_and_grads(spec, params, clip2, labels,
                                             mode='sideways', carry=out.carry)
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from skipside import network
from skipside import optim
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
    example_loss: ``(B,)``, each clip's loss averaged over valid ticks (the
      batch mean is ``metrics['loss']``): evaluation leaves padded clips
      out with it. ``None`` where a runner does not keep it (PGT).
  """
  carry: StreamCarry
  metrics: dict
  predictions: jax.Array | None
  example_loss: jax.Array | None = None


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'mode {mode!r} is unknown; use one of {MODES}')


def forward_mode(mode: str) -> str:
  """The mode whose forward evaluates ``mode``: Sideways shares the
  pipelined forward (its gradient is what differs)."""
  return 'pipelined_bp' if mode == 'sideways' else mode


def delay(spec: NetworkSpec, mode: str) -> int:
  """Ticks between a frame entering and its chain output reaching the loss."""
  return 0 if mode == 'bp' else spec.depth


def _target_forms(spec: NetworkSpec, b: int, t: int) -> dict:
  """The target shapes ``spec``'s loss accepts for a ``(b, t, ...)`` clip."""
  if spec.loss == 'xent':
    return {'clip': (b,), 'frame': (b, t)}
  if spec.loss == 'sigmoid_xent':
    k = spec.prediction_shape[-1]
    return {'clip': (b, k), 'frame': (b, t, k)}
  return {'frame': (b, t, *spec.prediction_shape)}  # mse


def is_per_frame(spec: NetworkSpec, clip: jax.Array, targets: jax.Array) -> bool:
  """Whether ``targets`` holds one target per frame (else one per clip).

  Raises:
    ValueError: naming the shapes, for targets that fit neither form.
  """
  b, t = clip.shape[:2]
  forms = _target_forms(spec, b, t)
  for kind, shape in forms.items():
    if tuple(targets.shape) == shape:
      return kind == 'frame'
  expected = ' or '.join(f'{shape} ({kind} targets)'
                         for kind, shape in forms.items())
  raise ValueError(
      f'targets of shape {tuple(targets.shape)} do not fit the clip '
      f'{tuple(clip.shape)} and the {spec.loss!r} loss: expected {expected}')


FILL_RULES = (True, False, 'stages')
# ``config.train.fill`` names them: DESIGN.md's two conventions and no mask.
FILL_NAMES = {'mask_loss': True, 'gate_stages': 'stages', 'none': False}


def masks_loss(mask_fill) -> bool:
  """Whether ``mask_fill`` masks the fill ticks out of the loss: ``True``
  does; ``False`` and ``'stages'`` (which gates the stages' gradients
  instead, ``stage_gates``) score every tick."""
  return mask_fill is True


def check_fill(mask_fill, mode: str) -> None:
  """``mask_fill`` is one of ``FILL_RULES``; ``'stages'`` needs ``sideways``."""
  if not any(mask_fill is r or (isinstance(r, str) and mask_fill == r)
             for r in FILL_RULES):
    raise ValueError(f'mask_fill={mask_fill!r} is unknown: use True (mask '
                     "the fill ticks' loss), False (score every tick) or "
                     "'stages' (count each stage's Sideways gradient from "
                     'its first message of real loss)')
  if mask_fill == 'stages' and mode != 'sideways':
    raise ValueError(
        f"mask_fill='stages' in mode {mode!r}: it gates the Sideways "
        'messages of the fill, so it is a sideways rule; the exact modes '
        'take mask_fill=True or False')


def stage_gates(spec: NetworkSpec, mask_fill, tick):
  """``mask_fill='stages'``: stage -> whether its Sideways gradient of the
  stream tick ``tick`` counts (from tick ``L-1+d_l``, ``message_distances``;
  the head counts with the top stage). ``None`` for the other rules (every
  tick counts, masked by the loss weight)."""
  if mask_fill != 'stages':
    return None
  first = [spec.depth + d for d in message_distances(spec)]
  return lambda l: tick >= first[l]


def check_inputs(spec: NetworkSpec, clip, targets, *, mode: str, carry,
                 flush: int, mask_fill: bool | str, needs_loss: bool = True) -> None:
  """What the shapes decide, checked at trace time with the rule named.

  The clip is ``(B, T, *frame)`` with ``T >= 1``; the targets fit it
  (``is_per_frame``); ``flush >= 0``; and, with ``needs_loss`` (training), a
  fresh stream of a pipelined mode with ``mask_fill`` has at least one loss
  tick, ``T > depth`` (its first ``depth`` ticks are fill; a stream of short
  clips starts from an explicit ``init_carry``). Values (label range, NaN
  pixels) are the data's business: ``check_values``.
  """
  check_mode(mode)
  check_fill(mask_fill, mode)
  frame_ndim = len(spec.frame_shape)
  if clip.ndim != frame_ndim + 2 or clip.shape[1] < 1:
    raise ValueError(
        f'clip of shape {tuple(clip.shape)}: expected (batch, frames >= 1, '
        f'*frame) with frames like {spec.frame_shape}')
  if targets.ndim == 0:
    raise ValueError(f'targets are a scalar: expected one per clip '
                     f'{tuple(clip.shape[:1])} or per frame '
                     f'{tuple(clip.shape[:2])}')
  is_per_frame(spec, clip, targets)
  if not isinstance(flush, int) or flush < 0:
    raise ValueError(f'flush={flush!r} must be an int >= 0 (ticks repeating '
                     'the last frame)')
  if (needs_loss and carry is None and mask_fill and delay(spec, mode)
      and clip.shape[1] <= delay(spec, mode)):
    raise ValueError(
        f'a clip of {clip.shape[1]} frames has no loss tick in {mode!r}: a '
        f'fresh stream through {spec.num_stages} stages '
        + ('masks its first' if masks_loss(mask_fill) else
           'keeps every stage\'s gradient gate shut for its first')
        + f' {delay(spec, mode)} ticks (the pipeline fill, '
        f'mask_fill={mask_fill!r}). Use clips of more than '
        f'{delay(spec, mode)} frames, continue a stream (carry=...; '
        'engine.init_carry starts one), or mask_fill=False')


def check_values(spec: NetworkSpec, clip, targets) -> None:
  """What only the data shows, on concrete arrays (host or device): finite
  pixels and, for ``xent``, labels in ``[0, num_classes)``; ``sigmoid_xent``
  multi-hot in {0, 1}. The training loop runs it on every batch.

  Raises:
    ValueError: naming the offending value and where it is.
  """
  clip, targets = np.asarray(clip), np.asarray(targets)
  if np.issubdtype(clip.dtype, np.floating) and not np.isfinite(clip).all():
    bad = np.argwhere(~np.isfinite(clip))[0]
    raise ValueError(f'clip has non-finite pixels (first at index '
                     f'{tuple(int(i) for i in bad)} of {clip.shape})')
  if spec.loss == 'xent':
    k = spec.prediction_shape[-1]
    out = (targets < 0) | (targets >= k)
    if out.any():
      raise ValueError(f'label {targets[out][0]} is out of range for '
                       f'{k} classes: labels are 0..{k - 1}')
  elif spec.loss == 'sigmoid_xent' and not np.isin(targets, (0, 1)).all():
    raise ValueError('multi-hot targets must be 0 or 1, got values '
                     f'{np.unique(targets)[:5]}')


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


def message_distances(spec: NetworkSpec) -> tuple[int, ...]:
  """Per stage, the fewest edges from it up to the top stage: the ticks a
  Sideways message needs from the loss down to it (skip edges shorten the
  way; the chain alone gives ``L-1-l``)."""
  dist = [0] * spec.num_stages
  for l in reversed(range(spec.num_stages - 1)):
    dist[l] = 1 + min(dist[d] for d in range(l + 1, spec.num_stages)
                      if l in spec.in_edges[d])
  return tuple(dist)


def gradient_ticks(spec: NetworkSpec, mode: str, num_frames: int, *,
                   flush: int = 0, mask_fill: bool | str = True) -> tuple[int, ...]:
  """Per stage, the ticks of a fresh ``num_frames`` clip whose gradient
  carries loss of a real frame.

  Exact modes: every loss tick reaches every stage. ``sideways``: the loss
  of tick ``tau`` (``depth <= tau < T`` with ``mask_fill``) reaches stage
  ``l`` at tick ``tau + d_l`` (``message_distances``), which must still be
  within the clip and its flush: the chain alone gives stage ``l`` its
  first message at tick ``2L-2-l``. A stream carried into the next clip
  (``carry``) lands the rest there. Zero for a stage means it does not
  learn from fresh clips of this length.
  """
  check_mode(mode)
  first = delay(spec, mode) if mask_fill else 0
  losses = max(0, num_frames - first)
  if mode != 'sideways':
    return (losses,) * spec.num_stages
  last_tick = num_frames + flush - 1
  return tuple(max(0, min(num_frames - 1, last_tick - d) - first + 1)
               for d in message_distances(spec))


def read_frame(clip: jax.Array, t: jax.Array, dtype) -> jax.Array:
  """Frame ``t`` of ``clip (B, T, ...)`` in ``dtype``, read in place (no copy).

  A uint8 clip (raw pixels, 4x smaller on the device) is scaled to [0, 1]
  here, frame by frame.
  """
  x = lax.dynamic_index_in_dim(clip, t, axis=1, keepdims=False)
  if x.dtype == jnp.uint8:
    return x.astype(dtype) / jnp.asarray(255, dtype)
  return x.astype(dtype)


def _cast(tree: PyTree, dtype) -> PyTree:
  """Floating leaves of ``tree`` in ``dtype`` (mixed precision compute)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


def tick_target(targets: jax.Array, t, fifo: jax.Array | None,
                per_frame: bool, tick):
  """The target of the output at tick ``t`` and the FIFO after it.

  This tick's target (frame ``t``'s, or the clip label) is pushed into the
  FIFO and the one that matches the output now (frame ``t - delay``'s)
  popped, so in a stream the outputs that still belong to the previous
  clip's frames keep its targets. A clip label is the target of every tick:
  before the stream's first frame reaches the output (stream ``tick <
  delay``, the fill) there is no older clip, so it is the clip's own.
  ``fifo`` is ``(B, delay, ...)`` (``None`` or zero-size: no delay).
  """
  target = (lax.dynamic_index_in_dim(targets, t, 1, keepdims=False)
            if per_frame else targets)
  if fifo is None or fifo.shape[1] == 0:
    return target, fifo
  head = fifo[:, 0]
  if not per_frame:
    head = jnp.where(tick >= fifo.shape[1], head, target)
  return head, jnp.concatenate([fifo[:, 1:], target[:, None]], axis=1)


def tick_weights(carry: StreamCarry, start, length: int, num_frames: int,
                  depth: int, mask_fill: bool | str, total=None):
  """Loss weight of each tick of a window and the window's valid ticks.

  The weight is ``mask / total``: ``total`` defaults to this window's valid
  ticks (the window's mean loss); a runner whose objective spans several
  windows (PGT's ``'mean'``) passes the valid ticks of all of them, so that
  every tick, and every Sideways message it sends into the next window,
  has its weight in the whole objective.
  """
  local = start + jnp.arange(length)
  valid = local < num_frames
  if masks_loss(mask_fill):
    valid &= (carry.tick + jnp.arange(length)) >= depth
  count = valid.sum()
  denominator = count if total is None else total
  return valid / jnp.maximum(denominator, 1), count


def valid_ticks(tick, num_frames, depth: int, mask_fill) -> jax.Array:
  """The loss ticks of a whole clip of ``num_frames`` frames (may be traced)
  entering a stream at tick ``tick``: ``tick_weights``'s count over every
  window of the clip (flush ticks never count), in closed form. Runners
  whose objective spans several windows weigh each tick by one over it."""
  if not masks_loss(mask_fill):
    return jnp.asarray(num_frames, jnp.int32)
  masked = jnp.clip(depth - tick, 0, num_frames)  # Fill ticks in the clip.
  return (num_frames - masked).astype(jnp.int32)


def window_means(m: dict, count, total) -> dict:
  """Metrics summed with ``tick_weights(..., total)`` as means over the
  window's own ``count`` valid ticks (unchanged when ``total`` is None)."""
  if total is None:
    return m
  scale = jnp.maximum(total, 1) / jnp.maximum(count, 1)
  return {k: v * scale.astype(v.dtype) for k, v in m.items()}


def init_metrics(spec: NetworkSpec, batch: int) -> dict:
  """Zero metric sums of a window (``update_metrics`` adds each tick)."""
  m = {'loss': jnp.zeros(()), 'accuracy': jnp.zeros(()),
       'example_loss': jnp.zeros((batch,))}
  if spec.loss != 'mse':
    m['predictions'] = jnp.zeros((batch, *spec.prediction_shape))
  return m


def update_metrics(spec, m, weight, losses, pred, target):
  """Adds one tick, weighted: ``losses (B,)`` per example, ``pred`` the
  head's output, ``target`` the aligned target."""
  m = dict(m, loss=m['loss'] + weight * losses.mean(),
           example_loss=m['example_loss'] + weight * losses)
  if spec.loss == 'xent':
    correct = (pred.argmax(-1) == target).mean()
    m['accuracy'] = m['accuracy'] + weight * correct
  if 'predictions' in m:
    m['predictions'] = m['predictions'] + weight * pred.astype(jnp.float32)
  return m


def init_window_sums(spec: NetworkSpec, batch: int,
                     per_example: bool = False) -> dict:
  """Zero sums of several windows' metrics (``add_window``), with each
  clip's loss if ``per_example``."""
  acc = {'loss': jnp.zeros(()), 'accuracy': jnp.zeros(()),
         'valid_ticks': jnp.zeros((), jnp.int32)}
  if per_example:
    acc['example_loss'] = jnp.zeros((batch,))
  if spec.loss != 'mse':
    acc['predictions'] = jnp.zeros((batch, *spec.prediction_shape))
  return acc


def add_window(acc: dict, out: ClipOutput) -> dict:
  """Adds one window's metrics, weighted by its valid ticks."""
  n = out.metrics['valid_ticks']
  w = n.astype(jnp.float32)
  acc = dict(acc, loss=acc['loss'] + w * out.metrics['loss'],
             valid_ticks=acc['valid_ticks'] + n)
  if 'accuracy' in out.metrics:
    acc['accuracy'] = acc['accuracy'] + w * out.metrics['accuracy']
  if 'example_loss' in acc:
    acc['example_loss'] = acc['example_loss'] + w * out.example_loss
  if 'predictions' in acc:
    acc['predictions'] = acc['predictions'] + w * out.predictions.astype(
        jnp.float32)
  return acc


def finish_windows(spec: NetworkSpec, acc: dict, carry) -> ClipOutput:
  """Several windows' output: tick-weighted means (= one pass over them)."""
  n = jnp.maximum(acc['valid_ticks'], 1).astype(jnp.float32)
  metrics = {'loss': acc['loss'] / n, 'valid_ticks': acc['valid_ticks']}
  if spec.loss == 'xent':
    metrics['accuracy'] = acc['accuracy'] / n
  preds = acc['predictions'] / n if 'predictions' in acc else None
  losses = acc['example_loss'] / n if 'example_loss' in acc else None
  return ClipOutput(carry=carry, metrics=metrics, predictions=preds,
                    example_loss=losses)


def run_ticks(spec: NetworkSpec, params: PyTree, clip: jax.Array,
         targets: jax.Array, carry: StreamCarry, *, mode: str, start,
         length: int, mask_fill: bool | str, compute_dtype, collect: bool = False,
         total=None):
  """Scans ``length`` ticks from clip frame ``start`` (frames past the end
  repeat the last one: the flush).

  ``total``: the valid ticks the loss is normalised by (``tick_weights``);
  by default this window's, so ``loss`` is the window's mean loss, else the
  window's share of a longer objective. ``metrics`` are window means
  either way.

  Returns ``(loss, (carry, metrics, grads, collected))``; ``grads`` is the
  accumulated Sideways gradient (``None`` in other modes, whose gradient is
  taken through this function), ``collected`` the per-tick stage outputs and
  predictions when ``collect`` (tests and analysis only: it grows with T).
  """
  num_frames = clip.shape[1]
  per_frame = is_per_frame(spec, clip, targets)
  weights, count = tick_weights(carry, start, length, num_frames,
                                 delay(spec, mode), mask_fill, total)
  sideways = mode == 'sideways'
  # Sideways sums its per-tick gradients in the params' own dtype (float32).
  zero_grads = jax.tree.map(jnp.zeros_like, params) if sideways else None
  params = _cast(params, compute_dtype)

  def body(state, i):
    c, m, g = state
    t = jnp.minimum(start + i, num_frames - 1)
    x = read_frame(clip, t, compute_dtype)
    target, fifo = tick_target(targets, t, c.targets, per_frame, c.tick)
    w = weights[i]
    msgs = c.msgs
    if mode == 'bp':
      outs, states = tick_lib.synchronous_forward(spec, params, c.states, x)
    elif mode == 'pipelined_bp':
      outs, states = tick_lib.pipelined_forward(spec, params, c.outs,
                                                c.states, x)
    else:
      outs, msgs, states, tick_grads, (loss, pred) = tick_lib.sideways_tick(
          spec, params, c.outs, c.msgs, c.states, x, target, w,
          gate_of=stage_gates(spec, mask_fill, c.tick))
      g = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g, tick_grads)
    if not sideways:
      _, (pred, loss) = tick_lib.head_loss(spec, params['head'], outs[-1],
                                           target, w)
    m = update_metrics(spec, m, w, loss, pred, target)
    c = StreamCarry(outs=outs, msgs=msgs, states=states, targets=fifo,
                    tick=c.tick + 1)
    return (c, m, g), ((outs, pred) if collect else None)

  init = (carry, init_metrics(spec, clip.shape[0]), zero_grads)
  (carry, m, grads), collected = lax.scan(body, init, jnp.arange(length))
  loss = m['loss']
  m = dict(window_means(m, count, total), valid_ticks=count)
  return loss, (carry, m, grads, collected)


def finish(spec, carry, m) -> ClipOutput:
  """Packs accumulated metrics into a ``ClipOutput`` (predictions apart)."""
  predictions = m.pop('predictions', None)
  example_loss = m.pop('example_loss')
  if spec.loss != 'xent':
    m.pop('accuracy')
  return ClipOutput(carry=carry, metrics=m, predictions=predictions,
                    example_loss=example_loss)


def window_grads(spec, params, clip, targets, carry, *, mode, start, length,
                  mask_fill, compute_dtype, total=None):
  """Loss, gradient and output of one window of ticks, in any mode
  (``total`` as in ``run_ticks``)."""
  carry = jax.lax.stop_gradient(carry)
  kw = dict(mode=mode, start=start, length=length, mask_fill=mask_fill,
            compute_dtype=compute_dtype, total=total)
  if mode == 'sideways':
    loss, (carry, m, grads, _) = run_ticks(spec, params, clip, targets, carry,
                                           **kw)
  else:
    def loss_fn(p):
      loss, (c, m, _, _) = run_ticks(spec, p, clip, targets, carry, **kw)
      return loss, (c, m)
    (loss, (carry, m)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
  return loss, grads, finish(spec, carry, m)


def _prepare(spec, params, clip, targets, carry, mode, compute_dtype, *,
             flush, mask_fill, needs_loss=True, debug_checks=False):
  """The spec for the clip's frame size (any spatial size with the
  network's channels: multigrid) and the carry, fresh if ``None``; the
  inputs checked (``check_inputs``; with ``debug_checks`` also their values,
  ``check_values``, on the host when the program runs)."""
  check_mode(mode)
  if clip.ndim != len(spec.frame_shape) + 2:  # Before the frame size is read.
    raise ValueError(f'clip of shape {tuple(clip.shape)}: expected (batch, '
                     f'frames, *frame) with frames like {spec.frame_shape}')
  try:
    spec = network.for_frame_shape(spec, params, clip.shape[2:])
  except ValueError as e:
    raise ValueError(f'clip of shape {clip.shape} does not match the '
                     f'network: {e}') from e
  check_inputs(spec, clip, targets, mode=mode, carry=carry, flush=flush,
               mask_fill=mask_fill, needs_loss=needs_loss)
  if debug_checks:  # Raises inside the run: a JaxRuntimeError naming it.
    jax.debug.callback(functools.partial(check_values, spec), clip, targets)
  if carry is None:
    carry = init_carry(spec, params, clip, targets, mode, compute_dtype)
  return spec, carry


@functools.partial(jax.jit, static_argnames=('spec', 'mode', 'flush',
                                             'mask_fill', 'compute_dtype',
                                             'debug_checks'))
def loss_and_grads(spec: NetworkSpec, params: PyTree, clip: jax.Array,
                   targets: jax.Array, *, mode: str,
                   carry: StreamCarry | None = None, flush: int = 0,
                   mask_fill: bool | str = True, compute_dtype=jnp.float32,
                   debug_checks: bool = False):
  """Loss and accumulated parameter gradients of one clip, in any mode.

  Args:
    spec, params: from ``network.split``.
    clip: ``(B, T, *frame_shape)``, float or uint8 (cast per frame).
    targets: ``(B,)`` int labels (``xent``), ``(B, K)`` multi-hot
      (``sigmoid_xent``), or per frame ``(B, T, ...)``.
    mode: ``'bp'``, ``'pipelined_bp'`` or ``'sideways'``.
    carry: a stream carry from a previous clip; ``None`` starts a new stream.
    flush: extra ticks repeating the last frame, loss masked.
    mask_fill: the fill rule (``FILL_RULES``): ``True`` masks the pipeline
      fill out of the loss; ``False`` scores every tick; ``'stages'``
      (sideways) scores every tick but counts stage ``l``'s gradient only
      from tick ``L-1+d_l`` (the module docstring).
    compute_dtype: dtype of activations and messages (``jnp.bfloat16`` for
      mixed precision); params, gradients and the loss stay float32.
    debug_checks: also check the values (``check_values``: labels in range,
      finite pixels) when the step runs, on the host (slow; for debugging).

  Returns:
    ``(loss, grads, ClipOutput)``; ``grads`` has the structure of ``params``:
    the exact gradient of ``loss`` for ``bp``/``pipelined_bp``, the Sideways
    approximation of it for ``sideways``.
  """
  spec, carry = _prepare(spec, params, clip, targets, carry, mode,
                        compute_dtype, flush=flush, mask_fill=mask_fill,
                        debug_checks=debug_checks)
  return window_grads(spec, params, clip, targets, carry, mode=mode, start=0,
                       length=clip.shape[1] + flush, mask_fill=mask_fill,
                       compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=('spec', 'mode', 'flush',
                                             'mask_fill', 'collect',
                                             'compute_dtype'))
def forward(spec: NetworkSpec, params: PyTree, clip: jax.Array,
            targets: jax.Array, *, mode: str, carry: StreamCarry | None = None,
            flush: int = 0, mask_fill: bool | str = True, collect: bool = False,
            compute_dtype=jnp.float32):
  """Runs a clip forward (evaluation): ``(ClipOutput, collected)``.

  ``sideways`` and ``pipelined_bp`` share the pipelined forward. With
  ``collect``, ``collected = (outs, preds)``: per-tick outputs of every stage,
  each ``(T + flush, B, ...)``, and the head's predictions; otherwise ``None``.
  """
  spec, carry = _prepare(spec, params, clip, targets, carry, mode,
                        compute_dtype, flush=flush, mask_fill=mask_fill,
                        needs_loss=False)
  fwd_mode = forward_mode(mode)
  _, (carry, m, _, collected) = run_ticks(
      spec, params, clip, targets, carry, mode=fwd_mode, start=0,
      length=clip.shape[1] + flush, mask_fill=mask_fill,
      compute_dtype=compute_dtype, collect=collect)
  return finish(spec, carry, m), collected


def apply_gradients(optimizer, params, opt_state, grads, valid_ticks=None):
  """One optax update: ``(params, opt_state)``.

  A window with ``valid_ticks == 0`` (all fill) has no loss, and one whose
  gradient is exactly zero on the leaves that train
  (``optim.trainable_gradients``: ``mask_fill='stages'`` before the top
  stage's gate opens, or a gradient only on frozen stages) nothing to
  learn: its update is skipped, so neither Adam's moments nor weight decay
  see it. Frozen leaves' gradients take no part in the check (a NaN there
  skips nothing: it never reaches the update either).
  """
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new = optax.apply_updates(params, updates), new_opt_state
  if valid_ticks is None:
    return new
  learns = ((valid_ticks > 0) &
            (optax.tree.norm(optim.trainable_gradients(opt_state, grads)) > 0))
  return jax.tree.map(lambda n, o: jnp.where(learns, n, o), new,
                      (params, opt_state))


def optimize_clip(grads_fn, optimizer, params, opt_state, carry, *,
                  num_frames: int, flush: int, update_every: int | None):
  """Optimizer steps over one clip: once per clip, or every ``update_every``.

  ``grads_fn(params, carry, start, length) -> (loss, grads, ClipOutput)``
  runs ticks ``[start, start + length)`` of the clip (any engine). Shared by
  every runner so that the online mode means the same everywhere.

  One clip is one training step: the learning-rate schedule of an
  ``optim.make_optimizer`` optimizer moves once (``optim.advance``), however
  many updates the clip made.

  Returns:
    ``(params, opt_state, ClipOutput)``; with ``update_every`` the metrics
    and predictions are averaged over the windows by their valid ticks.
  """
  if update_every is None:
    _, grads, out = grads_fn(params, carry, 0, num_frames + flush)
    params, opt_state = apply_gradients(optimizer, params, opt_state, grads,
                                        out.metrics['valid_ticks'])
    return params, optim.advance(opt_state), out
  if update_every <= 0 or num_frames % update_every or flush:
    raise ValueError(
        f'update_every={update_every} must be positive and divide the clip '
        f'length {num_frames}, with flush=0 (got flush={flush})')

  def window(state, w):
    p, o, c = state
    _, grads, out = grads_fn(p, c, w * update_every, update_every)
    p, o = apply_gradients(optimizer, p, o, grads, out.metrics['valid_ticks'])
    return (p, o, out.carry), (out.metrics, out.predictions,
                               out.example_loss)

  (params, opt_state, carry), (ms, preds, losses) = lax.scan(
      window, (params, opt_state, carry), jnp.arange(num_frames // update_every))
  counts = ms['valid_ticks']
  share = counts / jnp.maximum(counts.sum(), 1)
  metrics = {k: (v * share).sum() for k, v in ms.items() if k != 'valid_ticks'}
  metrics['valid_ticks'] = counts.sum()
  if preds is not None:
    preds = jnp.einsum('w,w...->...', share, preds)
  return params, optim.advance(opt_state), ClipOutput(
      carry=carry, metrics=metrics, predictions=preds,
      example_loss=jnp.einsum('w,wb->b', share, losses))


@functools.partial(jax.jit, static_argnames=('spec', 'optimizer', 'mode',
                                             'flush', 'mask_fill',
                                             'update_every', 'compute_dtype',
                                             'debug_checks'))
def train_step(spec: NetworkSpec, optimizer: optax.GradientTransformation,
               params: PyTree, opt_state: PyTree, clip: jax.Array,
               targets: jax.Array, *, mode: str,
               carry: StreamCarry | None = None, flush: int = 0,
               mask_fill: bool | str = True, update_every: int | None = None,
               compute_dtype=jnp.float32, debug_checks: bool = False):
  """One training step on a clip: gradients in ``mode``, then optax.

  By default one optimizer step per clip. ``update_every=k`` is the online
  mode: a step every ``k`` ticks (``T`` must be a multiple of ``k``; no
  flush), the stream carried through.

  Nothing is donated, so the inputs stay usable; a training loop that owns
  its state should donate it (``skipside.train`` does). ``debug_checks``:
  as in ``loss_and_grads``.

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
                        compute_dtype, flush=flush, mask_fill=mask_fill,
                        debug_checks=debug_checks)

  def grads_fn(p, c, start, length):
    return window_grads(spec, p, clip, targets, c, mode=mode, start=start,
                        length=length, mask_fill=mask_fill,
                        compute_dtype=compute_dtype)
  return optimize_clip(grads_fn, optimizer, params, opt_state, carry,
                       num_frames=clip.shape[1], flush=flush,
                       update_every=update_every)


# -- The engine interface. -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LocalEngine:
  """The single-device engine behind the interface every runner uses.

  An engine is a network's static structure (on a mesh, also its placement)
  and runs it on params held in the engine's own *state layout*: here the
  ``network.split`` pytree, on ``mesh.MeshEngine`` its sharded (even or packed)
  layout. ``skipside.train``, ``skipside.progressive`` and
  ``skipside.tpu_plan`` call only these methods, so they run unchanged on
  one device or a mesh. Hashable by value (a static ``jit`` argument).

  Methods (the same on both engines):

  - ``to_state(tree)`` / ``to_tree(state)``: params, or an optimizer state
    over them, into and out of the state layout (checkpoints and
    evaluation use the pytree); ``state_like(tree)``: the layout's
    ``ShapeDtypeStruct``s (ahead-of-time lowering); ``params_like(state)``:
    the params pytree's ``ShapeDtypeStruct``s.
  - ``put_batch(tree, global_size)``: this process's rows of a batch as the
    arrays the engine takes; ``batch_like``: their ``ShapeDtypeStruct``s.
  - ``init_carry``, ``from_stream_carry``, ``to_stream_carry``: a fresh
    stream in the engine's carry layout; ``StreamCarry`` in and out (exact).
  - ``run`` / ``window_grads``: ``length`` ticks of a clip from frame
    ``start`` (building blocks inside ``jit``: PGT's fragments).
  - ``forward`` / ``train_step``: one clip, jitted, as ``forward`` (without
    ``collect``: returns the ``ClipOutput``) and ``train_step`` here.
  - ``with_spec(spec)``: the same engine (same placement) on another spec of
    the network: another frame size, PGT's pooled caches.

  Example::

    eng = engine.LocalEngine(spec)       # or mesh.MeshEngine(mspec)
    params = eng.to_state(params)
    opt_state = eng.to_state(optimizer.init(eng.to_tree(params)))
    params, opt_state, out = eng.train_step(optimizer, params, opt_state,
                                            clip, labels, mode='sideways')
    out = eng.forward(params, clip, labels, mode='sideways')
  """
  spec: NetworkSpec

  def with_spec(self, spec: NetworkSpec) -> 'LocalEngine':
    return LocalEngine(spec)

  def to_state(self, tree: PyTree) -> PyTree:
    return tree

  def to_tree(self, state: PyTree) -> PyTree:
    return state

  def state_like(self, tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

  def params_like(self, params: PyTree) -> PyTree:
    return self.state_like(params)

  def put_batch(self, tree: PyTree, global_size: int) -> PyTree:
    del global_size  # Each process runs its own rows.
    return tree

  def batch_like(self, tree: PyTree, global_size: int) -> PyTree:
    """``ShapeDtypeStruct``s of ``put_batch(x, global_size)`` for
    process-local rows shaped like ``tree`` (ahead-of-time lowering)."""
    del global_size
    return self.state_like(tree)

  def init_carry(self, params, clip, targets, mode: str,
                 compute_dtype=jnp.float32) -> StreamCarry:
    return init_carry(self.spec, params, clip, targets, mode, compute_dtype)

  def from_stream_carry(self, carry: StreamCarry) -> StreamCarry:
    return carry

  def to_stream_carry(self, carry: StreamCarry) -> StreamCarry:
    return carry

  def run(self, params, clip, targets, carry, *, mode: str, start,
          length: int, mask_fill: bool | str, compute_dtype, total=None):
    """``run_ticks`` without gradients: ``(loss, ClipOutput)``."""
    loss, (carry, m, _, _) = run_ticks(
        self.spec, params, clip, targets, carry, mode=mode, start=start,
        length=length, mask_fill=mask_fill, compute_dtype=compute_dtype,
        total=total)
    return loss, finish(self.spec, carry, m)

  def window_grads(self, params, clip, targets, carry, **kw):
    """``window_grads``: ``(loss, grads, ClipOutput)``."""
    return window_grads(self.spec, params, clip, targets, carry, **kw)

  def forward(self, params, clip, targets, **kw) -> ClipOutput:
    return forward(self.spec, params, clip, targets, **kw)[0]

  def train_step(self, optimizer, params, opt_state, clip, targets, **kw):
    return train_step(self.spec, optimizer, params, opt_state, clip, targets,
                      **kw)
