"""Progressive training (PGT, DESIGN.md §4): long videos as serial fragments.

A video of ``T`` frames is cut into ``F`` fragments of ``Tf`` frames, each
sharing ``overlap`` frames with the one before (``T = Tf + (F-1)(Tf - o)``).
The whole video runs inside ONE jitted program: an outer ``lax.scan`` over
fragments, each fragment a window of the tick engine (``skipside.engine`` or
``skipside.mesh``), so memory is one fragment's whatever ``T`` is.

What crosses a fragment boundary:

- the stream carry: pipeline buffers and Sideways messages (pipelined modes),
  every temporal stage's state, the target FIFO and the tick counter. With
  overlap 0, the ``'last'`` policy and momentum 0 the fragments are just
  consecutive clips of one stream: the pipeline fills once per video, not
  once per fragment.
- every temporal stage's cache, rebuilt by its ``fragment_boundary`` hook
  (the stage contract, ``skipside/stages.py``) with a *cache policy*:
  ``'last'`` keeps its last inputs, ``'avg'`` / ``'max'`` put the mean / max
  of its input over the fragment just run into every slot; then
  ``cache = (1 - momentum) * cache + momentum * previous_cache`` (PGT's
  ``CACHE_MOMENTUM``, 0.25 in its configs; the first boundary has no
  previous cache). ``'avg'`` / ``'max'`` need the pool of each temporal
  stage's input, which the runner tracks in the stage state
  (``pooled_spec``).

Overlap: as in PGT, fragment 0 runs all its ``Tf`` frames and every later
fragment runs only its ``Tf - overlap`` new frames. The overlapping frames do
not re-enter the pipeline (their features are already in it); they re-enter
only as the temporal caches, which hold each temporal stage's input for the
most recent frames (``'last'``) or a pool of the fragment (``'avg'``,
``'max'``). So with ``'last'`` and momentum 0 any overlap gives exactly the
whole-video stream; the overlap sets how a video is cut (and which frames
each fragment's loss covers), and costs no extra frame-passes.

Gradients (``truncate_gradients=True``, PGT's default): each fragment's
gradient stops at its incoming carry (caches detached). With ``False``,
``bp`` / ``pipelined_bp`` take the exact gradient of the whole video's
objective through all fragments and carries, each fragment rematerialised
(``jax.checkpoint``): memory is one fragment's activations plus one carry per
fragment. Sideways' gradient is forward-propagated: its messages cross
boundaries like any tick, and the option changes nothing.

Loss: one loss per fragment (the mean over its valid ticks), with a clip
label ``(B,)``, per-fragment labels ``(B, F)`` (applied to the frames of
their fragment, delayed through the pipeline like per-frame targets) or
per-frame targets. ``loss_weighting='sum'`` sums the fragments' losses (and
gradients: PGT); ``'mean'`` is the whole video's mean loss: every tick
weighs one over the video's valid ticks, so a Sideways message sent across a
boundary keeps its weight and the gradient equals the whole-video one. ``step_per='video'``: one optimizer step per video;
``'fragment'``: one per fragment.

Inputs: a whole video ``(B, T, *frame)`` (frames read in place, no copy) or
the pipeline's fragments ``(B, F, Tf, *frame)`` (``data.fragment_frames``).

Example::

    opts = progressive.Options(fragment_frames=32, overlap=0,
                               cache_policy='avg', momentum=0.25)
    params, opt_state, out = progressive.train_step(
        spec, optimizer, params, opt_state, video, labels, mode='bp',
        options=opts)
    preds = progressive.predict(spec, params, video, labels, mode='bp',
                                options=opts)
    preds.max  # (B, K): max ensemble over fragments; also .mean, .last

Engines: ``spec`` is a ``NetworkSpec`` (one device) or any engine
(``engine.LocalEngine``, ``mesh.MeshEngine``), with params and optimizer
state in that engine's state layout: on a mesh the sharded one
(``eng.to_state(params)``), gradients and updates included. The fragments
are the engine's windows (``run``, ``window_grads``) and the cache policies
act on its carry through ``to_stream_carry`` / ``from_stream_carry``
(exact), so the results equal the single-device ones::

    eng = mesh.MeshEngine(mesh.place(spec, mesh.make_mesh(2, 2),
                                     params=params))
    pstack, opt_state, out = progressive.train_step(
        eng, optimizer, eng.to_state(params),
        eng.to_state(optimizer.init(params)), video, labels, mode='bp',
        options=opts)

Shapes and multigrid: nothing is fixed but ``Options``; the number of
fragments comes from the video's shape and a ``NetworkSpec`` follows the frame
size (``network.for_frame_shape``), so every batch shape is one compilation.
With multigrid buckets ``(b, t, s)`` the fragment length stays the
configured one and each bucket's ``t`` must split into fragments
(``Options.num_fragments``; the error names the bucket); the training loop
compiles ``make_train_step`` per bucket ahead of time
(``programs.compile_ahead``). PGT's own multigrid also changes the fragment
length per long-cycle stage; here it is fixed.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from skipside import engine
from skipside import network
from skipside import optim
from skipside import stages as stages_lib
from skipside.network import NetworkSpec

PyTree = Any
CACHE_POLICIES = stages_lib.CACHE_POLICIES
STEP_PER = ('video', 'fragment')
LOSS_WEIGHTINGS = ('sum', 'mean')
ENSEMBLES = ('full', 'mean', 'max', 'last', 'ticks')


# -- Options and fragment geometry. ------------------------------------------

@dataclasses.dataclass(frozen=True)
class Options:
  """How a video is trained progressively (hashable: a static jit argument).

  Attributes:
    fragment_frames: ``Tf``, frames per fragment.
    overlap: frames shared by consecutive fragments (``0 <= o < Tf``).
    cache_policy: ``'last'``, ``'avg'`` or ``'max'`` (see the module doc).
    momentum: blend of the previous cache into the new one, in [0, 1].
    step_per: ``'video'`` (gradients summed, one step) or ``'fragment'``.
    truncate_gradients: stop gradients at fragment boundaries.
    loss_weighting: ``'sum'`` (PGT) or ``'mean'`` (by valid ticks).
    mask_fill: the fill rule of the video's one fill (``engine.FILL_RULES``):
      ``True`` masks it out of the loss.
  """
  fragment_frames: int
  overlap: int = 0
  cache_policy: str = 'last'
  momentum: float = 0.25
  step_per: str = 'video'
  truncate_gradients: bool = True
  loss_weighting: str = 'sum'
  mask_fill: bool | str = True

  def __post_init__(self):
    if self.fragment_frames < 1 or not 0 <= self.overlap < self.fragment_frames:
      raise ValueError(
          f'fragment_frames={self.fragment_frames}, overlap={self.overlap}: '
          'need fragment_frames >= 1 and 0 <= overlap < fragment_frames')
    if self.cache_policy not in CACHE_POLICIES:
      raise ValueError(f'cache_policy={self.cache_policy!r} is unknown; use '
                       f'one of {CACHE_POLICIES}')
    if not 0.0 <= self.momentum <= 1.0:
      raise ValueError(f'momentum={self.momentum} must be in [0, 1]')
    if self.step_per not in STEP_PER:
      raise ValueError(f'step_per={self.step_per!r} is unknown; use one of '
                       f'{STEP_PER}')
    if self.loss_weighting not in LOSS_WEIGHTINGS:
      raise ValueError(f'loss_weighting={self.loss_weighting!r} is unknown; '
                       f'use one of {LOSS_WEIGHTINGS}')
    if not self.truncate_gradients and self.step_per == 'fragment':
      raise ValueError(
          "truncate_gradients=False needs step_per='video': a gradient "
          'through earlier fragments cannot follow an update between them')

  @property
  def step(self) -> int:
    """New frames per fragment after the first."""
    return self.fragment_frames - self.overlap

  def num_fragments(self, num_frames: int) -> int:
    """``F`` for a video of ``num_frames``; errors if it does not split."""
    rest = num_frames - self.fragment_frames
    if rest < 0 or rest % self.step:
      raise ValueError(
          f'a video of {num_frames} frames does not split into fragments of '
          f'{self.fragment_frames} with overlap {self.overlap}: need '
          f'T = Tf + k * (Tf - overlap)')
    return 1 + rest // self.step

  def fragment_of_frame(self, num_frames: int) -> np.ndarray:
    """``(T,)`` int: the fragment whose new frames include frame ``t``."""
    t = np.arange(num_frames)
    return np.maximum(0, (t - self.overlap) // self.step)

  @classmethod
  def from_config(cls, c) -> 'Options':
    """From ``config.progressive`` (keys and defaults: ``config.defaults``)."""
    return cls(fragment_frames=int(c.fragment_frames), overlap=int(c.overlap),
               cache_policy=c.cache_policy, momentum=float(c.momentum),
               step_per=c.step_per,
               truncate_gradients=bool(c.truncate_gradients),
               loss_weighting=c.get('loss_weighting', 'sum'),
               mask_fill=c.get('mask_fill', True))


# -- Pooled states for the 'avg' / 'max' policies. ----------------------------

@dataclasses.dataclass(frozen=True)
class PooledSpec(NetworkSpec):
  """A ``NetworkSpec`` whose temporal stages also pool their input.

  Every temporal stage's state becomes ``{'stage': s, 'pool': p}`` with
  ``p: (B, *in_shapes[l])`` the running sum (``pool='avg'``) or max
  (``'max'``) of the stage's input since the last fragment boundary. The
  parameters are the base spec's; engines and the mesh use it unchanged.
  """
  pool: str = 'avg'

  def apply_block(self, l, params, inputs, state, *, sideways=False):
    if not self.temporal[l]:
      return super().apply_block(l, params, inputs, state, sideways=sideways)
    # The block's own apply, keeping the combined input to pool it.
    y, s, x = nnx.merge(self.block_defs[l], params).apply(
        inputs, state['stage'], sideways=sideways)
    acc = state['pool']
    pool = acc + x if self.pool == 'avg' else jnp.maximum(acc, x)
    return y, {'stage': s, 'pool': pool.astype(acc.dtype)}

  def init_states(self, params, batch_size, dtype=jnp.float32):
    base = super().init_states(params, batch_size, dtype)
    return tuple(
        {'stage': s, 'pool': _empty_pool(self.pool, (batch_size, *shape),
                                         dtype)}
        if temporal else s
        for s, temporal, shape in zip(base, self.temporal, self.in_shapes))


def _empty_pool(pool: str, shape, dtype) -> jax.Array:
  return jnp.full(shape, 0 if pool == 'avg' else -jnp.inf, dtype)


def pooled_spec(spec: NetworkSpec, cache_policy: str) -> NetworkSpec:
  """The spec a ``cache_policy`` needs: ``spec`` itself for ``'last'``, a
  ``PooledSpec`` for ``'avg'`` / ``'max'`` (equal by value for equal specs
  and policies, so jitted functions compile once)."""
  if cache_policy == 'last' or (isinstance(spec, PooledSpec)
                                and spec.pool == cache_policy):
    return spec
  if cache_policy not in CACHE_POLICIES:
    raise ValueError(f'cache_policy={cache_policy!r} is unknown; use one of '
                     f'{CACHE_POLICIES}')
  fields = {f.name: getattr(spec, f.name)
            for f in dataclasses.fields(NetworkSpec)}
  if 'variants' in fields:  # A shape cache of the base spec: not ours.
    fields['variants'] = {}
  return PooledSpec(**fields, pool=cache_policy)


# -- The engine the fragments run on (``engine.LocalEngine`` or
# ``mesh.MeshEngine``: the same interface). -----------------------------------

def as_engine(spec):
  """An engine (returned as is), or a ``NetworkSpec`` on one device."""
  if isinstance(spec, NetworkSpec):
    return engine.LocalEngine(spec)
  if not hasattr(spec, 'window_grads'):
    raise TypeError(
        f'progressive takes a NetworkSpec or an engine (engine.LocalEngine, '
        f'mesh.MeshEngine), got {type(spec).__name__}; on a mesh pass '
        'mesh.MeshEngine(mspec) with the sharded state '
        '(MeshEngine.to_state)')
  return spec


def _engine_for(eng, cache_policy: str, params, frame_shape):
  """``eng`` on the spec a ``cache_policy`` needs (pooled stage states) at
  frames of ``frame_shape`` (multigrid: any size the network takes)."""
  spec = pooled_spec(eng.spec, cache_policy)
  if tuple(frame_shape) != spec.frame_shape:
    try:
      spec = network.for_frame_shape(spec, eng.params_like(params),
                                     frame_shape)
    except ValueError as e:
      raise ValueError(f'video frames {tuple(frame_shape)} do not match the '
                       f'network: {e}') from e
  return eng.with_spec(spec)


def _setup(spec, params, video, targets, opts: Options, carry, mode,
           compute_dtype):
  """Engine, normalised video, initial carry and caches of a video."""
  engine.check_mode(mode)
  eng = as_engine(spec)
  frame_ndim = len(eng.spec.frame_shape)
  frame_shape = video.shape[video.ndim - frame_ndim:]
  b = _engine_for(eng, opts.cache_policy, params, frame_shape)
  v = _normalise(b.spec, opts, video, targets)
  clip, tgt, _, _ = _window(v, opts, jnp.asarray(0),
                            True if opts.overlap else None)
  engine.check_fill(opts.mask_fill, mode)
  fresh = carry is None
  carry = (b.init_carry(params, clip, tgt, mode, compute_dtype) if fresh
           else b.from_stream_carry(carry))
  ticks = _video_ticks(v, opts)
  if fresh and opts.mask_fill and ticks <= engine.delay(b.spec, mode):
    raise ValueError(
        f'a video of {ticks} frames has no loss tick in {mode!r}: a fresh '
        f'stream masks its first {engine.delay(b.spec, mode)} ticks (the '
        f'pipeline fill, mask_fill={opts.mask_fill!r})')
  return b, v, carry, _initial_caches(b, params, carry)


# -- Fragments of a video: inputs of each window. -----------------------------

class _Video(NamedTuple):
  """A video and its targets, normalised (static layout)."""
  video: jax.Array  # (B, T, ...) or (B, F, Tf, ...)
  targets: jax.Array  # clip-level, or per frame in the video's layout
  fragmented: bool  # True: (B, F, Tf, ...) layout.
  num_fragments: int


def _target_kind(spec: NetworkSpec, targets, lead: tuple) -> str:
  """'clip', 'fragment' or 'frame' for targets of a video with ``lead`` axes
  ``(B, T)`` or ``(B, F, Tf)`` (``F = lead[1]`` in the fragments layout)."""
  clip_ndim = {'xent': 1, 'sigmoid_xent': 2}.get(spec.loss)
  extra = len(lead) - 1  # Axes between batch and the label: 1 or 2.
  fits = tuple(targets.shape[:len(lead)]) == tuple(lead)
  if clip_ndim is None or (targets.ndim == clip_ndim + extra and fits):
    if not fits:
      raise ValueError(f'per-frame targets {targets.shape} do not match the '
                       f'video: expected {lead} first')
    return 'frame'
  if targets.ndim == clip_ndim:
    return 'clip'
  if targets.ndim == clip_ndim + 1:
    return 'fragment'
  raise ValueError(f'targets of shape {targets.shape} fit neither a clip, a '
                   f'fragment nor a frame label for a video {lead}')


def _normalise(spec: NetworkSpec, opts: Options, video, targets) -> _Video:
  """Checks shapes; per-fragment labels become per-frame targets."""
  frame_ndim = len(spec.frame_shape)
  fragmented = video.ndim == frame_ndim + 3
  if video.ndim not in (frame_ndim + 2, frame_ndim + 3):
    raise ValueError(f'video of shape {video.shape}: expected (B, T, '
                     f'*{spec.frame_shape}) or (B, F, Tf, *{spec.frame_shape})')
  if fragmented:
    b, num, tf = video.shape[:3]
    if tf != opts.fragment_frames:
      raise ValueError(f'fragments of {tf} frames, but fragment_frames='
                       f'{opts.fragment_frames}')
    lead = (b, num, tf)
  else:
    b, t = video.shape[:2]
    num = opts.num_fragments(t)
    lead = (b, t)
  kind = _target_kind(spec, targets, lead)
  if kind == 'fragment':
    if targets.shape[1] != num:
      raise ValueError(f'per-fragment labels {targets.shape}: expected '
                       f'{num} fragments on axis 1')
    if fragmented:
      targets = jnp.broadcast_to(targets[:, :, None],
                                 (b, num, tf, *targets.shape[2:]))
    else:  # Each frame takes its fragment's label (delayed like any frame).
      targets = jnp.take(targets, opts.fragment_of_frame(lead[1]), axis=1)
  return _Video(video, targets, fragmented, num)


def _video_ticks(v: _Video, opts: Options) -> int:
  """Ticks a video runs: fragment 0 whole, every later one its new frames."""
  return opts.fragment_frames + (v.num_fragments - 1) * opts.step


def _window(v: _Video, opts: Options, f, first):
  """Inputs of fragment ``f``'s window: ``(clip, targets, start, length)``.

  ``first`` is static: True for fragment 0 run alone, False for a later
  fragment, None when every fragment has the same length (overlap 0).
  """
  full = first or opts.overlap == 0
  length = opts.fragment_frames if full else opts.step
  if v.fragmented:
    clip = lax.dynamic_index_in_dim(v.video, f, 1, keepdims=False)
    targets = (lax.dynamic_index_in_dim(v.targets, f, 1, keepdims=False)
               if _frame_targets(v) else v.targets)
    start = 0 if full else opts.overlap
  else:
    clip, targets = v.video, v.targets
    start = f * opts.step + (0 if full else opts.overlap)
  return clip, targets, start, length


def _frame_targets(v: _Video) -> bool:
  """Whether ``v.targets`` is per frame (in the fragments layout)."""
  return v.targets.ndim >= 3 and tuple(v.targets.shape[:3]) == tuple(
      v.video.shape[:3])


def _fragments(step_fn, state, v: _Video, opts: Options):
  """Runs ``step_fn(state, f, first) -> state`` over all fragments.

  One ``lax.scan`` over fragments when they all have the same length
  (overlap 0); otherwise fragment 0 alone, then a scan over the rest.
  """
  num = v.num_fragments
  if opts.overlap == 0:
    state, _ = lax.scan(lambda s, f: (step_fn(s, f, None), None), state,
                        jnp.arange(num))
    return state
  state = step_fn(state, jnp.asarray(0), True)
  if num > 1:
    state, _ = lax.scan(lambda s, f: (step_fn(s, f, False), None), state,
                        jnp.arange(1, num))
  return state


# -- Fragment boundaries: the cache policies. ---------------------------------

def _split_state(spec: NetworkSpec, state):
  """``(window state, pool or None)`` of a temporal stage's state."""
  if isinstance(spec, PooledSpec):
    return state['stage'], state['pool']
  return state, None


