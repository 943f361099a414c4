"""Sub-batch normalization math: statistics over a fixed number of clips.

Multigrid changes the batch a device sees by up to 32x; batch norm over the
whole batch would change its statistics with it. The reference (SlowFast's
``SubBatchNorm3d``) takes them over sub-batches of a fixed base size and
merges the sub-batches' statistics for evaluation (DESIGN.md §3). Here the
pure functions: ``stages.SubBatchNorm`` trains with them and
``skipside.batchnorm`` merges them into evaluation statistics.

- ``sub_batch_moments`` / ``sub_batch_norm``: the training transform (the
  batch split into interleaved groups of ``base_size`` clips).
- ``merge_moments``: the reference's merge rule, mean of means and mean of
  variances plus variance of means (exact for groups of equal size).

Example::

    y = sub_batch.sub_batch_norm(x, base_size=8)   # x: (B, ..., C)
    means, variances = sub_batch.sub_batch_moments(x, 8)   # each (B//8, C)
    mean, var = sub_batch.merge_moments(means, variances)   # each (C,)
"""

import jax
import jax.numpy as jnp


def sub_batch_moments(x: jax.Array, base_size: int = 8
                      ) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and variance over sub-batches of ``base_size`` clips.

  The batch is split into ``k = B // base_size`` *interleaved* groups
  (group ``j`` holds examples ``j, j + k, j + 2k, ...``, as the reference's
  ``view(B // k, C * k, ...)``), so statistics are always taken over
  ``base_size`` examples whatever the bucket's batch. ``B < base_size``
  gives one group.

  Args:
    x: ``(B, ..., C)``; ``B`` a multiple of ``base_size`` if larger.

  Returns:
    ``(means, variances)``, each ``(k, C)`` (population variance).
  """
  b, c = x.shape[0], x.shape[-1]
  k = num_groups(b, base_size)
  # Statistics in float32 whatever the compute dtype (as flax's BatchNorm).
  groups = x.astype(jnp.float32).reshape(b // k, k, -1, c)  # [i, j]: i*k + j.
  mean = groups.mean(axis=(0, 2))
  var = ((groups - mean[None, :, None]) ** 2).mean(axis=(0, 2))
  return mean, var


def num_groups(batch: int, base_size: int) -> int:
  """``k``: sub-batches of ``base_size`` in ``batch``; errors if uneven."""
  if batch > base_size and batch % base_size:
    raise ValueError(f'batch {batch} does not split into sub-batches of '
                     f'{base_size} clips')
  return max(1, batch // base_size)


def merge_moments(means: jax.Array, variances: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """The reference's merge of sub-batch statistics for evaluation.

  Mean of means, and mean of variances plus variance of means: for groups
  of equal size, exactly the whole batch's mean and (population) variance.
  ``(k, C), (k, C) -> (C,), (C,)``.
  """
  mean = means.mean(axis=0)
  return mean, variances.mean(axis=0) + ((means - mean) ** 2).mean(axis=0)


def normalize(x: jax.Array, means: jax.Array, variances: jax.Array,
              eps: float) -> jax.Array:
  """``x (B, ..., C)`` normalized per interleaved group with ``(k, C)``."""
  b, c = x.shape[0], x.shape[-1]
  k = means.shape[0]
  groups = x.astype(jnp.float32).reshape(b // k, k, -1, c)
  y = (groups - means[None, :, None]) * jax.lax.rsqrt(
      variances + eps)[None, :, None]
  return y.reshape(x.shape).astype(x.dtype)


def sub_batch_norm(x: jax.Array, base_size: int = 8, eps: float = 1e-5
                   ) -> jax.Array:
  """Normalizes ``x (B, ..., C)`` with its own sub-batch statistics (the
  training transform, without scale and bias)."""
  return normalize(x, *sub_batch_moments(x, base_size), eps)
