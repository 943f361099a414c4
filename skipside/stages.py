"""Stage modules and the stage contract.

A *stage* is one unit of depth: the engine places each stage on its own tick
(and, in the mesh engine, its own device). The contract, in one place:

1. A stage is a Flax NNX module. ``stage(x)`` maps one frame's features
   ``x: (batch, ...)`` to features ``y: (batch, ...)``. The batch axis comes
   first and is preserved; everything else may change (a conv stage that
   downsamples maps ``(B, 32, 32, 3)`` to ``(B, 16, 16, 16)``).
2. Inputs and outputs are single arrays (no tuples, no dicts).
3. Learnable weights are ``nnx.Param``. A stage holds no other variables
   (no ``nnx.Rngs``): the engine treats a stage as a pure function of
   ``(params, x)`` and carries state itself. The one exception is
   ``nnx.BatchStat`` for statistics that training never reads and evaluation
   fills in (``SubBatchNorm``, ``skipside/batchnorm.py``); they ride in the
   params pytree (so checkpoints and evaluation carry them), no gradient
   reaches them, and the training loop's optimizer never changes them
   (``network.trainable_mask``, ``optim.only_trainable``: no update, no
   weight decay).
4. A *temporal* stage keeps state across ticks (a cache of past inputs). It
   declares that state explicitly with two methods::

       def init_state(self, x: jax.ShapeDtypeStruct) -> PyTree  # zeros
       def __call__(self, x, state) -> tuple[y, new_state]

   The engine threads the state through the scan over frames and returns it
   in the stream carry (so a stream or a long video continues across clips).
   The state is a cache of the stage's past inputs. The exact modes
   differentiate through it (the scan's carry); Sideways takes the stage's
   VJP at its current input and treats each cached input as the current one
   (``link_cache``): the gradients w.r.t. the cached inputs join the input
   gradient, i.e. the message to the stages that produced them, arriving one
   tick later like every message. On a constant video this is exact
   (DESIGN.md §1, oracle 2). A state leaf of the input's shape ``(B, ...)``
   or ``(B, K, ...)`` is such a cache; a stage with another kind of state
   defines ``link_cache(self, x, state)``.

5. Progressive training (``skipside.progressive``, PGT) cuts a long video
   into fragments and carries every temporal state across their boundaries.
   Between two fragments it calls, if the stage defines it::

       def fragment_boundary(self, state, *, policy, momentum, pooled,
                             previous) -> new_state

   ``policy`` is one of ``CACHE_POLICIES``; ``pooled`` is the mean (``'avg'``)
   or max (``'max'``) of the stage's input over the fragment just run
   (``None`` for ``'last'``); ``previous`` is the state this hook returned at
   the last boundary (zeros before the first), to blend with ``momentum``.
   The hook acts on the state: it is called on the stage built from its
   parameters' shapes (the engine may hold the values packed), so it must
   not read parameter values.
   A temporal stage without the hook keeps its state unchanged across
   boundaries, which is the ``'last'`` policy with momentum 0 (a stream).

Heads follow the same rule (``head(y) -> predictions``), without state.

Example -- a custom stage is a plain NNX module::

    class Mlp(nnx.Module):
      def __init__(self, din, dout, *, rngs):
        self.fc = nnx.Linear(din, dout, rngs=rngs)

      def __call__(self, x):            # (B, din) -> (B, dout)
        return nnx.relu(self.fc(x))
"""

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from skipside import sub_batch
from skipside import conv

PyTree = Any
CACHE_POLICIES = ('last', 'avg', 'max')


def _conv(*args, **kwargs) -> nnx.Conv:
  # Our convolution keeps its gradients fast inside the tick scan on XLA:CPU
  # (see skipside/conv.py); parameters are those of a plain nnx.Conv.
  return nnx.Conv(*args, conv_general_dilated=conv.conv_general_dilated,
                  **kwargs)