def _boundary(b, opts: Options, params, carry, caches, f, first):
  """Applies the cache policy to every temporal stage before fragment ``f``.

  Returns ``(carry, caches)``; ``caches[l]`` is stage ``l``'s cache set at
  this boundary (the ``previous`` of the next one). Before fragment 0
  nothing changes.
  """
  spec = b.spec
  if first:
    return carry, caches
  apply = f > 0
  # The previous cache exists from the second boundary on (PGT: no blend at
  # the first one).
  momentum = jnp.where(f >= 2, opts.momentum, 0.0)
  # Ticks the fragment before ran (its pool's count).
  ticks = jnp.where(f == 1, opts.fragment_frames,
                    opts.step).astype(jnp.float32)
  states = list(b.to_stream_carry(carry).states)
  like = b.params_like(params)  # The stage objects, for their hooks.
  caches = list(caches)
  for l in range(spec.num_stages):
    if not spec.temporal[l]:
      continue
    window, pool = _split_state(spec, states[l])
    stage = nnx.merge(spec.block_defs[l], like['blocks'][l]).stage
    hook = getattr(stage, 'fragment_boundary', None)
    if hook is None:
      if opts.cache_policy != 'last' or opts.momentum:
        raise ValueError(
            f'stage {l} ({type(stage).__name__}) has no fragment_boundary '
            f'hook: only cache_policy="last" with momentum 0 applies to it')
      continue
    pooled = None
    if pool is not None:
      pooled = pool / ticks.astype(pool.dtype) if spec.pool == 'avg' else pool
    new = hook(window, policy=opts.cache_policy, momentum=momentum,
               pooled=pooled, previous=caches[l])
    new = jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, window)
    caches[l] = new
    if pool is not None:
      fresh = _empty_pool(spec.pool, pool.shape, pool.dtype)
      states[l] = {'stage': new, 'pool': jnp.where(apply, fresh, pool)}
    else:
      states[l] = new
  stream = b.to_stream_carry(carry)._replace(states=tuple(states))
  return b.from_stream_carry(stream), tuple(caches)


