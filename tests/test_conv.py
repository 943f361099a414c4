"""The scan-friendly convolution equals lax's, values and gradients."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from skipside import conv

CASES = [
    # (input shape, kernel shape, strides, padding, kernel dilation)
    ((2, 9, 10, 3), (3, 3, 3, 4), (1, 1), 'SAME', (1, 1)),
    ((2, 9, 10, 3), (3, 3, 3, 4), (2, 2), 'SAME', (1, 1)),
    ((2, 9, 10, 3), (3, 2, 3, 4), (2, 3), 'VALID', (1, 1)),
    ((2, 9, 10, 3), (3, 3, 3, 4), (1, 2), ((2, 0), (1, 3)), (2, 1)),
    ((2, 9, 3), (4, 3, 5), (3,), 'SAME', (1,)),
    ((2, 5, 9, 8, 3), (3, 3, 3, 3, 4), (1, 2, 2), 'SAME', (1, 1, 1)),
    ((2, 8, 8, 3), (1, 1, 3, 4), (2, 2), 'VALID', (1, 1)),
]


@pytest.mark.parametrize('x_shape,w_shape,strides,padding,dilation', CASES)
def test_values_and_gradients_equal_lax(x_shape, w_shape, strides, padding,
                                        dilation):
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape)
  dn = conv._channels_last(len(x_shape) - 2)  # pylint: disable=protected-access

  def run(fn):
    return lambda x, w: fn(x, w, strides, padding, rhs_dilation=dilation,
                           dimension_numbers=dn, precision='highest')

  ref, new = run(lax.conv_general_dilated), run(conv.conv_general_dilated)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  y_new, vjp_new = jax.vjp(new, x, w)
  np.testing.assert_allclose(y_new, y_ref, rtol=1e-5, atol=1e-4)
  ct = jax.random.normal(kc, y_ref.shape)
  for a, b in zip(vjp_ref(ct), vjp_new(ct)):
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3)


def test_grouped_convolution_falls_back_to_lax():
  x = jnp.ones((2, 6, 6, 4))
  w = jnp.ones((3, 3, 2, 4))
  dn = conv._channels_last(2)  # pylint: disable=protected-access
  y = conv.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dn,
                                feature_group_count=2)
  ref = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dn,
                                 feature_group_count=2)
  np.testing.assert_allclose(y, ref)


def _conv_dim_labels(fn, *args) -> set[str]:
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  return {line.split('dim_labels=')[1].split(',')[0]
          for line in hlo.split('\n') if ' convolution(' in line}


def test_gradients_in_a_scan_are_canonical_convolutions():
  """The cause of the XLA:CPU slowdown is gone: no transposed dim labels."""
  def make(impl):
    kwargs = {} if impl is None else {'conv_general_dilated': impl}
    layer = nnx.Conv(4, 4, (3, 3), padding='SAME', rngs=nnx.Rngs(0), **kwargs)
    graph, params = nnx.split(layer)

    def loss(params, xs):
      def body(total, x):
        return total + jnp.mean(nnx.merge(graph, params)(x) ** 2), None
      return lax.scan(body, 0.0, xs)[0]
    return jax.grad(loss, argnums=(0, 1)), params

  xs = jnp.ones((3, 2, 8, 8, 4))
  grad_lax, params = make(None)
  grad_ours, _ = make(conv.conv_general_dilated)
  assert _conv_dim_labels(grad_lax, params, xs) != {'b01f_01io->b01f'}
  assert _conv_dim_labels(grad_ours, params, xs) == {'b01f_01io->b01f'}