def fragment_cache(window: jax.Array, *, policy: str, momentum,
                   pooled: jax.Array | None = None,
                   previous: jax.Array | None = None) -> jax.Array:
  """PGT's cache of a temporal block at a fragment boundary.

  Args:
    window: ``(B, K, ..., C)``, the block's last ``K`` inputs (its state).
    policy: ``'last'`` keeps ``window``; ``'avg'`` / ``'max'`` put ``pooled``
      (the mean / max of the block's input over the fragment, ``(B, ..., C)``)
      in every one of the ``K`` slots.
    momentum: scalar in [0, 1]; the new cache is
      ``(1 - momentum) * cache + momentum * previous`` (PGT's
      ``CACHE_MOMENTUM``; 0 keeps no history).
    previous: ``(B, K, ..., C)``, the cache of the last boundary (required
      when ``momentum`` may be non-zero).

  Returns:
    The new cache, ``(B, K, ..., C)`` in ``window``'s dtype.
  """
  if policy == 'last':
    cache = window
  elif policy in ('avg', 'max'):
    if pooled is None:
      raise ValueError(f'cache policy {policy!r} needs the pooled input')
    cache = jnp.broadcast_to(pooled[:, None].astype(window.dtype),
                             window.shape)
  else:
    raise ValueError(f'cache policy {policy!r} is unknown; use one of '
                     f'{CACHE_POLICIES}')
  if previous is None:
    return cache
  momentum = jnp.asarray(momentum, jnp.float32)
  blended = ((1 - momentum) * cache.astype(jnp.float32)
             + momentum * previous.astype(jnp.float32))
  return blended.astype(window.dtype)


def is_temporal(stage: nnx.Module) -> bool:
  """Whether ``stage`` declares temporal state (has ``init_state``)."""
  return callable(getattr(stage, 'init_state', None))


def init_stage_state(stage: nnx.Module, x: jax.ShapeDtypeStruct) -> PyTree:
  """The zero state of ``stage`` for input ``x``; ``()`` for stateless stages."""
  return stage.init_state(x) if is_temporal(stage) else ()


def link_cache(stage: nnx.Module, x: jax.Array, state: PyTree) -> PyTree:
  """``state`` with a gradient path from each cached input to ``x``.

  The values are unchanged (``s + (x - stop_gradient(x))`` adds an exact
  zero); only the derivative differs: a VJP of the stage w.r.t. its input
  now also collects the gradients w.r.t. the cached past inputs, as if they
  were the current one (the Sideways rule for temporal stages, contract
  item 4). A floating state leaf is a cache of the input if it has the
  input's shape ``(B, ...)`` (one cached value, e.g. a running average) or
  ``(B, K, ...)`` (a window of ``K``); integer leaves (counters) get no
  gradient. A stage whose state is something else (e.g. a recurrent hidden
  state that merely has the input's shape) defines
  ``link_cache(self, x, state) -> state`` itself; returning ``state``
  unchanged opts out (no gradient through the state under Sideways).

  Raises:
    ValueError: naming the stage and the shapes, for a floating leaf that
      is neither form and no ``link_cache`` method.
  """
  own = getattr(stage, 'link_cache', None)
  if callable(own):
    return own(x, state)
  ghost = x - jax.lax.stop_gradient(x)  # Zero valued, identity derivative.

  def link(s):
    if not jnp.issubdtype(s.dtype, jnp.floating):
      return s
    if s.shape == x.shape:
      return s + ghost.astype(s.dtype)
    if (s.ndim == x.ndim + 1 and s.shape[0] == x.shape[0]
        and s.shape[2:] == x.shape[1:]):
      return s + ghost[:, None].astype(s.dtype)
    raise ValueError(
        f'{type(stage).__name__}: state leaf of shape {s.shape} is not a '
        f'cache of its input {x.shape} (expected {x.shape} or '
        f'(B, K, *{x.shape[1:]})), so Sideways cannot send its gradient '
        'down; define link_cache(self, x, state) on the stage '
        '(see skipside.stages.link_cache)')
  return jax.tree.map(link, state)


def call_stage(stage: nnx.Module, x: jax.Array, state: PyTree, *,
               sideways: bool = False):
  """Applies any stage uniformly: returns ``(y, new_state)``.

  ``sideways``: link the cached inputs of a temporal stage to ``x``
  (``link_cache``), for the Sideways VJP.
  """
  if is_temporal(stage):
    if sideways:
      state = link_cache(stage, x, state)
    out = stage(x, state)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError(
          f'{type(stage).__name__} is a temporal stage (it defines '
          'init_state), so it must return (y, new_state) (the stage '
          f'contract, skipside/stages.py); it returned {type(out).__name__}')
    return out
  return stage(x), state


class Identity(nnx.Module):
  """``y = x``. A placeholder stage; tests use it to make frame offsets visible."""

  def __call__(self, x):
    return x