def _initial_caches(b, params, carry) -> tuple:
  """Zero caches shaped like every temporal stage's window state."""
  del params
  states = b.to_stream_carry(carry).states
  return tuple(
      jax.tree.map(jnp.zeros_like, _split_state(b.spec, s)[0])
      if b.spec.temporal[l] else ()
      for l, s in enumerate(states))


def _total(spec: NetworkSpec, v: _Video, opts: Options, carry, mode: str):
  """The valid ticks of the whole video: every tick's loss weight under
  ``'mean'`` is one over this (``engine.tick_weights``'s ``total``), so a
  Sideways message that crosses a fragment boundary keeps its weight and the
  video's gradient is the whole-video one. ``None`` for ``'sum'`` (each
  fragment its own mean)."""
  if opts.loss_weighting == 'sum':
    return None
  return engine.valid_ticks(carry.tick, _video_ticks(v, opts),
                            engine.delay(spec, mode), opts.mask_fill)


def _finish(spec: NetworkSpec, acc: dict, carry, num: int
            ) -> engine.ClipOutput:
  """The video's output (``engine.finish_windows``) with its fragments."""
  out = engine.finish_windows(spec, acc, carry)
  return out._replace(metrics=dict(out.metrics,
                                   fragments=jnp.asarray(num, jnp.int32)))


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


