"""The optimizer: the learning rate per training step, skipped fill updates,
weight decay, and the loop's logged rate."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import default
from skipside import engine, models, network, optim, stages, train


def _config(**optimizer):
  c = default.get_config()
  c.train.num_steps = 100
  c.optimizer.update(optimizer)
  return c


def _net():
  return network.split(models.mlp_net((6,), 3, width=8, num_stages=3,
                                      rngs=nnx.Rngs(0)))


def _clip(frames):
  k1, k2 = jax.random.split(jax.random.key(0))
  return (jax.random.normal(k1, (2, frames, 6)),
          jax.random.randint(k2, (2,), 0, 3))


def _adam_count(opt_state):
  return int(optax.tree_utils.tree_get(opt_state, 'count'))


def test_online_updates_keep_the_rate_of_their_training_step():
  """update_every=2 makes 4 optax updates per 8-frame clip; the cosine
  schedule still moves once per training step."""
  config = _config(warmup_steps=10)
  optimizer = optim.make_optimizer(config)
  schedule = optim.learning_rate_schedule(config)
  spec, params = _net()
  clip, labels = _clip(8)
  opt_state = optimizer.init(params)
  for step in range(3):
    params, opt_state, _ = engine.train_step(
        spec, optimizer, params, opt_state, clip, labels, mode='sideways',
        update_every=2)
    np.testing.assert_allclose(optim.learning_rate(opt_state),
                               schedule(step), rtol=1e-6)  # The step's own.
  # Fresh clips: the first window of each is fill (depth 2), so 3 of 4
  # windows update; Adam's bias correction counts those.
  assert _adam_count(opt_state) == 3 * 3


def test_fill_windows_make_no_update():
  """A window whose ticks are all fill moves neither Adam's moments nor
  weight decay: params and state equal a run of the valid windows only."""
  config = _config(name='adamw', weight_decay=0.1, schedule='constant')
  optimizer = optim.make_optimizer(config)
  spec, params = _net()
  clip, labels = _clip(4)  # Depth 2: windows [0,1] fill, [2,3] valid.
  opt_state = optimizer.init(params)
  got, got_state, out = engine.train_step(
      spec, optimizer, params, opt_state, clip, labels, mode='sideways',
      update_every=2)
  assert _adam_count(got_state) == 1
  # The same as one update on the valid window after the fill's carry.
  kw = dict(mode='sideways', length=2, mask_fill=True,
            compute_dtype=jnp.float32)
  carry = engine.init_carry(spec, params, clip, labels, 'sideways')
  _, _, fill = engine.window_grads(spec, params, clip, labels, carry,
                                   start=0, **kw)
  _, grads, _ = engine.window_grads(spec, params, clip, labels, fill.carry,
                                    start=2, **kw)
  want, want_state = engine.apply_gradients(optimizer, params, opt_state,
                                            grads)
  want_state = optim.advance(want_state)  # train_step is a training step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                      atol=1e-8),
               (got, got_state), (want, want_state))
  assert int(out.metrics['valid_ticks']) == 2


@pytest.mark.parametrize('name', ['sgd', 'momentum'])
def test_sgd_weight_decay_is_added_to_the_gradient(name):
  config = _config(name=name, weight_decay=0.1, schedule='constant',
                   learning_rate=0.5, grad_clip_norm=0.0)
  optimizer = optim.make_optimizer(config)
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([0.5, 0.5])}
  state = optimizer.init(params)
  updates, _ = optimizer.update(grads, state, params)
  # PyTorch's SGD: p -= lr * (g + wd * p) (the first momentum step is g).
  np.testing.assert_allclose(updates['w'], -0.5 * (grads['w'] + 0.1 *
                                                   params['w']), rtol=1e-6)


def test_loop_logs_the_rate_of_every_training_step(tmp_path):
  """The launcher's tiny run in online mode: train/learning_rate at every
  logged step is the schedule at that step (counted from 0: step s used
  schedule(s - 1))."""
  c = default.get_config('tiny')
  c.data.data_dir = str(tmp_path / 'data')
  c.train.update_every = 2
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.eval_every = 4
  c.train.checkpoint_every = 4
  c.optimizer.warmup_steps = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  schedule = optim.learning_rate_schedule(c)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if 'train/loss' in line]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    np.testing.assert_allclose(r['train/learning_rate'],
                               float(schedule(r['step'] - 1)), rtol=1e-6)
  assert rows[1]['train/learning_rate'] > 0  # Past the warm-up's zero.


@pytest.mark.parametrize('on_mesh', [False, True])
def test_batch_statistics_are_never_updated_nor_decayed(on_mesh):
  """Sub-batch norm's BatchStat leaves ride in params; adamw with weight
  decay must leave them as they are (on the stage-sharded state too)."""
  from skipside import mesh as mesh_lib
  rngs = nnx.Rngs(0)
  net = network.Network(
      [stages.Conv(1, 4, stride=2, norm_base_size=2, rngs=rngs),
       stages.Conv(4, 4, norm_base_size=2, rngs=rngs)],
      stages.ClassifierHead(4, 3, rngs=rngs), frame_shape=(8, 8, 1),
      rngs=rngs)
  spec, params = network.split(net)
  mask = network.trainable_mask(spec, params)
  optimizer = optim.make_optimizer(
      _config(name='adamw', weight_decay=0.5, schedule='constant',
              learning_rate=0.1),
      trainable=lambda p: network.trainable_mask(spec, p))
  clip = jax.random.normal(jax.random.key(0), (4, 4, 8, 8, 1))
  labels = jnp.array([0, 1, 2, 0])
  opt_state = optimizer.init(params)
  if on_mesh:
    mspec = mesh_lib.place(spec, mesh_lib.make_mesh(1, 2), params=params)
    p, o = mesh_lib.shard_tree(mspec, params), mesh_lib.shard_tree(
        mspec, opt_state)
    for _ in range(2):
      p, o, _ = mesh_lib.train_step_sharded(mspec, optimizer, p, o, clip,
                                            labels, mode='sideways')
    new = mesh_lib.unshard_tree(mspec, p)
  else:
    new, o = params, opt_state
    for _ in range(2):
      new, o, _ = engine.train_step(spec, optimizer, new, o, clip, labels,
                                    mode='sideways')
  flat_mask = jax.tree.leaves(mask)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new, params)
  for trains, moved in zip(flat_mask, jax.tree.leaves(changed)):
    assert moved == trains
  assert not all(flat_mask)  # The net has statistics.


@pytest.mark.parametrize('on_mesh', [False, True])
def test_update_with_gradient_only_on_frozen_stages_is_skipped(on_mesh):
  """A window whose only gradient is on frozen stages has nothing to learn,
  like an all-zero one: no Adam step is counted and nothing moves. On the
  stage-sharded state too (NaN padding: the mask must not read it)."""
  from skipside import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  spec, params = _net()
  config = _config(name='adam', schedule='constant', learning_rate=0.1,
                   warmup_steps=0)
  frozen = optim.make_optimizer(config, trainable=lambda p: (
      network.trainable_mask(spec, p, frozen_stages=(0,))))
  grads = jax.tree.map(jnp.zeros_like, params)
  grads['blocks'][0] = jax.tree.map(jnp.ones_like, params['blocks'][0])
  layout = lambda tree: tree
  if on_mesh:
    mspec = mesh_lib.place(spec, mesh_lib.make_mesh(1, 2), params=params,
                           pad_value=float('nan'))
    layout = lambda tree: mesh_lib.shard_tree(mspec, tree)
  state = layout(frozen.init(params))

  def update(grads):
    g = layout(grads)
    if on_mesh:  # Gradients are exactly zero on padding (mesh.py).
      g = jnp.where(jnp.isnan(g), 0.0, g)
    return engine.apply_gradients(frozen, layout(params), state, g,
                                  jnp.int32(4))
  new, new_state = update(grads)
  assert _adam_count(new_state) == 0
  jax.tree.map(np.testing.assert_array_equal, (new, new_state),
               (layout(params), state))
  # A gradient on a stage that trains is a step.
  grads['blocks'][1] = jax.tree.map(jnp.ones_like, params['blocks'][1])
  assert _adam_count(update(grads)[1]) == 1


@pytest.mark.parametrize('on_mesh', [False, True])
def test_frozen_stages_stay_and_leave_clipping_to_the_others(on_mesh):
  """``optimizer.frozen_stages``: a frozen stage keeps its values (adamw's
  decay included) while the others move exactly as if it had no gradient:
  gradient clipping's global norm (active here) does not count it. On the
  stage-sharded state too."""
  from skipside import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  spec, params = _net()
  config = _config(name='adamw', weight_decay=0.5, schedule='constant',
                   learning_rate=0.1, warmup_steps=0, grad_clip_norm=1e-3)
  frozen = optim.make_optimizer(config, trainable=lambda p: (
      network.trainable_mask(spec, p, frozen_stages=(1,))))
  clip, labels = _clip(8)
  if on_mesh:
    # NaN in every padded slot: the zeroing before clipping must hold them.
    mspec = mesh_lib.place(spec, mesh_lib.make_mesh(1, 2), params=params,
                           pad_value=float('nan'))
    p, o, _ = mesh_lib.train_step_sharded(
        mspec, frozen, mesh_lib.shard_tree(mspec, params),
        mesh_lib.shard_tree(mspec, frozen.init(params)), clip, labels,
        mode='sideways')
    new = mesh_lib.unshard_tree(mspec, p)
  else:
    new, _, _ = engine.train_step(spec, frozen, params, frozen.init(params),
                                  clip, labels, mode='sideways')
  # The reference: the plain optimizer on the gradient with stage 1 zeroed.
  _, grads, out = engine.loss_and_grads(spec, params, clip, labels,
                                        mode='sideways')
  assert optax.tree.norm(grads['blocks'][1]) > 1e-3  # It would clip.
  grads['blocks'][1] = jax.tree.map(jnp.zeros_like, grads['blocks'][1])
  plain = optim.make_optimizer(config)
  ref, _ = engine.apply_gradients(plain, params, plain.init(params), grads,
                                  out.metrics['valid_ticks'])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               new['blocks'][1], params['blocks'][1])
  for part in ('blocks', 0), ('blocks', 2), ('head',):
    get = lambda tree, part=part: tree[part[0]][part[1]] if len(part) == 2 \
        else tree[part[0]]
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), get(ref),
                         get(params))
    assert all(jax.tree.leaves(moved))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-7),
                 get(new), get(ref))