class Conv(nnx.Module):
  """2D convolution + ReLU, optionally strided (downsampling), optionally
  with sub-batch normalization before the ReLU (``norm_base_size > 0``).

  Shapes: ``(B, H, W, C_in) -> (B, ceil(H / stride), ceil(W / stride), C_out)``.
  """

  def __init__(self, in_features: int, out_features: int, *,
               kernel_size: int = 3, stride: int = 1, norm_base_size: int = 0,
               rngs: nnx.Rngs):
    # A bias before a normalization would be subtracted away.
    self.conv = _conv(in_features, out_features, (kernel_size, kernel_size),
                      strides=(stride, stride), padding='SAME',
                      use_bias=not norm_base_size, rngs=rngs)
    self.norm = (SubBatchNorm(out_features, base_size=norm_base_size)
                 if norm_base_size else None)

  def __call__(self, x):
    y = self.conv(x)
    return nnx.relu(y if self.norm is None else self.norm(y))


class ResidualConv(nnx.Module):
  """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut.

  Shapes: ``(B, H, W, C_in) -> (B, ceil(H / stride), ceil(W / stride), C_out)``.
  The projection exists only when stride or width change.
  """

  def __init__(self, in_features: int, out_features: int, *,
               stride: int = 1, rngs: nnx.Rngs):
    self.conv1 = _conv(in_features, out_features, (3, 3),
                       strides=(stride, stride), padding='SAME', rngs=rngs)
    self.conv2 = _conv(out_features, out_features, (3, 3), padding='SAME',
                       rngs=rngs)
    needs_projection = stride != 1 or in_features != out_features
    self.shortcut = (
        _conv(in_features, out_features, (1, 1), strides=(stride, stride),
              rngs=rngs) if needs_projection else None)

  def __call__(self, x):
    h = self.conv2(nnx.relu(self.conv1(x)))
    skip = x if self.shortcut is None else self.shortcut(x)
    return nnx.relu(h + skip)


class Mlp(nnx.Module):
  """Dense layers on flattened features.

  Shapes: ``(B, ...) -> (B, features[-1])``; the input is flattened first.
  """

  def __init__(self, in_features: int, features: Sequence[int], *,
               rngs: nnx.Rngs):
    dims = [in_features, *features]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return x


class TemporalConv(nnx.Module):
  """Causal temporal convolution with a cache of past inputs (a temporal stage).

  ``y_t = relu(sum_j x_{t-j} W_j + b)`` for ``j = 0 .. kernel_size-1``, applied
  per position on the channel axis, plus the input (a residual, so a stack of
  these trains like the chain it sits in). The state holds the last
  ``kernel_size - 1`` inputs; it starts at zero (left padding).

  Shapes: ``x: (B, ..., C) -> y: (B, ..., C)``;
  state: ``(B, kernel_size - 1, ..., C)``.
  """

  def __init__(self, features: int, *, kernel_size: int = 3, rngs: nnx.Rngs):
    if kernel_size < 2:
      raise ValueError(f'TemporalConv needs kernel_size >= 2, got {kernel_size}')
    self.kernel_size = kernel_size
    self.taps = nnx.Linear(kernel_size * features, features, rngs=rngs)

  def init_state(self, x: jax.ShapeDtypeStruct):
    shape = (x.shape[0], self.kernel_size - 1, *x.shape[1:])
    return jnp.zeros(shape, x.dtype)

  def __call__(self, x, state):
    window = jnp.concatenate([state, x[:, None]], axis=1)  # (B, K, ..., C)
    # Oldest tap first on the channel axis: (B, ..., K * C).
    stacked = jnp.concatenate(
        [window[:, j] for j in range(self.kernel_size)], axis=-1)
    y = x + nnx.relu(self.taps(stacked))
    return y, window[:, 1:]

  def fragment_boundary(self, state, *, policy: str, momentum,
                        pooled=None, previous=None):
    """The cache a new fragment starts from (PGT; see ``fragment_cache``).

    The state is the left padding of the causal convolution, so the cache
    replaces it: ``'last'`` keeps the last ``kernel_size - 1`` inputs (with
    momentum 0, exactly a continued stream), ``'avg'`` / ``'max'`` pool the
    whole fragment into every slot. Shapes: state, previous
    ``(B, kernel_size - 1, ..., C)``; pooled ``(B, ..., C)``.
    """
    return fragment_cache(state, policy=policy, momentum=momentum,
                          pooled=pooled, previous=previous)