# -- Training. ----------------------------------------------------------------

def _truncated(b, optimizer, params, opt_state, v: _Video,
               opts: Options, carry, caches, *, mode, compute_dtype,
               update: bool):
  """Fragment by fragment, gradients stopped at every boundary.

  Returns ``(params, opt_state, objective, grads, ClipOutput)``; with
  ``update`` (step per fragment) params are updated in the loop and
  ``grads`` is None.
  """
  zero = jax.tree.map(jnp.zeros_like, params)
  # A step per fragment optimises each fragment's own mean loss.
  total = None if update else _total(b.spec, v, opts, carry, mode)
  kw = dict(mode=mode, mask_fill=opts.mask_fill, compute_dtype=compute_dtype,
            total=total)

  def step(state, f, first):
    p, o, c, caches, g, obj, acc = state
    c, caches = _boundary(b, opts, p, c, caches, f, first)
    clip, targets, start, length = _window(v, opts, f, first)
    loss, grads, out = b.window_grads(p, clip, targets, c, start=start,
                                      length=length, **kw)
    if update:
      p, o = engine.apply_gradients(optimizer, p, o, grads,
                                    out.metrics['valid_ticks'])
    else:  # 'sum': fragments' means; 'mean': every tick weighted by total.
      g, obj = _add(g, grads), obj + loss
    return p, o, out.carry, caches, g, obj, engine.add_window(acc, out)

  init = (params, opt_state, carry, caches, None if update else zero,
          jnp.zeros(()), engine.init_window_sums(b.spec, carry.targets.shape[0]))
  params, opt_state, carry, _, grads, obj, acc = _fragments(step, init, v,
                                                            opts)
  out = _finish(b.spec, acc, carry, v.num_fragments)
  return params, opt_state, obj, grads, out


