"""Network construction: edges, combine rules, shape inference, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from skipside import models, network, stages


def _convs(rngs):
  return [stages.Conv(1, 8, stride=2, rngs=rngs),   # (16,16,1) -> (8,8,8)
          stages.Conv(8, 16, stride=2, rngs=rngs),  # -> (4,4,16)
          stages.Conv(16, 16, rngs=rngs),           # -> (4,4,16)
          stages.Conv(16, 16, rngs=rngs)]


def _net(skips=(), combine='sum', layers=None, **kw):
  rngs = nnx.Rngs(0)
  return network.Network(layers or _convs(rngs),
                         stages.ClassifierHead(16, 3, rngs=rngs),
                         frame_shape=(16, 16, 1), skips=skips,
                         combine=combine, rngs=rngs, **kw)


def test_shapes_and_edges_are_inferred():
  net = _net(skips=[(1, 3), (0, 2)], combine='concat')
  spec, params = network.split(net)
  assert spec.in_edges == ((), (0,), (1, 0), (2, 1))
  assert spec.out_edges == ((1, 2), (2, 3), (3,), ())
  assert spec.out_shapes == ((8, 8, 8), (4, 4, 16), (4, 4, 16), (4, 4, 16))
  assert spec.prediction_shape == (3,)
  # Concat + projection: (16 + 8) channels -> 16 for stage 2.
  assert params['blocks'][2]['combine']['proj']['kernel'].shape == (24, 16)


def test_skip_across_downsampling_is_pooled_to_fit():
  """Sum of a (8,8,16)-pooled-to-(4,4,16) skip equals the pool done by hand."""
  rngs = nnx.Rngs(0)
  layers = [stages.Conv(1, 16, stride=2, rngs=rngs),
            stages.Conv(16, 16, stride=2, rngs=rngs),
            stages.Identity()]
  spec, params = network.split(network.Network(
      layers, stages.ClassifierHead(16, 3, rngs=rngs), frame_shape=(16, 16, 1),
      skips=[(0, 2)], rngs=rngs))
  a = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  s = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
  y, _ = spec.apply_block(2, params['blocks'][2], (a, s), ())
  pooled = s.reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4))
  np.testing.assert_allclose(y, a + pooled, rtol=1e-6)


@pytest.mark.parametrize('skips, message', [
    ([(0, 7)], r'skip edge \(0, 7\) points at missing stage 7'),
    ([(-1, 2)], r'points at missing stage -1'),
    ([(3, 1)], r'skip edge \(3, 1\) makes a cycle'),
    ([(2, 2)], r'self-loop'),
    ([(1, 2)], r'duplicates the chain edge 1 -> 2'),
    ([(0, 2), (0, 2)], r'given twice'),
])
def test_bad_edges_are_named(skips, message):
  with pytest.raises(ValueError, match=message):
    _net(skips=skips)


def test_shapes_that_do_not_combine_name_stages_and_shapes():
  # Stage 0 outputs (8,8,8); stage 2 takes (4,4,16): channels differ for sum.
  with pytest.raises(ValueError, match=(
      r"skip edge \(0, 2\): stage 0 \(Conv\) outputs \(8, 8, 8\) but stage 2 "
      r"\(Conv\) takes \(4, 4, 16\).*'sum'")):
    _net(skips=[(0, 2)], combine='sum')
  rngs = nnx.Rngs(0)
  odd = [stages.Conv(1, 8, stride=3, rngs=rngs),    # (6, 6, 8)
         stages.Conv(8, 16, stride=2, rngs=rngs),   # (3, 3, 16)
         stages.Conv(16, 16, stride=2, rngs=rngs),  # (2, 2, 16)
         stages.Conv(16, 16, rngs=rngs)]
  with pytest.raises(ValueError, match=r'skip edge \(1, 3\).*\(3, 3, 16\)'):
    _net(skips=[(1, 3)], combine='concat', layers=odd)


def test_stage_failing_on_its_input_is_named():
  rngs = nnx.Rngs(0)
  layers = [stages.Conv(1, 8, rngs=rngs), stages.Conv(4, 8, rngs=rngs)]
  with pytest.raises(ValueError, match=r'stage 1 \(Conv\) failed on input of '
                     r'shape \(2, 16, 16, 8\)'):
    network.Network(layers, stages.ClassifierHead(8, 3, rngs=rngs),
                    frame_shape=(16, 16, 1), rngs=rngs)


def _temporal_skip_net(frame_shape):
  rngs = nnx.Rngs(0)
  layers = [stages.Conv(1, 8, stride=2, rngs=rngs),
            stages.Conv(8, 16, stride=2, rngs=rngs),
            stages.TemporalConv(16, kernel_size=3, rngs=rngs),
            stages.Conv(16, 16, rngs=rngs)]
  return network.split(network.Network(
      layers, stages.ClassifierHead(16, 3, rngs=rngs), frame_shape=frame_shape,
      skips=[(1, 3), (0, 2)], combine={2: 'concat'}, rngs=rngs))


def test_for_frame_shape_infers_shapes_as_construction_does():
  """One walk: a spec derived for 32x32 frames equals one built at 32x32,
  and a stage failing at the new size is named as at construction."""
  spec, params = _temporal_skip_net((16, 16, 1))
  built, built_params = _temporal_skip_net((32, 32, 1))
  derived = network.for_frame_shape(spec, jax.eval_shape(lambda: params),
                                    (32, 32, 1))
  assert derived.in_shapes == built.in_shapes
  assert derived.out_shapes == built.out_shapes
  assert derived.prediction_shape == built.prediction_shape
  jax.tree.map(np.testing.assert_array_equal, params, built_params)
  rngs = nnx.Rngs(0)
  flat = network.split(network.Network(
      [stages.Conv(1, 8, stride=2, rngs=rngs),
       stages.Mlp(8 * 8 * 8, (16,), rngs=rngs)],
      stages.ClassifierHead(16, 3, rngs=rngs), frame_shape=(16, 16, 1),
      rngs=rngs))
  with pytest.raises(ValueError, match=r'frames of shape \(8, 8, 1\): stage 1 '
                     r'\(Mlp\) failed on input of shape \(2, 4, 4, 8\)'):
    network.for_frame_shape(*flat, (8, 8, 1))


def test_stage_contract_violations_are_named():
  rngs = nnx.Rngs(0)

  class Pair(nnx.Module):
    def __call__(self, x):
      return x, x

  class DropsBatch(nnx.Module):
    def __call__(self, x):
      return x.sum(axis=0)

  class HiddenState(nnx.Module):
    def __init__(self):
      self.count = nnx.Variable(jnp.zeros(()))  # Not Param or BatchStat.

    def __call__(self, x):
      return x

  class Scalar(nnx.Module):
    def __call__(self, x):
      return x.mean(axis=(1, 2, 3))

  head = stages.ClassifierHead(1, 3, rngs=rngs)
  with pytest.raises(ValueError, match=r'stage 0 \(Scalar\) maps '
                     r'\(2, 4, 4, 1\) to rank-1 output \(2,\)'):
    network.Network([Scalar()], head, frame_shape=(4, 4, 1), rngs=rngs)
  with pytest.raises(ValueError, match=r'stage 0 \(Pair\) must return one array'):
    network.Network([Pair()], head, frame_shape=(4, 4, 1), rngs=rngs)
  with pytest.raises(ValueError, match=r'stage 0 \(DropsBatch\) maps '
                     r'\(2, 4, 4, 1\) to \(4, 4, 1\)'):
    network.Network([DropsBatch()], head, frame_shape=(4, 4, 1), rngs=rngs)
  net = network.Network([HiddenState()], head, frame_shape=(4, 4, 1),
                        rngs=rngs)
  with pytest.raises(ValueError, match=r'stage 0 \(HiddenState\) holds '
                     r'non-parameter variables'):
    network.split(net)


def test_unknown_combine_and_loss():
  with pytest.raises(ValueError, match=r"combine rule 'max' for stage 0"):
    _net(combine='max')
  with pytest.raises(ValueError, match=r"loss 'hinge' is unknown"):
    _net(loss='hinge')


def test_temporal_stage_state_is_a_cache_of_past_inputs():
  rngs = nnx.Rngs(0)
  stage = stages.TemporalConv(4, kernel_size=3, rngs=rngs)
  xs = jax.random.normal(jax.random.key(0), (5, 2, 4))
  state = stage.init_state(jax.ShapeDtypeStruct((2, 4), jnp.float32))
  assert state.shape == (2, 2, 4)
  for t in range(5):
    y, state = stage(xs[t], state)
  np.testing.assert_array_equal(state, jnp.stack([xs[3], xs[4]], axis=1))
  # Output at t=4 uses frames 2, 3, 4 (oldest tap first).
  window = jnp.concatenate([xs[2], xs[3], xs[4]], axis=-1)
  np.testing.assert_allclose(y, xs[4] + nnx.relu(stage.taps(window)),
                             rtol=1e-6)


def test_default_net_heads():
  rngs = nnx.Rngs(0)
  spec, _ = network.split(models.default_net((32, 32, 1), 5, rngs=rngs))
  assert spec.prediction_shape == (5,) and spec.loss == 'xent'
  spec, _ = network.split(models.default_net((32, 32, 1), 0, head='next_frame',
                                             rngs=rngs))
  assert spec.prediction_shape == (32, 32, 1) and spec.loss == 'mse'
