"""Long clips at constant device memory: a clip fed to the engine in chunks.

A Sideways clip of ``T`` frames trains as ``T / C`` consecutive chunks of
``C`` frames, one program call per chunk: the stream carry (pipeline
buffers, in-flight Sideways messages, temporal states, target FIFO, tick
counter) goes from one call to the next and each chunk's gradient is added
on the device; then one optimizer update. Every tick's loss weighs one over
the *clip's* valid ticks (``engine.tick_weights``'s ``total``), so the sum
is the whole clip's gradient, exactly: Sideways' gradient is
forward-propagated, its messages cross a chunk boundary in the carry like
any tick. A flush (``flush`` ticks past the last frame) runs with the last
chunk.

Only the chunk is an argument of the device program, so device memory does
not grow with ``T``: one chunk of frames, the carry, params, optimizer
state and one gradient accumulator. The clip stays in host memory (pass a
numpy array); each chunk goes to the devices as the engine takes a batch
(``eng.put_batch``: on a mesh, time-sharded over the stage devices when
``C`` is a multiple of the stage axis).

Exact modes are not chunked: their gradient would stop at every chunk's
incoming carry (truncated), or need every tick's residuals (PGT's
``truncate_gradients=False`` keeps one carry per fragment for that).

Example::

    eng = engine.LocalEngine(spec)           # or mesh.MeshEngine(mspec)
    step = streaming.ChunkedStep(eng, optimizer, mode='sideways',
                                 chunk_frames=64)
    params, opt_state, out = step(params, opt_state, video, labels)
    # video: (B, T, H, W, C) numpy, T a multiple of 64; out as
    # engine.train_step's (the clip's tick-weighted metrics, final carry).
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from skipside import engine, optim

PyTree = Any
MODES = ('sideways',)


def is_chunked(config) -> bool:
  """Whether ``config`` trains each clip as chunks
  (``config.train.chunk_frames``): the loop then passes host batches to
  the step and the evaluation forward, which send one chunk at a time."""
  return bool(config.train.get('chunk_frames'))


def check_chunking(num_frames: int, chunk_frames: int,
                   mode: str | None = None) -> None:
  """Raises ``ValueError`` naming what does not fit (``mode``: a training
  mode, which must be one of ``MODES``)."""
  if mode is not None and mode not in MODES:
    raise ValueError(f'chunked clips train only in {MODES} (exact: its '
                     f'gradient is forward-propagated), not {mode!r}')
  if chunk_frames <= 0 or num_frames % chunk_frames:
    raise ValueError(f'a clip of {num_frames} frames does not split into '
                     f'chunks of {chunk_frames} frames')


class Accumulated(NamedTuple):
  """What passes from one chunk's program to the next (on the devices)."""
  grads: PyTree  # The clip's gradient so far, in the engine's state layout.
  sums: dict  # Metric sums (``engine.add_window``).
  carry: Any  # The stream carry, in the engine's layout.
  total: jax.Array  # int32: the clip's valid ticks (every tick's weight).


def _start(eng, params, chunk, targets, carry, *, mode, clip_frames,
           mask_fill, compute_dtype) -> Accumulated:
  """Before the first chunk: the carry (fresh if None), zero sums."""
  if carry is None:
    carry = eng.init_carry(params, chunk, targets, mode, compute_dtype)
  else:
    carry = eng.from_stream_carry(carry)
  total = engine.valid_ticks(carry.tick, clip_frames,
                      engine.delay(eng.spec, mode), mask_fill)
  return Accumulated(None, engine.init_window_sums(eng.spec, chunk.shape[0]),
                     carry, total)


def _window(eng, params, chunk, targets, acc: Accumulated, *, start, length,
            mode, mask_fill, compute_dtype) -> Accumulated:
  """``length`` ticks of ``chunk`` from frame ``start`` added to ``acc``."""
  _, g, out = eng.window_grads(params, chunk, targets, acc.carry, mode=mode,
                               start=start, length=length,
                               mask_fill=mask_fill,
                               compute_dtype=compute_dtype, total=acc.total)
  grads = g if acc.grads is None else jax.tree.map(jnp.add, acc.grads, g)
  return Accumulated(grads, engine.add_window(acc.sums, out), out.carry,
                     acc.total)


_STATIC = ('eng', 'mode', 'mask_fill', 'compute_dtype')