def _untruncated(b, params, v: _Video, opts: Options, carry,
                 caches, *, mode, compute_dtype):
  """Exact gradient of the video objective through every fragment (exact
  modes), one fragment's activations at a time (rematerialised)."""
  carry = lax.stop_gradient(carry)  # The incoming stream is a constant.
  kw = dict(mode=mode, mask_fill=opts.mask_fill, compute_dtype=compute_dtype,
            total=_total(b.spec, v, opts, carry, mode))

  def objective(p):
    def step(state, f, first):
      c, caches, obj, acc = state
      c, caches = _boundary(b, opts, p, c, caches, f, first)
      clip, targets, start, length = _window(v, opts, f, first)
      loss, out = b.run(p, clip, targets, c, start=start, length=length, **kw)
      return (out.carry, caches, obj + loss,
              engine.add_window(acc, lax.stop_gradient(out)))

    def remat(state, f, first):
      return jax.checkpoint(functools.partial(step, first=first))(state, f)

    init = (carry, caches, jnp.zeros(()),
            engine.init_window_sums(b.spec, carry.targets.shape[0]))
    c, _, obj, acc = _fragments(remat, init, v, opts)
    return obj, (lax.stop_gradient(c), acc)

  (obj, (carry, acc)), grads = jax.value_and_grad(objective, has_aux=True)(
      params)
  return obj, grads, _finish(b.spec, acc, carry, v.num_fragments)


