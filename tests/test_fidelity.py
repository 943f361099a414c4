"""Gradient fidelity (skipside/fidelity.py) against what the tick model says."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skipside import engine, fidelity, mesh, models, network


def _net(skips=()):
  return network.split(models.default_net(
      (16, 16, 1), 3, widths=(4, 8, 8, 8, 8), skips=skips, rngs=nnx.Rngs(0)))


def test_cosine_is_one_on_a_constant_video_and_below_on_moving_video():
  """Oracle 2: on a constant video every Sideways tick gradient of a chain
  is the exact one's (the last d_l in flight only shorten it), so the
  cosine is 1 at every stage; moving video bends the lower stages'."""
  spec, params = _net()
  eng = engine.LocalEngine(spec)
  frame = jax.random.normal(jax.random.key(0), (2, 1, 16, 16, 1))
  labels = jnp.array([0, 2])
  still = jnp.repeat(frame, 12, axis=1)
  cos = np.asarray(fidelity.stage_cosines(eng, params, still, labels))
  np.testing.assert_allclose(cos, 1.0, atol=1e-5)
  moving = jax.random.normal(jax.random.key(1), (2, 12, 16, 16, 1))
  cos = np.asarray(fidelity.stage_cosines(eng, params, moving, labels))
  assert abs(cos[-1] - 1) < 1e-5  # The top stage's gradient is exact.
  assert cos[0] < 0.99, cos
  assert fidelity.staleness_ticks(spec) == (8, 6, 4, 2, 0)


def test_mesh_engine_gives_the_same_cosines():
  spec, params = _net(skips=((0, 3), (1, 4)))
  m = mesh.make_mesh(2, 4)
  eng = mesh.MeshEngine(mesh.place(spec, m, params=params))
  clip = jax.random.normal(jax.random.key(2), (4, 8, 16, 16, 1))
  labels = jnp.array([0, 1, 2, 0])
  want = fidelity.stage_cosines(engine.LocalEngine(spec), params, clip,
                                labels)
  got = fidelity.stage_cosines(eng, eng.to_state(params), clip, labels)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
