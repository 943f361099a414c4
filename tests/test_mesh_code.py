"""What each device's program holds: equal stage branches compiled once.

An SPMD program holds every branch of the per-device ``lax.switch``; on a
homogeneous net (one stage per device) the middle stages' branches are the
same computation and ``mesh._switch`` keeps one of them. The results are
the single-device engine's (the switch only picks the same code by table).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from skipside import engine, mesh, network, stages


def _homogeneous(num_stages=8, features=4, side=6):
  rngs = nnx.Rngs(0)
  net = network.Network(
      [stages.Conv(features, features, rngs=rngs) for _ in range(num_stages)],
      stages.ClassifierHead(features, 3, rngs=rngs),
      frame_shape=(side, side, features), rngs=rngs)
  return network.split(net)


def _conds(jaxpr) -> list:
  """Every ``cond`` of a jaxpr and of the jaxprs inside it."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'cond':
      found.append(eqn)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          found += _conds(inner)
  return found


@pytest.mark.parametrize('mode', ['sideways', 'pipelined_bp'])
def test_equal_stage_branches_are_traced_once(mode):
  spec, params = _homogeneous()
  m = mesh.make_mesh(1, 8)
  mspec = mesh.place(spec, m, groups=tuple((i,) for i in range(8)),
                     pad_value=float('nan'))
  clip = jax.random.normal(jax.random.key(0), (2, 10, *spec.frame_shape))
  labels = jnp.array([0, 2])

  def run(p, c, l):
    return mesh.loss_and_grads(mspec, p, c, l, mode=mode)
  jaxpr = jax.make_jaxpr(run)(params, clip, labels).jaxpr
  widest = max(len(e.params['branches']) for e in _conds(jaxpr))
  # Bottom (reads the frame), middle (6 equal stages), top (head and loss).
  assert widest == 3, widest
  loss, grads, _ = run(params, clip, labels)
  want_loss, want, _ = engine.loss_and_grads(spec, params, clip, labels,
                                             mode=mode)
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6), grads, want)


def test_unequal_branches_are_all_kept():
  """Stages of different widths: no two branches are equal."""
  rngs = nnx.Rngs(0)
  net = network.Network(
      [stages.Conv(4, 4, rngs=rngs), stages.Conv(4, 6, rngs=rngs),
       stages.Conv(6, 8, rngs=rngs), stages.Conv(8, 5, rngs=rngs)],
      stages.ClassifierHead(5, 3, rngs=rngs), frame_shape=(6, 6, 4),
      rngs=rngs)
  spec, params = network.split(net)
  mspec = mesh.place(spec, mesh.make_mesh(1, 4),
                     groups=tuple((i,) for i in range(4)))
  clip = jnp.ones((2, 6, *spec.frame_shape))
  jaxpr = jax.make_jaxpr(lambda p: mesh.loss_and_grads(
      mspec, p, clip, jnp.array([0, 1]), mode='sideways'))(params).jaxpr
  assert max(len(e.params['branches']) for e in _conds(jaxpr)) == 4


def _scaled_grad(scale):
  """Identity whose gradient is ``scale`` times the cotangent: a backward
  rule the forward's jaxpr text does not show."""
  @jax.custom_vjp
  def f(x):
    return x

  def fwd(x):
    return x, None

  def bwd(_, g):
    return (scale * g,)
  f.defvjp(fwd, bwd)
  return f


def test_branches_equal_in_text_but_not_in_their_rules_stay_apart():
  """Two branches print the same jaxpr but their custom_vjp rules differ
  (one doubles the gradient): merging them would be wrong."""
  branches = [_scaled_grad(1.0), _scaled_grad(2.0)]

  def f(x, i):
    return mesh._switch(i, branches, x)  # pylint: disable=protected-access
  assert float(jax.grad(f)(1.0, 0)) == 1.0
  assert float(jax.grad(f)(1.0, 1)) == 2.0
