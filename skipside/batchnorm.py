"""Population statistics of sub-batch normalization, for evaluation.

Training normalizes each sub-batch of ``base_size`` clips with its own
statistics (``skipside.sub_batch``, ``stages.SubBatchNorm``). Evaluation
needs fixed ones: ``population_statistics`` computes them from a forward
pass over training batches, every sub-batch of every frame merged with the
reference's rule (``sub_batch.merge_moments``: *precise BN*). The reference
keeps an EMA per sub-batch during training and merges those; this computes
the same merge over the exact moments instead, and needs nothing threaded
through the engines: training never reads the stored statistics
(``stages.SubBatchNorm``), so they are computed when an evaluation needs
them.

Example::

    net = Network([stages.Conv(1, 8, stride=2, rngs=rngs),
                   stages.SubBatchNorm(8, rngs=rngs), ...], ...)
    spec, params = network.split(net)
    ...train...
    eval_params = batchnorm.population_statistics(spec, params, train_clips)
    engine.forward(spec, eval_params, clip, labels, mode='bp')
"""

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skipside import engine, stages, tick
from skipside.sub_batch import merge_moments

PyTree = Any


def _norm_layers(module: nnx.Module) -> list:
  return [m for _, m in nnx.iter_modules(module)
          if isinstance(m, stages.SubBatchNorm)]


def has_norms(spec, params: PyTree) -> bool:
  """Whether any stage of ``spec`` holds a ``stages.SubBatchNorm``
  (``params`` may be abstract)."""
  return any(_norm_layers(nnx.merge(spec.block_defs[l], params['blocks'][l]))
             for l in range(spec.num_stages))


def clip_moments(spec, params: PyTree, clip: jax.Array) -> list:
  """Sub-batch moments at every norm layer over every frame of ``clip``.

  The synchronous (``bp``) forward (``tick.forward_group`` over all stages,
  scanned over the frames, each read as the engines read it): at evaluation
  every engine gives each stage the same inputs, frame ``t``'s features (the
  pipelined ones a few ticks later). Temporal stages carry their state.

  Args:
    clip: ``(B, T, *frame_shape)``, float or uint8 (scaled to [0, 1]).

  Returns:
    Per norm layer (block order, then module order) ``(means, variances)``,
    each ``(T * k, C)``.
  """
  num = spec.num_stages

  def norms(blk):
    return [(path, m) for path, m in nnx.iter_modules(blk)
            if isinstance(m, stages.SubBatchNorm)]
  paths = [[path for path, _ in norms(nnx.merge(spec.block_defs[l],
                                                params['blocks'][l]))]
           for l in range(num)]

  def frame(states, t):
    sown = {}

    def apply_block(l, p, inputs, state):
      """The block with its norm layers sowing their moments."""
      blk = nnx.merge(spec.block_defs[l], p)
      for _, m in norms(blk):
        m.collect = True
      (y, state), sown[l] = nnx.capture(blk, nnx.Intermediate)(
          tuple(inputs), state)
      return y, state

    x = engine.read_frame(clip, t, jnp.float32)
    _, new = tick.forward_group(
        spec, range(num), lambda l: params['blocks'][l], None,
        lambda l: states[l], x, sync=True, apply_block=apply_block)
    moments = [_at(sown[l], path)['moments'].get_value()[0]
               for l in range(num) for path in paths[l]]
    return tuple(new[l] for l in range(num)), moments

  states = tuple(spec.init_states(params, clip.shape[0]))
  _, moments = jax.lax.scan(frame, states, jnp.arange(clip.shape[1]))
  # (T, k, C) per layer -> (T * k, C), frame-major.
  return [(m.reshape(-1, m.shape[-1]), v.reshape(-1, v.shape[-1]))
          for m, v in moments]


def _at(tree, path):
  """The node of a ``State`` at a module ``path``."""
  for key in path:
    tree = tree[key]
  return tree


jitted_clip_moments = jax.jit(clip_moments, static_argnums=0)


def population_statistics(spec, params: PyTree, clips: Iterable, *,
                          moments_fn=None) -> PyTree:
  """``params`` with every ``SubBatchNorm``'s evaluation statistics set.

  Args:
    spec, params: the network (``network.split``).
    clips: training clips ``(B, T, *frame)``, float or uint8 (scaled to
      [0, 1] as the engines read it; a few batches are enough).
    moments_fn: replaces the jitted ``clip_moments`` (e.g. an executable
      compiled ahead of time), called as ``moments_fn(params, clip)``.

  Returns:
    A copy of ``params`` whose norm layers normalize with the merged
    statistics of every sub-batch of every frame of ``clips``
    (``merge_moments``) instead of their input's.

  Raises:
    ValueError: if ``clips`` is empty.
  """
  run = moments_fn or (lambda p, c: jitted_clip_moments(spec, p, c))
  gathered = None
  for clip in clips:
    out = [(np.asarray(m), np.asarray(v)) for m, v in run(params, clip)]
    gathered = out if gathered is None else [
        (np.concatenate([a, m]), np.concatenate([b, v]))
        for (a, b), (m, v) in zip(gathered, out)]
  if gathered is None:
    raise ValueError('population_statistics needs at least one clip')
  # On the host, in numpy: nothing to compile between training steps.
  merged = iter([merge_moments(m, v) for m, v in gathered])
  new_blocks = []
  for l in range(spec.num_stages):
    blk = nnx.merge(spec.block_defs[l], params['blocks'][l])
    for layer in _norm_layers(blk):
      mean, var = next(merged)
      # New values, not in-place writes: host copies of jax arrays are
      # read-only.
      layer.mean.set_value(np.asarray(mean, np.float32))
      layer.var.set_value(np.asarray(var, np.float32))
      layer.ready.set_value(np.ones((), np.float32))
    new_blocks.append(nnx.to_pure_dict(nnx.state(blk, (nnx.Param,
                                                       nnx.BatchStat))))
  return {**params, 'blocks': new_blocks}
