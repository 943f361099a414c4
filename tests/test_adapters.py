"""flax.linen modules as stages: same numbers as linen, trains, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from skipside import adapters, engine, network, stages, tick


class LinenBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(self.features, (3, 3), strides=2)(x))


class LinenBN(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.BatchNorm(use_running_average=False)(x)


def test_adapter_matches_linen_apply():
  module = LinenBlock(8)
  stage = adapters.from_linen(module, (16, 16, 3), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = nnx.to_pure_dict(nnx.state(stage, nnx.Param))['params']
  np.testing.assert_allclose(stage(x), module.apply({'params': params}, x),
                             rtol=1e-6)


def _nets():
  """The adapter net and its native twin with equal weights: the linen
  block is ``stages.Conv(1, 8, stride=2)`` (3x3 SAME conv + bias + ReLU)."""
  def build(first):
    rngs = nnx.Rngs(0)
    return network.split(network.Network(
        [first(rngs), stages.Conv(8, 8, rngs=rngs),
         stages.Conv(8, 8, rngs=rngs)],
        stages.ClassifierHead(8, 3, rngs=rngs), frame_shape=(16, 16, 1),
        skips=[(0, 2)], rngs=rngs))
  spec, params = build(
      lambda rngs: adapters.from_linen(LinenBlock(8), (16, 16, 1), rngs=rngs))
  native_spec, native = build(lambda rngs: stages.Conv(1, 8, stride=2,
                                                       rngs=rngs))
  # Weights unlike linen's init (a non-zero bias too), so an adapter that
  # ignored its params, or lost a leaf, would not match.
  k1, k2 = jax.random.split(jax.random.key(3))
  conv = {'kernel': 0.5 * jax.random.normal(k1, (3, 3, 1, 8)),
          'bias': 0.1 * jax.random.normal(k2, (8,))}
  rest = params['blocks'][1:]
  params = {**params, 'blocks': [{'stage': {'params': {'Conv_0': conv}}},
                                 *rest]}
  native = {**params, 'blocks': [{'stage': {'conv': conv}}, *rest]}
  return spec, params, native_spec, native


def _close(a, b, rtol=1e-5, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol,
                                                       atol=atol), a, b)


@pytest.mark.parametrize('mode', engine.MODES)
def test_linen_stage_trains_in_every_mode(mode):
  """Equal weights, equal gradients: the adapter net against its native twin
  in every mode (for pipelined_bp and sideways the engine's own oracles,
  tests/test_engine.py, vouch for the native net)."""
  spec, params, native_spec, native = _nets()
  clip = jax.random.normal(jax.random.key(2), (2, 6, 16, 16, 1))
  labels = jnp.array([0, 2])
  loss, grads, out = engine.loss_and_grads(spec, params, clip, labels,
                                           mode=mode)
  ref_loss, ref, ref_out = engine.loss_and_grads(native_spec, native, clip,
                                                 labels, mode=mode)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(out.predictions, ref_out.predictions, rtol=1e-5,
                             atol=1e-6)
  g = grads['blocks'][0]['stage']['params']['Conv_0']
  assert float(jnp.abs(g['kernel']).max()) > 1e-4  # Something to compare.
  _close(g, ref['blocks'][0]['stage']['conv'])
  _close(grads['blocks'][1:], ref['blocks'][1:])
  _close(grads['head'], ref['head'])

  if mode == 'bp':  # Against a per-frame reference that calls linen directly.
    def reference(linen_params):
      losses = []
      for t in range(clip.shape[1]):
        y0 = LinenBlock(8).apply({'params': linen_params}, clip[:, t])
        y1, _ = spec.apply_block(1, params['blocks'][1], (y0,), ())
        y2, _ = spec.apply_block(2, params['blocks'][2], (y1, y0), ())
        pred = spec.apply_head(params['head'], y2)
        losses.append(tick.per_example_loss('xent', pred, labels).mean())
      return sum(losses) / len(losses)
    _close(grads['blocks'][0]['stage']['params'],
           jax.grad(reference)(params['blocks'][0]['stage']['params']))


def test_linen_state_collections_are_rejected_by_name():
  with pytest.raises(ValueError, match=r"linen module LinenBN has variables in "
                     r"collections \['batch_stats'\]"):
    adapters.from_linen(LinenBN(), (4, 4, 2), rngs=nnx.Rngs(0))


def test_linen_init_failure_names_module_and_shape():
  class NeedsRank4(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3, 3))(x.reshape(x.shape[0], 3, 3, -1, 7))
  with pytest.raises(ValueError, match=r'linen module NeedsRank4 failed to '
                     r'initialise on input of shape \(1, 5\)'):
    adapters.from_linen(NeedsRank4(), (5,), rngs=nnx.Rngs(0))


def test_worked_custom_stage_example_trains():
  from experiments.examples import custom_stage
  losses = custom_stage.main(steps=15)
  first = custom_stage.main(steps=1)
  for mode in engine.MODES:
    assert losses[mode] < first[mode], (mode, losses, first)
