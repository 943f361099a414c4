"""The optimizer: optax from ``config.optimizer``, the learning rate per
training step.

A training step (one batch of the loop) may make several optax updates --
the online mode (``train.update_every=k``: ``T/k`` per clip) and PGT's
``step_per='fragment'`` (one per fragment) -- or fewer (a window whose ticks
are all fill makes none: ``engine.apply_gradients``). Schedules (warm-up,
cosine, step decay, multigrid phases) are sized in training steps, so the
rate is read from a counter of training steps kept in the optimizer state
(``TrainingStepState``) and advanced once per training step by the train
steps themselves (``engine.train_step``, ``mesh.train_step``,
``progressive.train_step`` call ``advance``), not from optax's update count.
Adam's bias correction still counts the updates it made.

Example::

    optimizer = optim.make_optimizer(config)
    opt_state = optimizer.init(params)
    params, opt_state, out = engine.train_step(spec, optimizer, params,
                                               opt_state, clip, labels,
                                               mode='sideways')
    optim.learning_rate(opt_state)  # the rate this step used
    # A hand-written loop of optimizer.update calls advances it itself:
    opt_state = optim.advance(opt_state)
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]
NAMES = ('adam', 'adamw', 'sgd', 'momentum')
SCHEDULES = ('constant', 'cosine', 'step')


class TrainingStepState(NamedTuple):
  """Attributes: ``training_step`` int32, training steps done (the
  schedule's argument); ``learning_rate`` float32, the rate of the last
  update."""
  training_step: jax.Array
  learning_rate: jax.Array


def scale_by_training_step_schedule(schedule: Schedule
                                    ) -> optax.GradientTransformation:
  """``-schedule(training_step) * updates``, the step advanced by
  ``advance`` only (optax's ``scale_by_learning_rate`` counts updates)."""

  def init(params):
    del params
    return TrainingStepState(jnp.zeros((), jnp.int32),
                             jnp.asarray(schedule(0), jnp.float32))

  def update(updates, state, params=None):
    del params
    lr = jnp.asarray(schedule(state.training_step), jnp.float32)
    updates = jax.tree.map(lambda u: -lr.astype(u.dtype) * u, updates)
    return updates, state._replace(learning_rate=lr)
  return optax.GradientTransformation(init, update)


class TrainableState(NamedTuple):
  """Attributes: ``mask``, the params' structure, 1 where a leaf trains."""
  mask: PyTree


def only_trainable(trainable: Callable[[PyTree], PyTree]
                   ) -> optax.GradientTransformation:
  """Zeroes the updates of leaves ``trainable(params)`` marks ``False``.

  Last in the chain, so weight decay does not reach them either. The mask is
  a float array in the optimizer state with the params' shapes, not an optax
  mask over the pytree, so that it follows the params into any layout
  (``mesh.shard_tree`` packs it like the params; a NaN-padded slot reads as
  not trainable).
  """
  def init(params):
    return TrainableState(jax.tree.map(
        lambda t, p: jnp.full(p.shape, t, jnp.float32), trainable(params),
        params))

  def update(updates, state, params=None):
    del params
    return _masked(updates, state.mask), state
  return optax.GradientTransformation(init, update)


def _masked(updates: PyTree, mask: PyTree) -> PyTree:
  """``updates`` with 0 where ``mask`` is not ``> 0`` (NaN padding too)."""
  return jax.tree.map(lambda u, m: jnp.where(m > 0, u, 0).astype(u.dtype),
                      updates, mask)


def _states(opt_state: PyTree, kind: type) -> list:
  """Every state of type ``kind`` in ``opt_state``, in chain order."""
  def is_kind(x):
    return isinstance(x, kind)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_kind)
          if is_kind(s)]


def trainable_gradients(opt_state: PyTree, grads: PyTree) -> PyTree:
  """``grads`` with 0 on the leaves an ``only_trainable`` in ``opt_state``
  marks as not training (frozen stages, batch statistics); ``grads`` as
  they are for an optimizer without one."""
  found = _states(opt_state, TrainableState)
  return _masked(grads, found[-1].mask) if found else grads


def _is_step_state(x) -> bool:
  return isinstance(x, TrainingStepState)


def _step_states(opt_state: PyTree) -> list[TrainingStepState]:
  return _states(opt_state, TrainingStepState)


def _with_training_step(opt_state: PyTree, step_of) -> PyTree:
  """Every ``TrainingStepState`` with ``training_step = step_of(state)``."""
  return jax.tree.map(
      lambda s: (s._replace(training_step=step_of(s)) if _is_step_state(s)
                 else s), opt_state, is_leaf=_is_step_state)


def advance(opt_state: PyTree) -> PyTree:
  """``opt_state`` one training step later (every ``TrainingStepState``)."""
  return _with_training_step(opt_state, lambda s: s.training_step + 1)


def learning_rate(opt_state: PyTree) -> jax.Array | None:
  """The rate the last update used (``None`` for an optimizer without a
  ``TrainingStepState``: a user's own optax)."""
  found = _step_states(opt_state)
  return found[0].learning_rate if found else None