class SubBatchNorm(nnx.Module):
  """Batch norm over sub-batches of ``base_size`` clips (multigrid's BN).

  Shapes: ``(B, ..., C) -> (B, ..., C)``; ``B`` a multiple of ``base_size``
  when larger. Training normalizes each interleaved group of ``base_size``
  examples with its own statistics over the group and every non-channel
  axis (one tick's frame); evaluation uses the population statistics that
  ``batchnorm.population_statistics`` stores in ``mean`` / ``var`` (and sets
  ``ready``), merged with the reference's rule. Learned ``scale`` and
  ``bias`` per channel.
  """

  def __init__(self, features: int, *, base_size: int = 8,
               eps: float = 1e-5, rngs: nnx.Rngs | None = None):
    del rngs  # Deterministic init; accepted for a uniform constructor.
    self.base_size, self.eps = base_size, eps
    self.collect = False  # Set by batchnorm.clip_moments.
    self.scale = nnx.Param(jnp.ones((features,)))
    self.bias = nnx.Param(jnp.zeros((features,)))
    self.mean = nnx.BatchStat(jnp.zeros((features,)))
    self.var = nnx.BatchStat(jnp.ones((features,)))
    self.ready = nnx.BatchStat(jnp.zeros(()))

  def __call__(self, x):
    if self.collect:  # Population statistics (batchnorm.clip_moments): for
      # groups of equal size the merge is the same whatever the grouping, so
      # the whole batch is one group here and any batch size works.
      means, variances = sub_batch.sub_batch_moments(x, x.shape[0])
      self.sow(nnx.Intermediate, 'moments', (means, variances))
    else:
      means, variances = sub_batch.sub_batch_moments(x, self.base_size)
    # Stored statistics once set (evaluation), else the batch's (training).
    # Gradients never reach them: the optimizer sees zeros.
    ready = jax.lax.stop_gradient(self.ready[...]) > 0
    means = jnp.where(ready, jax.lax.stop_gradient(self.mean[...])[None],
                      means)
    variances = jnp.where(ready, jax.lax.stop_gradient(self.var[...])[None],
                          variances)
    y = sub_batch.normalize(x, means, variances, self.eps)
    return y * self.scale[...].astype(x.dtype) + self.bias[...].astype(
        x.dtype)


class ClassifierHead(nnx.Module):
  """Global average pool over all non-channel axes, then a linear classifier.

  Shapes: ``(B, ..., C) -> (B, num_classes)`` logits.
  """

  def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
    self.fc = nnx.Linear(in_features, num_classes, rngs=rngs)

  def __call__(self, x):
    pooled = x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)
    return self.fc(pooled)


class FrameDecoderHead(nnx.Module):
  """Next-frame prediction: decode features at 1/``upscale`` of the frame size.

  Shapes: ``(B, h, w, C) -> (B, H, W, out_channels)`` with ``H, W`` from
  ``frame_size``. Nearest-neighbour upsampling to ``(H / r, W / r)`` with
  ``r = upscale``, two 3x3 convolutions there, the last with ``r * r *
  out_channels`` features, then depth-to-space (sub-pixel convolution, Shi et
  al. 2016): r^2 times cheaper than convolving at full resolution. Pick ``r``
  no larger than the network's total stride ``H / h``, or the resize drops
  feature pixels (default: the largest of 4, 2, 1 dividing ``H`` and ``W``).
  """

  def __init__(self, in_features: int, frame_size: tuple[int, int],
               out_channels: int, *, hidden: int = 32,
               upscale: int | None = None, rngs: nnx.Rngs):
    upscale = upscale or math.gcd(4, *frame_size)
    if any(s % upscale for s in frame_size):
      raise ValueError(f'FrameDecoderHead: frame size {tuple(frame_size)} is '
                       f'not divisible by upscale={upscale}')
    self.frame_size, self.upscale = tuple(frame_size), upscale
    self.out_channels = out_channels
    self.conv1 = _conv(in_features, hidden, (3, 3), padding='SAME', rngs=rngs)
    self.conv2 = _conv(hidden, upscale * upscale * out_channels, (3, 3),
                       padding='SAME', rngs=rngs)

  def __call__(self, x):
    r, (h, w) = self.upscale, self.frame_size
    b = x.shape[0]
    x = jax.image.resize(x, (b, h // r, w // r, x.shape[-1]), method='nearest')
    y = self.conv2(nnx.relu(self.conv1(x)))  # (B, H/r, W/r, r*r*C)
    y = y.reshape(b, h // r, w // r, r, r, self.out_channels)
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, self.out_channels)
