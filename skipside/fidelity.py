"""Gradient fidelity: how close the Sideways gradient is to the exact one.

Sideways takes each stage's VJP at its current input with a message that
left the loss ``d_l`` ticks ago (``engine.message_distances``), computed on
activations that passed the stage ``d_l`` ticks before that loss: the
gradient is ``2·d_l`` ticks stale (``2(L-1-l)`` on a chain). On a constant
video the staleness costs nothing (DESIGN.md §1, oracle 2); on moving video
it bends the gradient. ``stage_cosines`` measures it on one clip: per stage,
the cosine between the Sideways gradient and the exact gradient of the same
pipelined loss (``pipelined_bp``), both of a fresh stream, with a flush of
``L-1`` ticks (loss masked) by default so that every message lands: the
cosine then shows the staleness alone, not the truncation of the last
``d_l`` ticks' messages at the end of the clip.

Example::

    eng = engine.LocalEngine(spec)        # or mesh.MeshEngine(mspec)
    cosines = fidelity.stage_cosines(eng, params, clip, labels)  # (L,)
    staleness_ticks(spec)                  # (2·d_0, ..., 0)
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from skipside import engine

PyTree = Any


def staleness_ticks(spec) -> tuple[int, ...]:
  """Per stage, the ticks between the activations a Sideways gradient is
  taken at and those that produced its loss: ``2·d_l``."""
  return tuple(2 * d for d in engine.message_distances(spec))


def cosine(a: PyTree, b: PyTree) -> jax.Array:
  """cos(a, b) of two pytrees as flat vectors (0 if either is zero)."""
  dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a),
                                           jax.tree.leaves(b)))
  norms = optax.tree.norm(a) * optax.tree.norm(b)
  return jnp.where(norms > 0, dot / jnp.maximum(norms, 1e-30), 0.0)


def stage_grads(eng, params, clip: jax.Array, targets: jax.Array, *,
                flush: int, compute_dtype=jnp.float32) -> dict:
  """``{'sideways': blocks, 'pipelined_bp': blocks}``: each stage's Sideways
  and exact gradient of one clip (fresh stream, fill masked), as pytrees."""
  grads = {}
  for mode in ('sideways', 'pipelined_bp'):
    carry = eng.init_carry(params, clip, targets, mode, compute_dtype)
    _, g, _ = eng.window_grads(params, clip, targets, carry, mode=mode,
                               start=0, length=clip.shape[1] + flush,
                               mask_fill=True, compute_dtype=compute_dtype)
    grads[mode] = eng.to_tree(g)['blocks']
  return grads


@functools.partial(jax.jit, static_argnames=('eng', 'flush', 'compute_dtype'))
def stage_cosines(eng, params, clip: jax.Array, targets: jax.Array, *,
                  flush: int | None = None,
                  compute_dtype=jnp.float32) -> jax.Array:
  """``(L,)``: per stage, cos(Sideways gradient, exact gradient) of a clip.

  Args:
    eng: an engine (``engine.LocalEngine`` or ``mesh.MeshEngine``);
      ``params`` in its state layout.
    clip, targets: a batch as the engine takes it; the stream is fresh and
      the fill masked (``mask_fill=True``), as in training.
    flush: ticks repeating the last frame, loss masked (``None``: ``L-1``,
      every message lands; the exact gradient does not change with it).

  A stage with no gradient (its messages land after the flush) gets 0.
  """
  flush = eng.spec.depth if flush is None else flush
  grads = stage_grads(eng, params, clip, targets, flush=flush,
                      compute_dtype=compute_dtype)
  return jnp.stack([cosine(s, e) for s, e in zip(grads['sideways'],
                                                 grads['pipelined_bp'])])
