"""Evaluation: clip-level metrics over an eval split on any engine.

``evaluate`` runs one pass (``eval_step`` on an engine's state, or any
``forward``), ``eval_params`` sets sub-batch-norm statistics first,
``evaluate_workdir`` evaluates a run's latest checkpoint
(``python -m launch.eval``).

Example::

    metrics = evaluation.evaluate_workdir('/tmp/run')
"""

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from skipside import batchnorm, engine, network, streaming
from skipside import checkpoints
from skipside import config as config_lib
from skipside import data as data_lib
from skipside import metrics as metrics_lib

PyTree = Any


def host(x) -> np.ndarray:
  """A (possibly multi-process) array as a host array on every process."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def targets_of(batch: dict, spec: network.NetworkSpec) -> np.ndarray:
  return batch['target'] if spec.loss == 'mse' else batch['label']


@functools.partial(jax.jit, static_argnames=('eng', 'mode', 'compute_dtype'))
def eval_step(eng, params, clip, targets, *, mode, compute_dtype):
  """The loop's evaluation forward on any engine (params in its layout)."""
  out = eng.forward(params, clip, targets, mode=mode,
                    compute_dtype=compute_dtype)
  return out._replace(carry=None)


def forward_for(config: ml_collections.ConfigDict, eng):
  """``forward(params, clip, targets) -> ClipOutput``: the evaluation forward
  of ``config`` on engine ``eng`` (params in its layout): ``eval_step``, or
  with ``config.train.chunk_frames`` ``streaming.ChunkedForward`` (host
  ``clip`` and ``targets``, sent in chunks). The loop and
  ``evaluate_workdir`` both take it from here."""
  compute_dtype = config_lib.PRECISIONS[config.precision]
  if streaming.is_chunked(config):
    return streaming.ChunkedForward(
        eng, config.mode, config.train.chunk_frames,
        compute_dtype=compute_dtype, global_size=config.data.batch_size)
  return functools.partial(eval_step, eng, mode=config.mode,
                           compute_dtype=compute_dtype)


def eval_feed(eng, batches, batch_size: int, forward, *,
              host_batches: bool = False):
  """``(batches, forward)`` for ``evaluate`` on engine ``eng`` (params in its
  state layout): every array of a batch as the engine takes it
  (``eng.put_batch``: global arrays on a mesh), and ``forward(params, clip,
  targets)`` (``forward_for``'s, or multigrid's compiled ahead of time;
  ``streaming.ChunkedForward`` takes host clips: ``host_batches``) with its
  outputs as host arrays."""
  def feed():  # With host_batches the clip stays on the host (the
    # forward sends it in chunks); targets, labels and mask are scored as
    # global arrays either way, like the forward's outputs.
    for batch in batches:
      yield {k: np.asarray(v) if host_batches and k == 'video' else
             eng.put_batch(np.asarray(v), batch_size)
             for k, v in batch.items()
             if k in ('video', 'target', 'label', 'mask')}

  def on_host(params, clip, targets):
    out = forward(params, clip, targets)
    def maybe_host(x):
      return None if x is None else host(x)
    return out._replace(predictions=maybe_host(out.predictions),
                        example_loss=maybe_host(out.example_loss), metrics={
                            k: host(v) for k, v in out.metrics.items()})
  return feed(), on_host


def eval_params(config: ml_collections.ConfigDict, spec: network.NetworkSpec,
                params: PyTree, data_config, moments_fn=None) -> PyTree:
  """The params evaluation uses: with sub-batch norm stages, their population
  statistics over ``config.eval.norm_batches`` training batches
  (``batchnorm.population_statistics``), else ``params`` unchanged.

  Every process reads the same batches (shard 0 of 1), so all of them set
  the same statistics. The result lives on the host's default device.
  """
  if not batchnorm.has_norms(spec, params):
    return params
  dc = data_config.copy_and_resolve_references()
  dc.shard_index, dc.shard_count = 0, 1
  it = data_lib.make_iterator(dc, train=True)
  try:
    clips = (next(it)['video'] for _ in range(config.eval.norm_batches))
    return batchnorm.population_statistics(
        spec, jax.tree.map(host, params), clips, moments_fn=moments_fn)
  finally:
    it.close()