def _grads(spec, params, video, targets, *, mode, options, carry,
           compute_dtype):
  b, v, carry, caches = _setup(spec, params, video, targets, options, carry,
                               mode, compute_dtype)
  if not options.truncate_gradients and mode != 'sideways':
    return _untruncated(b, params, v, options, carry, caches, mode=mode,
                        compute_dtype=compute_dtype)
  _, _, obj, grads, out = _truncated(
      b, None, params, None, v, options, carry, caches, mode=mode,
      compute_dtype=compute_dtype, update=False)
  return obj, grads, out


@functools.partial(jax.jit, static_argnames=('spec', 'mode', 'options',
                                             'compute_dtype'))
def loss_and_grads(spec, params: PyTree, video: jax.Array,
                   targets: jax.Array, *, mode: str, options: Options,
                   carry=None, compute_dtype=jnp.float32):
  """The video objective and its gradient, fragment by fragment.

  Args:
    spec: a ``NetworkSpec``, or an engine (``mesh.MeshEngine``).
    params: from ``network.split`` (in the engine's state layout).
    video: ``(B, T, *frame_shape)`` or fragments ``(B, F, Tf, *frame_shape)``.
    targets: a clip label ``(B,)`` (``(B, K)`` multi-hot), per-fragment labels
      ``(B, F)`` (``(B, F, K)``), or per-frame targets in the video's layout.
    mode: ``'bp'``, ``'pipelined_bp'`` or ``'sideways'``.
    options: fragments, cache policy, gradients (``Options``;
      ``step_per`` is ignored: this is one gradient per video).
    carry: a stream carry to continue (``None``: a fresh stream per video).

  Returns:
    ``(objective, grads, ClipOutput)``: the objective is the sum (or
    tick-weighted mean) of the fragments' losses, ``grads`` its gradient
    (Sideways: its Sideways approximation); the output holds the final carry,
    tick-weighted metrics (``loss`` is the video's mean loss, ``fragments``)
    and predictions.
  """
  return _grads(spec, params, video, targets, mode=mode, options=options,
                carry=carry, compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=('spec', 'optimizer', 'mode',
                                             'options', 'compute_dtype'))