@functools.partial(jax.jit, static_argnames=_STATIC)
def first_chunk(eng, params, chunk, targets, carry, clip_frames, *, mode,
                mask_fill, compute_dtype) -> Accumulated:
  """The clip's first chunk: its ticks' gradient and metrics.

  ``carry``: the stream carry to continue, or None for a fresh stream;
  ``clip_frames``: the whole clip's frames (an int32 array: one program for
  every clip length). The accumulators start here, inside the program, so
  that they come out in the engine's layout (on a mesh, sharded like
  the gradient).
  """
  acc = _start(eng, params, chunk, targets, carry, mode=mode,
               clip_frames=clip_frames, mask_fill=mask_fill,
               compute_dtype=compute_dtype)
  return _window(eng, params, chunk, targets, acc, start=0,
                 length=chunk.shape[1], mode=mode, mask_fill=mask_fill,
                 compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=_STATIC,
                   donate_argnames=('acc',))
def next_chunk(eng, params, chunk, targets, acc: Accumulated, *, mode,
               mask_fill, compute_dtype) -> Accumulated:
  """A later chunk added to the previous one's ``acc`` (donated)."""
  return _window(eng, params, chunk, targets, acc, start=0,
                 length=chunk.shape[1], mode=mode, mask_fill=mask_fill,
                 compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=(*_STATIC, 'flush'),
                   donate_argnames=('acc',))
def flush_ticks(eng, params, chunk, targets, acc: Accumulated, *, flush,
                mode, mask_fill, compute_dtype) -> Accumulated:
  """``flush`` ticks past the last chunk (repeating its last frame, no
  loss), so that the messages in flight land, as a whole clip's flush."""
  return _window(eng, params, chunk, targets, acc, start=chunk.shape[1],
                 length=flush, mode=mode, mask_fill=mask_fill,
                 compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=('eng', 'optimizer',
                                             'skip_nonfinite'),
                   donate_argnames=('params', 'opt_state'))
def update(eng, optimizer, params, opt_state, acc: Accumulated, *,
           skip_nonfinite=False):
  """The clip's optimizer step on the summed gradient: ``(params,
  opt_state, ClipOutput)`` (the carry as an ``engine.StreamCarry``)."""
  out = engine.finish_windows(eng.spec, acc.sums,
                              eng.to_stream_carry(acc.carry))
  new = engine.apply_gradients(optimizer, params, opt_state, acc.grads,
                               out.metrics['valid_ticks'])
  new = new[0], optim.advance(new[1])
  params, opt_state = optim.finish_step((params, opt_state), new,
                                        out.metrics['loss'],
                                        skip_nonfinite=skip_nonfinite)
  return params, opt_state, out


# -- Evaluation: the pipelined forward, chunk by chunk. -----------------------

def _forward_window(eng, params, chunk, targets, carry, sums, *, mode,
                    compute_dtype):
  fwd_mode = engine.forward_mode(mode)
  _, out = eng.run(params, chunk, targets, carry, mode=fwd_mode, start=0,
                   length=chunk.shape[1], mask_fill=True,
                   compute_dtype=compute_dtype)
  return out.carry, engine.add_window(sums, out)


@functools.partial(jax.jit, static_argnames=('eng', 'mode', 'compute_dtype'))
def first_forward(eng, params, chunk, targets, *, mode, compute_dtype):
  """Evaluation's first chunk of a clip (a fresh stream): ``(carry, sums)``
  in the engine's layout."""
  fwd_mode = engine.forward_mode(mode)
  carry = eng.init_carry(params, chunk, targets, fwd_mode, compute_dtype)
  sums = engine.init_window_sums(eng.spec, chunk.shape[0], per_example=True)
  return _forward_window(eng, params, chunk, targets, carry, sums, mode=mode,
                         compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=('eng', 'mode', 'compute_dtype'),
                   donate_argnames=('carry', 'sums'))
def next_forward(eng, params, chunk, targets, carry, sums, *, mode,
                 compute_dtype):
  """A later chunk of evaluation's forward: ``(carry, sums)``."""
  return _forward_window(eng, params, chunk, targets, carry, sums, mode=mode,
                         compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=('eng',))
def finish_forward(eng, carry, sums) -> engine.ClipOutput:
  return engine.finish_windows(eng.spec, sums, eng.to_stream_carry(carry))