def evaluate(spec: network.NetworkSpec, params: PyTree, batches, *, mode: str,
             compute_dtype=jnp.float32, max_batches: int | None = None,
             forward=None) -> dict:
  """Clip-level metrics over an eval iterator (one pass).

  ``forward(params, clip, targets) -> ClipOutput`` replaces
  ``engine.forward`` (e.g. ``eval_step`` on an engine, or an executable of
  it compiled ahead of time).

  Classification: top-1 accuracy of the logits averaged over the valid ticks
  of each clip (and mAP for multi-hot labels); next-frame: MSE. Padded and
  unreadable clips (``mask`` False) are left out.
  """
  loss_sum, n, correct, scores, labels = 0.0, 0, 0.0, [], []
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    mask = host(batch.get('mask', np.ones(len(batch['video']), bool)))
    if forward is None:
      out, _ = engine.forward(spec, params, batch['video'],
                              targets_of(batch, spec), mode=mode,
                              compute_dtype=compute_dtype)
    else:
      out = forward(params, batch['video'], targets_of(batch, spec))
    k = int(mask.sum())
    if out.example_loss is not None:  # Padded clips left out.
      loss_sum += float(np.asarray(out.example_loss)[mask].sum())
    else:  # A batch mean: exact without padding.
      loss_sum += float(out.metrics['loss']) * k
    n += k
    if out.predictions is not None:
      pred = np.asarray(out.predictions)[mask]
      label = host(batch['label'])[mask]
      if spec.loss == 'xent':
        correct += float((pred.argmax(-1) == label).sum())
      else:
        scores.append(pred)
        labels.append(label)
  metrics = {'eval/loss': loss_sum / max(n, 1), 'eval/clips': n}
  if spec.loss == 'xent':
    metrics['eval/accuracy'] = correct / max(n, 1)
  elif spec.loss == 'sigmoid_xent' and scores:
    metrics['eval/mAP'] = metrics_lib.mean_average_precision(
        np.concatenate(scores), np.concatenate(labels))
  else:
    metrics['eval/next_frame_mse'] = metrics['eval/loss']
  return metrics


def abstract_carry(config, spec, params, info):
  """Shapes of the stream carry of a global training batch."""
  b, t = config.data.batch_size, config.data.num_frames
  frame = tuple(info.element_shape[1:])
  clip = jax.ShapeDtypeStruct((b, t, *frame), jnp.float32)
  targets = (jax.ShapeDtypeStruct((b, t, *frame), jnp.float32)
             if spec.loss == 'mse' else jax.ShapeDtypeStruct((b,), jnp.int32))
  return jax.eval_shape(lambda: engine.init_carry(
      spec, params, clip, targets, config.mode,
      config_lib.PRECISIONS[config.precision]))


def evaluate_workdir(workdir: str,
                     config: ml_collections.ConfigDict | None = None) -> dict:
  """Evaluates the latest checkpoint of ``workdir`` on the eval split.

  ``config`` defaults to the run's own ``workdir/config.json``.
  """
  if config is None:
    with open(os.path.join(workdir, 'config.json')) as f:
      config = ml_collections.ConfigDict(json.load(f))
  config_lib.validate_config(config)
  data_config = config_lib.data_config(config)
  it = data_lib.make_eval_iterator(data_config)
  try:
    spec, _, state = checkpoints.init_state(config, it.info)
    if config.train.stream:  # The checkpoint holds a carry: restore into one.
      state.carry = abstract_carry(config, spec, state.params, it.info)
    ckpt = checkpoints.Checkpointer(workdir, config.train.keep_checkpoints)
    # Restoring into this process's own structure (not the saved one) lets a
    # checkpoint written on other devices or processes load here.
    restored = ckpt.restore(state)
    ckpt.close()
    if restored is None:
      raise FileNotFoundError(
          f'no readable checkpoint in {workdir}/checkpoints')
    state = restored[0]
    params = eval_params(config, spec, state.params, data_config)
    # As the run evaluated (in chunks with train.chunk_frames).
    metrics = evaluate(spec, params, it, mode=config.mode,
                       compute_dtype=config_lib.PRECISIONS[config.precision],
                       max_batches=config.eval.max_batches or None,
                       forward=forward_for(config, engine.LocalEngine(spec)))
  finally:
    it.close()
  return {'step': state.step, **metrics}