def finish_step(old: tuple, new: tuple, loss: jax.Array, *,
                skip_nonfinite: bool) -> tuple:
  """The loop's ``(params, opt_state)`` after a training step (which
  advanced the schedule): ``new``, or with ``skip_nonfinite`` and a
  non-finite loss ``old`` with ``new``'s training step (the schedule
  follows the loop, skipped steps included)."""
  if not skip_nonfinite:
    return new
  ok = jnp.isfinite(loss)
  params, opt_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  steps = iter(s.training_step for s in _step_states(new[1]))
  return params, _with_training_step(opt_state, lambda s: next(steps))


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           multigrid_schedule=None) -> Schedule:
  """``training step -> learning rate`` from ``config.optimizer``.

  ``cosine``: linear warm-up from ``warmup_start_lr`` over ``warmup_steps``
  (at most half the run, so short runs still decay), then cosine to 0 at
  ``train.num_steps``; ``step``: the same warm-up, then x0.1 at each of
  ``step_boundaries`` (fractions of the run; SlowFast's steps policy);
  ``constant``: no warm-up. A multigrid schedule
  (``multigrid.Schedule``) replaces them with its phases' multipliers after
  the same warm-up (SlowFast's ``get_lr_at_epoch``, in steps).
  """
  c = config.optimizer
  steps = config.train.num_steps
  if multigrid_schedule is not None:  # The reference's warm-up, then phases.
    return multigrid_schedule.lr_schedule(
        c.learning_rate, warmup_steps=min(c.warmup_steps,
                                          multigrid_schedule.num_steps // 2),
        warmup_start_lr=c.get('warmup_start_lr', 0.0))
  if c.schedule == 'cosine':
    warmup = min(c.warmup_steps, steps // 2)
    return optax.warmup_cosine_decay_schedule(
        c.get('warmup_start_lr', 0.0), c.learning_rate, warmup,
        max(steps, warmup + 1))
  if c.schedule == 'step':
    warmup = min(c.warmup_steps, steps // 2)
    bounds = {}  # After the warm-up: join_schedules restarts the count.
    for b in c.step_boundaries:
      at = max(0, int(b * steps) - warmup)
      bounds[at] = bounds.get(at, 1.0) * 0.1
    return optax.join_schedules(
        [optax.linear_schedule(c.get('warmup_start_lr', 0.0), c.learning_rate,
                               warmup),
         optax.piecewise_constant_schedule(c.learning_rate, bounds)],
        [warmup])
  return optax.constant_schedule(c.learning_rate)


def make_optimizer(config: ml_collections.ConfigDict,
                   multigrid_schedule=None,
                   trainable: Callable[[PyTree], PyTree] | None = None
                   ) -> optax.GradientTransformation:
  """optax from ``config.optimizer``: clipping, the update rule, decay and
  the per-training-step rate (``learning_rate_schedule``).

  The update rules are optax's own parts, chained as ``optax.adam`` /
  ``adamw`` / ``sgd`` chain them, with the rate last:
  ``adam``, ``adamw`` (decoupled decay ``weight_decay``), ``sgd`` and
  ``momentum`` (0.9; ``weight_decay`` added to the gradient first, as
  PyTorch's SGD and the SlowFast configs do). ``trainable(params)`` (e.g.
  ``lambda p: network.trainable_mask(spec, p)``) marks the leaves that
  train; the others (batch statistics, frozen stages) are never updated nor
  decayed (``only_trainable``), and their gradients are zeroed before the
  chain (no part in clipping's norm; Adam moments stay zero).
  """
  c = config.optimizer
  parts = []
  if c.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
  if c.name in ('adam', 'adamw'):
    parts.append(optax.scale_by_adam())
    if c.name == 'adamw':
      parts.append(optax.add_decayed_weights(c.weight_decay))
  else:
    if c.weight_decay:
      parts.append(optax.add_decayed_weights(c.weight_decay))
    if c.name == 'momentum':
      parts.append(optax.trace(decay=0.9))
  parts.append(scale_by_training_step_schedule(
      learning_rate_schedule(config, multigrid_schedule)))
  if trainable is None:
    return optax.chain(*parts)
  return _gradients_of_trainable(optax.chain(*parts, only_trainable(
      trainable)))


def _gradients_of_trainable(chain: optax.GradientTransformation
                            ) -> optax.GradientTransformation:
  """``chain`` (ending in ``only_trainable``) fed only the trainable leaves'
  gradients: frozen stages (``optimizer.frozen_stages``) count in neither
  gradient clipping's global norm nor Adam's moments, as if they had no
  gradient. The mask is read from ``chain``'s own last state (not kept in
  a second state): the state is ``chain``'s, so checkpoints of nets with
  batch statistics made before frozen stages existed still restore, and
  the mask follows the params into any layout."""
  def update(updates, state, params=None):
    return chain.update(_masked(updates, state[-1].mask), state, params)
  return optax.GradientTransformation(chain.init, update)
