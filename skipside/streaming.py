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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from skipside import engine, optim

PyTree = Any
MODES = ('sideways',)


def check_chunking(num_frames: int, chunk_frames: int, mode: str) -> None:
  """Raises ``ValueError`` naming what does not fit."""
  if mode not in MODES:
    raise ValueError(f'chunked clips train only in {MODES} (exact: its '
                     f'gradient is forward-propagated), not {mode!r}')
  if chunk_frames <= 0 or num_frames % chunk_frames:
    raise ValueError(f'a clip of {num_frames} frames does not split into '
                     f'chunks of {chunk_frames} frames')


@functools.partial(jax.jit, static_argnames=('eng', 'mode', 'length',
                                             'flush', 'mask_fill',
                                             'compute_dtype'))
def start(eng, params, chunk, targets, carry, *, mode, length, flush,
          mask_fill, compute_dtype):
  """A clip's start: ``(carry, total, zero grads, zero sums)``.

  ``carry``: a stream carry to continue (``engine.StreamCarry``), or None
  for a fresh stream; ``total``: the clip's valid ticks, over which every
  tick's loss is weighed; ``length``: the clip's frames.
  """
  if carry is None:
    carry = eng.init_carry(params, chunk, targets, mode, compute_dtype)
  else:
    carry = eng.from_stream_carry(carry)
  total = engine.tick_weights(
      eng.to_stream_carry(carry), 0, length + flush, length,
      engine.delay(eng.spec, mode), mask_fill)[1]
  zero = jax.tree.map(jnp.zeros_like, params)
  return carry, total, zero, engine.init_window_sums(eng.spec,
                                                     chunk.shape[0])


@functools.partial(jax.jit, static_argnames=('eng', 'mode', 'length',
                                             'mask_fill', 'compute_dtype'),
                   donate_argnames=('grads', 'sums', 'carry'))
def chunk_grads(eng, params, grads, sums, chunk, targets, carry, total, *,
                mode, length, mask_fill, compute_dtype):
  """One chunk: ``length`` ticks from its first frame (``length`` past the
  chunk's frames: the flush). Returns ``(grads, sums, carry)`` with the
  chunk's gradient and metrics added; the accumulators and carry are
  donated."""
  _, g, out = eng.window_grads(params, chunk, targets, carry, mode=mode,
                               start=0, length=length, mask_fill=mask_fill,
                               compute_dtype=compute_dtype, total=total)
  return (jax.tree.map(jnp.add, grads, g), engine.add_window(sums, out),
          out.carry)


@functools.partial(jax.jit, static_argnames=('eng', 'optimizer',
                                             'skip_nonfinite'),
                   donate_argnames=('params', 'opt_state'))
def update(eng, optimizer, params, opt_state, grads, sums, carry, *,
           skip_nonfinite=False):
  """The clip's optimizer step on the summed gradient: ``(params,
  opt_state, ClipOutput)`` (the carry as an ``engine.StreamCarry``)."""
  out = engine.finish_windows(eng.spec, sums, eng.to_stream_carry(carry))
  new = engine.apply_gradients(optimizer, params, opt_state, grads,
                               out.metrics['valid_ticks'])
  new = new[0], optim.advance(new[1])
  params, opt_state = optim.finish_step((params, opt_state), new,
                                        out.metrics['loss'],
                                        skip_nonfinite=skip_nonfinite)
  return params, opt_state, out


def _split(x: np.ndarray, i: int, chunk_frames: int, per_frame: bool):
  return x[:, i * chunk_frames:(i + 1) * chunk_frames] if per_frame else x


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

  def _put(self, tree):
    rows = jax.tree.leaves(tree)[0].shape[0]
    return self.eng.put_batch(tree, self.global_size or rows)

  def __call__(self, params, opt_state, video, targets, carry=None):
    video, targets = np.asarray(video), np.asarray(targets)
    frames = video.shape[1]
    check_chunking(frames, self.chunk_frames, self.mode)
    engine.check_inputs(self.eng.spec, video, targets, mode=self.mode,
                        carry=carry, flush=self.flush,
                        mask_fill=self.mask_fill)
    per_frame = engine.is_per_frame(self.eng.spec, video, targets)
    num = frames // self.chunk_frames
    kw = dict(mode=self.mode, mask_fill=self.mask_fill,
              compute_dtype=self.compute_dtype)
    chunk, tgt = self._put((video[:, :self.chunk_frames],
                            _split(targets, 0, self.chunk_frames, per_frame)))
    carry, total, grads, sums = start(self.eng, params, chunk, tgt, carry,
                                      length=frames, flush=self.flush, **kw)
    for i in range(num):
      if i:
        chunk, tgt = self._put((
            video[:, i * self.chunk_frames:(i + 1) * self.chunk_frames],
            _split(targets, i, self.chunk_frames, per_frame)))
      last = i == num - 1
      grads, sums, carry = chunk_grads(
          self.eng, params, grads, sums, chunk, tgt, carry, total,
          length=self.chunk_frames + (self.flush if last else 0), **kw)
    return update(self.eng, self.optimizer, params, opt_state, grads, sums,
                  carry, skip_nonfinite=self.skip_nonfinite)