def train_step(spec, optimizer: optax.GradientTransformation,
               params: PyTree, opt_state: PyTree, video: jax.Array,
               targets: jax.Array, *, mode: str, options: Options,
               carry=None, compute_dtype=jnp.float32):
  """One progressive training step on a batch of videos.

  ``options.step_per='video'``: the fragments' gradients summed (or
  averaged, ``loss_weighting``), then one optax step; ``'fragment'``: an
  optax step after every fragment, the stream carried through. Either way
  one training step: the rate schedule moves once (``optim.advance``).
  Arguments as ``loss_and_grads``.

  Returns:
    ``(params, opt_state, ClipOutput)`` with the video's metrics.
  """
  if options.step_per == 'video':
    _, grads, out = _grads(spec, params, video, targets, mode=mode,
                           options=options, carry=carry,
                           compute_dtype=compute_dtype)
    params, opt_state = engine.apply_gradients(
        optimizer, params, opt_state, grads, out.metrics['valid_ticks'])
    return params, optim.advance(opt_state), out
  b, v, carry, caches = _setup(spec, params, video, targets, options, carry,
                               mode, compute_dtype)
  params, opt_state, _, _, out = _truncated(
      b, optimizer, params, opt_state, v, options, carry, caches, mode=mode,
      compute_dtype=compute_dtype, update=True)
  return params, optim.advance(opt_state), out


# -- Evaluation. --------------------------------------------------------------

class Predictions(NamedTuple):
  """Video predictions from per-fragment clip predictions, ``(B, K)`` each.

  Attributes:
    mean, max: mean / elementwise max over the fragments (with valid ticks)
      of each fragment's clip prediction (its logits averaged over its
      valid ticks): PGT's progressive-evaluation ensembles.
    last: the last fragment's prediction.
    ticks: logits averaged over every valid tick of the video (with the
      ``'last'`` policy and momentum 0: exactly one full pass).
    output: the video's metrics and final carry (``ClipOutput``).
  """
  mean: jax.Array
  max: jax.Array
  last: jax.Array
  ticks: jax.Array
  output: engine.ClipOutput


@functools.partial(jax.jit, static_argnames=('spec', 'mode', 'options',
                                             'compute_dtype'))
def predict(spec, params: PyTree, video: jax.Array, targets: jax.Array, *,
            mode: str, options: Options, carry=None,
            compute_dtype=jnp.float32) -> Predictions:
  """Progressive evaluation: the video forward fragment by fragment.

  Classification losses only. Arguments as ``loss_and_grads``; ``targets``
  only feed the loss metric. ``sideways`` runs the pipelined forward.
  """
  fwd_mode = engine.forward_mode(mode)
  if options.mask_fill == 'stages':  # A gradient rule: its loss scores all.
    options = dataclasses.replace(options, mask_fill=False)
  b, v, carry, caches = _setup(spec, params, video, targets, options, carry,
                               fwd_mode, compute_dtype)
  if b.spec.loss == 'mse':
    raise ValueError('predict needs a classification head (xent or '
                     'sigmoid_xent)')
  kw = dict(mode=fwd_mode, mask_fill=options.mask_fill,
            compute_dtype=compute_dtype)
  batch = carry.targets.shape[0]
  zeros = jnp.zeros((batch, *b.spec.prediction_shape))

  def step(state, f, first):
    c, caches, acc, ens = state
    c, caches = _boundary(b, options, params, c, caches, f, first)
    clip, targets, start, length = _window(v, options, f, first)
    _, out = b.run(params, clip, targets, c, start=start, length=length, **kw)
    pred = out.predictions.astype(jnp.float32)
    valid = out.metrics['valid_ticks'] > 0
    total, best, count, last = ens
    ens = (total + jnp.where(valid, pred, 0), jnp.where(valid, jnp.maximum(
        best, pred), best), count + valid, jnp.where(valid, pred, last))
    return out.carry, caches, engine.add_window(acc, out), ens

  ens = (zeros, jnp.full_like(zeros, -jnp.inf), jnp.zeros((), jnp.int32),
         zeros)
  init = (carry, caches, engine.init_window_sums(b.spec, batch), ens)
  carry, _, acc, (total, best, count, last) = _fragments(step, init, v,
                                                         options)
  out = _finish(b.spec, acc, carry, v.num_fragments)
  return Predictions(mean=total / jnp.maximum(count, 1).astype(jnp.float32),
                     max=jnp.where(count > 0, best, 0.0), last=last,
                     ticks=out.predictions, output=out)