def _host_rows(x) -> np.ndarray:
  """This process's rows of ``x``: a host array as it is, or this process's
  part of a global array (evaluation feeds targets as global arrays,
  ``evaluation.eval_feed``; per-frame ones may be split over time too)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, x.sharding.mesh, x.sharding.spec))


def chunks(eng, video: np.ndarray, targets: np.ndarray, chunk_frames: int,
           global_size: int | None = None):
  """Yields each chunk of a host clip and its targets as ``eng`` takes a
  batch (``eng.put_batch``: this process's rows of ``global_size``)."""
  per_frame = engine.is_per_frame(eng.spec, video, targets)
  for i in range(video.shape[1] // chunk_frames):
    frames = slice(i * chunk_frames, (i + 1) * chunk_frames)
    yield eng.put_batch((video[:, frames],
                         targets[:, frames] if per_frame else targets),
                        global_size or len(video))


def run_chunks(batches, step):
  """``state = step(i, chunk, targets, state)`` over ``batches`` (``chunks``),
  from ``state=None``; returns the last state and the last ``(chunk,
  targets)``. Chunk ``i + 1`` is sent to
  the devices while program ``i`` runs, then the host waits for program
  ``i``: at most two chunks are on the devices (asynchronous dispatch
  would otherwise queue the whole clip there).
  """
  batches = iter(batches)
  state, upcoming, i = None, next(batches), 0
  while upcoming is not None:
    chunk, targets = upcoming
    state = step(i, chunk, targets, state)
    upcoming = next(batches, None)
    jax.block_until_ready(state)
    i += 1
  return state, (chunk, targets)


@dataclasses.dataclass(frozen=True)
class ChunkedStep:
  """The training step of a long clip, chunk by chunk (module docstring).

  Called like the loop's step, ``(params, opt_state, video, targets,
  carry=None) -> (params, opt_state, ClipOutput)``, with ``video`` and
  ``targets`` *host* arrays of this process's rows (numpy): only chunks
  reach the devices. Params and optimizer state (in ``eng``'s state layout)
  are donated.
  """
  eng: Any
  optimizer: optax.GradientTransformation
  mode: str
  chunk_frames: int
  flush: int = 0
  mask_fill: bool | str = True
  compute_dtype: Any = jnp.float32
  skip_nonfinite: bool = False
  global_size: int | None = None  # Rows over all processes (None: local).

  def __call__(self, params, opt_state, video, targets, carry=None):
    video, targets = np.asarray(video), np.asarray(targets)
    frames = video.shape[1]
    check_chunking(frames, self.chunk_frames, self.mode)
    engine.check_inputs(self.eng.spec, video, targets, mode=self.mode,
                        carry=carry, flush=self.flush,
                        mask_fill=self.mask_fill)
    kw = dict(mode=self.mode, mask_fill=self.mask_fill,
              compute_dtype=self.compute_dtype)
    def step(i, chunk, tgt, acc):
      if i == 0:
        return first_chunk(self.eng, params, chunk, tgt, carry,
                           np.int32(frames), **kw)
      return next_chunk(self.eng, params, chunk, tgt, acc, **kw)

    acc, (chunk, tgt) = run_chunks(chunks(
        self.eng, video, targets, self.chunk_frames, self.global_size), step)
    if self.flush:
      acc = flush_ticks(self.eng, params, chunk, tgt, acc, flush=self.flush,
                        **kw)
    return update(self.eng, self.optimizer, params, opt_state, acc,
                  skip_nonfinite=self.skip_nonfinite)


@dataclasses.dataclass(frozen=True)
class ChunkedForward:
  """Evaluation's forward of a long clip, chunk by chunk: ``(params, clip,
  targets) -> ClipOutput`` as ``evaluation.eval_step`` (the clip-level
  predictions, each clip's loss and the metrics over all valid ticks),
  with ``clip`` and ``targets`` host arrays of this process's rows."""
  eng: Any
  mode: str
  chunk_frames: int
  compute_dtype: Any = jnp.float32
  global_size: int | None = None  # Rows over all processes (None: local).

  def __call__(self, params, video, targets):
    video, targets = np.asarray(video), _host_rows(targets)
    frames = video.shape[1]
    check_chunking(frames, self.chunk_frames)
    engine.check_inputs(self.eng.spec, video, targets, mode=self.mode,
                        carry=None, flush=0, mask_fill=True,
                        needs_loss=False)
    kw = dict(mode=self.mode, compute_dtype=self.compute_dtype)

    def step(i, chunk, tgt, state):
      if i == 0:
        return first_forward(self.eng, params, chunk, tgt, **kw)
      return next_forward(self.eng, params, chunk, tgt, *state, **kw)

    (carry, sums), _ = run_chunks(chunks(
        self.eng, video, targets, self.chunk_frames, self.global_size), step)
    return finish_forward(self.eng, carry, sums)._replace(carry=None)
