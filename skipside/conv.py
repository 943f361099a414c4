"""A channels-last convolution whose gradients stay fast inside ``lax.scan``.

The engines run every stage inside the tick ``lax.scan``. On XLA:CPU a
convolution's gradients inside a loop body keep the transposed dimension
labels JAX's transpose rule gives them (``f01b_i01o->01bf`` for the kernel),
which XLA:CPU runs with a naive loop emitter, far slower than the same
gradient outside a loop, where XLA rewrites it into the canonical form
(jax-ml/jax#12868, open). ``python -m experiments.benchmarks.conv`` measures
it on a 2-core CPU: the gradient of a 3x3, 32 -> 32 convolution on 16x32x32
inputs over 8 scan steps takes 3.2 s with ``lax`` and 0.08 s with this one.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated``
(``nnx.Conv(..., conv_general_dilated=conv.conv_general_dilated)``) with a
custom VJP that writes both gradients as canonical channels-last convolutions
with explicit transposes, which XLA:CPU runs on its fast path (on an H100
the two are the same speed). Cases it
does not cover (grouped or input-dilated convolutions, other layouts) fall back
to ``lax.conv_general_dilated`` unchanged.

Example::

  conv = nnx.Conv(3, 8, (3, 3), conv_general_dilated=conv_general_dilated,
                  rngs=nnx.Rngs(0))
"""

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp


def _channels_last(nd: int) -> lax.ConvDimensionNumbers:
  """(N, *spatial, C) inputs and outputs, (*spatial, I, O) kernels."""
  lhs = (0, nd + 1) + tuple(range(1, nd + 1))
  rhs = (nd + 1, nd) + tuple(range(nd))
  return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _is_channels_last(dimension_numbers, nd: int) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(map(tuple, dimension_numbers)) == tuple(
        map(tuple, _channels_last(nd)))
  return False


def varying_axes(x) -> frozenset:
  """The manual mesh axes ``x`` varies over inside ``shard_map`` (else {})."""
  aval = jax.typeof(x)
  vma = getattr(aval, 'vma', None)  # jax >= 0.11
  if vma is None:
    vma = getattr(getattr(aval, 'mat', None), 'varying', None)
  return frozenset(vma or ())


def _same_variance(x, w):
  """Inside ``shard_map``, marks ``x`` and ``w`` varying over the same axes.

  A custom VJP must return gradients of its inputs' exact types; lax's own
  conv would vary an invariant input implicitly. Doing it here, outside the
  custom VJP, lets JAX transpose that cast (a ``psum``) itself.
  """
  both = varying_axes(x) | varying_axes(w)
  def cast(a):
    missing = tuple(sorted(both - varying_axes(a)))
    return lax.pcast(a, missing, to='varying') if missing else a
  return cast(x), cast(w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, dilation, precision):
  return lax.conv_general_dilated(
      x, w, strides, pads, rhs_dilation=dilation,
      dimension_numbers=_channels_last(x.ndim - 2), precision=precision)


def _conv_fwd(x, w, strides, pads, dilation, precision):
  return _conv(x, w, strides, pads, dilation, precision), (x, w)


# ``_conv_bwd`` depends only on the static arguments, which the forward's
# jaxpr prints too, and on the residuals: ``mesh._switch`` may merge branches
# whose jaxprs hold it (``RULES_DECIDED_BY_TEXT``).
def _conv_bwd(strides, pads, dilation, precision, res, dy):
  """Both gradients as canonical channels-last convolutions.

  Shapes: ``x (B, *S, I)``, ``w (*K, I, O)``, ``dy (B, *So, O)``.
  """
  x, w = res
  nd = x.ndim - 2
  dn = _channels_last(nd)
  dy = dy.astype(x.dtype)
  spatial, out_spatial, kernel = x.shape[1:-1], dy.shape[1:-1], w.shape[:nd]
  # dx: the transposed convolution, with the kernel flipped and I <-> O.
  k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
  dx_pads = []
  for n, o, k, s, (lo, _) in zip(spatial, out_spatial, k_eff, strides, pads):
    before = k - 1 - lo
    dx_pads.append((before, n + k - 1 - ((o - 1) * s + 1) - before))
  w_t = jnp.swapaxes(jnp.flip(w, tuple(range(nd))), -1, -2)
  dx = lax.conv_general_dilated(
      dy, w_t, (1,) * nd, dx_pads, lhs_dilation=strides,
      rhs_dilation=dilation, dimension_numbers=dn, precision=precision)
  # dw[k, i, o] = sum_b sum_p x_pad[b, p * s + k * d, i] dy[b, p, o]: a
  # convolution with I as the batch, B as the feature, dy as the kernel.
  x_t = jnp.moveaxis(jnp.moveaxis(x, -1, 0), 1, -1)  # (I, *S, B)
  dy_t = jnp.moveaxis(dy, 0, -2)  # (*So, B, O)
  dw = lax.conv_general_dilated(
      x_t, dy_t, dilation, pads, rhs_dilation=strides, dimension_numbers=dn,
      precision=precision)  # (I, >=K..., O)
  dw = dw[(slice(None),) + tuple(slice(0, k) for k in kernel)]
  dw = jnp.moveaxis(dw, 0, -2)  # (*K, I, O)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None, **kwargs):
  """``lax.conv_general_dilated`` with scan-friendly gradients (see module)."""
  nd = lhs.ndim - 2
  plain = (feature_group_count == 1 and batch_group_count == 1 and
           (lhs_dilation is None or all(d == 1 for d in lhs_dilation)) and
           _is_channels_last(dimension_numbers, nd) and
           preferred_element_type is None and not kwargs.get('out_sharding'))
  if not plain:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
  dilation = tuple(rhs_dilation or (1,) * nd)
  if isinstance(padding, str):
    k_eff = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:nd], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:-1], k_eff, window_strides,
                                  padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  lhs, rhs = _same_variance(lhs, rhs)
  return _conv(lhs, rhs, tuple(window_strides), pads, dilation, precision)


# Backward rules whose result a jaxpr's text decides (``mesh._switch``).
RULES_DECIDED_BY_TEXT = (_conv_bwd,)