def video_predictions(spec, params, video, targets, *, mode: str,
                      options: Options, ensemble: str,
                      compute_dtype=jnp.float32) -> jax.Array:
  """``(B, K)`` predictions of a batch of videos by ``ensemble``:
  ``'full'`` (one full pass of the whole video, ``engine.forward``; needs a
  ``(B, T, ...)`` video) or one of ``Predictions``' fields."""
  if ensemble not in ENSEMBLES:
    raise ValueError(f'ensemble={ensemble!r} is unknown; use one of '
                     f'{ENSEMBLES}')
  if ensemble == 'full':
    return as_engine(spec).forward(params, video, targets, mode=mode,
                                   compute_dtype=compute_dtype).predictions
  preds = predict(spec, params, video, targets, mode=mode, options=options,
                  compute_dtype=compute_dtype)
  return getattr(preds, ensemble)


def evaluate_fragments(spec, params, batches, *, mode: str,
                       options: Options,
                       ensembles=('full', 'mean', 'max', 'last'),
                       compute_dtype=jnp.float32,
                       max_batches: int | None = None,
                       label_key: str = 'label') -> dict:
  """Top-1 accuracy of each ensemble over an iterator of ``xent`` batches.

  Returns ``{'eval/accuracy_<ensemble>': float, 'eval/clips': n}``; padded
  clips (``mask`` False) are left out.
  """
  unknown = [e for e in ensembles if e not in ENSEMBLES]
  if unknown:
    raise ValueError(f'ensembles {unknown} are unknown; use some of '
                     f'{ENSEMBLES}')
  correct = {e: 0.0 for e in ensembles}
  n = 0
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    video, labels = batch['video'], batch[label_key]
    mask = np.asarray(batch.get('mask', np.ones(len(video), bool)))
    pgt = None  # One progressive pass serves every fragment ensemble.
    for e in ensembles:
      if e == 'full':
        pred = video_predictions(spec, params, video, labels, mode=mode,
                                 options=options, ensemble=e,
                                 compute_dtype=compute_dtype)
      else:
        if pgt is None:
          pgt = predict(spec, params, video, labels, mode=mode,
                        options=options, compute_dtype=compute_dtype)
        pred = getattr(pgt, e)
      pred = np.asarray(pred)
      correct[e] += float((pred.argmax(-1) == np.asarray(labels))[mask].sum())
    n += int(mask.sum())
  out = {f'eval/accuracy_{e}': c / max(n, 1) for e, c in correct.items()}
  out['eval/clips'] = n
  return out


# -- Training-loop integration (skipside.train). ------------------------------

def checked_options(config) -> Options:
  """``Options`` from ``config.progressive``; errors name the key."""
  c = config.progressive
  try:
    opts = dataclasses.replace(
        Options.from_config(c),
        mask_fill=engine.FILL_NAMES[config.train.get('fill', 'mask_loss')])
    engine.check_fill(opts.mask_fill, config.mode)
  except ValueError as e:
    raise ValueError(f'config.progressive: {e}') from e
  if config.train.update_every or config.train.stream or config.train.flush:
    raise ValueError(
        'config.progressive.enabled cannot be combined with '
        'config.train.update_every, stream or flush (fragments already carry '
        'the stream within a video; step_per sets the updates)')
  frag = config.data.get('fragment_frames', 0)
  if frag and (frag != opts.fragment_frames
               or config.data.fragment_overlap != opts.overlap):
    raise ValueError(
        f'config.data.fragment_frames/overlap ({frag}, '
        f'{config.data.fragment_overlap}) differ from config.progressive '
        f'({opts.fragment_frames}, {opts.overlap}); set the data keys to 0 '
        '(whole videos, cut here) or to the same values')
  mg = config.get('multigrid')
  if not (mg and (mg.get('long_cycle') or mg.get('short_cycle'))):
    opts.num_fragments(config.data.num_frames)  # Multigrid: per bucket.
  return opts


def make_train_step(spec, optimizer, config, *, compute_dtype,
                    skip_nonfinite: bool = False):
  """The training loop's step for ``config.progressive.enabled``.

  ``spec``: a ``NetworkSpec`` or an engine (``mesh.MeshEngine``: params and
  optimizer state in its sharded layout).

  Returns ``step(params, opt_state, video, targets, carry) -> (params,
  opt_state, ClipOutput)`` like ``skipside.train``'s; ``carry`` is ignored
  (each video is a fresh stream). Shape-generic: one compile per video shape
  (multigrid buckets: one per bucket).
  """
  opts = checked_options(config)
  mode = config.mode

  # The loop owns its state: params and optimizer state are donated.
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, video, targets, carry=None):
    del carry
    *new, out = train_step(spec, optimizer, params, opt_state, video,
                           targets, mode=mode, options=opts,
                           compute_dtype=compute_dtype)
    params, opt_state = optim.finish_step((params, opt_state), tuple(new),
                                          out.metrics['loss'],
                                          skip_nonfinite=skip_nonfinite)
    return params, opt_state, out._replace(carry=None)
  return step
