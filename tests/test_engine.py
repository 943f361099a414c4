"""The tick engine against exact references (DESIGN.md §1, oracles 1-4, 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from skipside import engine, models, network, stages, tick

L = 5  # Stages of the default net.


def _close(a, b, rtol=2e-5, atol=2e-6):
  chex_like = jax.tree.map(
      lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                              rtol=rtol, atol=atol), a, b)
  del chex_like


def _nets():
  """(name, spec, params, loss kind): small nets covering every feature."""
  out = {}
  rngs = nnx.Rngs(0)
  out['conv_skips_concat'] = network.split(models.default_net(
      (16, 16, 1), 3, widths=(4, 8, 8, 8, 8), rngs=rngs))
  out['conv_temporal_chain'] = network.split(models.default_net(
      (16, 16, 1), 3, widths=(4, 8, 8, 8, 8), skips=(), temporal=True,
      rngs=rngs))
  out['mlp_skips_sum'] = network.split(models.mlp_net(
      (6,), 3, width=8, num_stages=4, skips=((0, 2), (0, 3), (1, 3)),
      rngs=rngs))
  out['next_frame'] = network.split(models.default_net(
      (16, 16, 1), 0, widths=(4, 8, 8, 8, 8), head='next_frame', rngs=rngs))
  return out


NETS = _nets()


def _data(spec, batch=2, frames=7, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  clip = jax.random.normal(k1, (batch, frames, *spec.frame_shape))
  if spec.loss == 'mse':
    targets = jnp.roll(clip, -1, axis=1)  # Next frame, per frame.
  else:
    targets = jax.random.randint(k2, (batch,), 0, 3)
  return clip, targets


# -- Plain references, written without the engine's scan or carry. ----------

def _block(spec, params, l):
  return nnx.merge(spec.block_defs[l], params['blocks'][l])


def _head_loss(spec, params, top, target):
  pred = nnx.merge(spec.head_def, params['head'])(top)
  return tick.per_example_loss(spec.loss, pred, target).mean()


def _zero_states(spec, params, batch):
  return list(spec.init_states(params, batch))


def pipelined_reference(spec, params, clip, targets, mask_fill=True):
  """Unrolled Python loop of the pipelined graph; loss masked during fill
  (without ``mask_fill`` a clip label scores every tick)."""
  b, t_len = clip.shape[:2]
  outs = [jnp.zeros((b, *s)) for s in spec.out_shapes]
  states = _zero_states(spec, params, b)
  per_frame = targets.ndim == clip.ndim if spec.loss == 'mse' else False
  losses = []
  for t in range(t_len):
    new = []
    for l in range(spec.num_stages):
      ins = (clip[:, t],) if l == 0 else tuple(outs[k]
                                               for k in spec.in_edges[l])
      y, states[l] = _block(spec, params, l)(ins, states[l])
      new.append(y)
    outs = new
    frame = t - spec.depth  # The chain output belongs to this frame.
    if frame >= 0 or not (mask_fill or per_frame):
      target = targets[:, frame] if per_frame else targets
      losses.append(_head_loss(spec, params, outs[-1], target))
  return sum(losses) / len(losses)


def per_frame_reference(spec, params, clip, targets):
  """The network applied frame by frame (synchronous), mean loss over frames."""
  b, t_len = clip.shape[:2]
  states = _zero_states(spec, params, b)
  per_frame = spec.loss == 'mse'
  losses = []
  for t in range(t_len):
    outs = []
    for l in range(spec.num_stages):
      ins = (clip[:, t],) if l == 0 else tuple(outs[k]
                                               for k in spec.in_edges[l])
      y, states[l] = _block(spec, params, l)(ins, states[l])
      outs.append(y)
    target = targets[:, t] if per_frame else targets
    losses.append(_head_loss(spec, params, outs[-1], target))
  return sum(losses) / len(losses)


# -- Oracle 1: pipelined_bp == jax.grad of the unrolled pipelined graph. -----

@pytest.mark.parametrize('name', sorted(NETS))
def test_pipelined_bp_equals_unrolled_reference(name):
  spec, params = NETS[name]
  clip, targets = _data(spec)
  loss, grads, out = engine.loss_and_grads(spec, params, clip, targets,
                                           mode='pipelined_bp')
  ref_loss, ref_grads = jax.value_and_grad(pipelined_reference, argnums=1)(
      spec, params, clip, targets)
  _close(loss, ref_loss)
  _close(grads, ref_grads)
  assert int(out.metrics['valid_ticks']) == clip.shape[1] - spec.depth


@pytest.mark.parametrize('mode', ['pipelined_bp', 'sideways'])
def test_clip_label_scores_every_tick_without_fill_mask(mode):
  """A clip label applies to every tick: with mask_fill=False the fill ticks
  are scored against it too (not against an empty target FIFO's zeros)."""
  spec, params = NETS['conv_skips_concat']
  clip, targets = _data(spec)
  targets = jnp.array([1, 2])  # No label 0, which a zero FIFO would hide.
  loss, grads, out = engine.loss_and_grads(spec, params, clip, targets,
                                           mode=mode, mask_fill=False)
  ref_loss, ref_grads = jax.value_and_grad(pipelined_reference, argnums=1)(
      spec, params, clip, targets, mask_fill=False)
  _close(loss, ref_loss)
  assert int(out.metrics['valid_ticks']) == clip.shape[1]
  if mode == 'pipelined_bp':
    _close(grads, ref_grads)
  else:  # The top stage's and the head's Sideways gradients are exact.
    _close(grads['head'], ref_grads['head'], rtol=1e-4, atol=1e-6)
    _close(grads['blocks'][-1], ref_grads['blocks'][-1], rtol=1e-4,
           atol=1e-6)


# -- Oracle 4: bp == jax.grad of the per-frame network. ----------------------

@pytest.mark.parametrize('name', sorted(NETS))
def test_bp_equals_per_frame_reference(name):
  spec, params = NETS[name]
  clip, targets = _data(spec)
  loss, grads, _ = engine.loss_and_grads(spec, params, clip, targets,
                                         mode='bp')
  ref_loss, ref_grads = jax.value_and_grad(per_frame_reference, argnums=1)(
      spec, params, clip, targets)
  _close(loss, ref_loss)
  _close(grads, ref_grads)


# -- Oracle 2: sideways on a constant video is exact once filled. ------------

def _tick_grads(spec, params, clip, targets, frames):
  """Sideways gradient of tick ``frames - 1`` alone, unnormalized.

  ``loss_and_grads`` averages over the valid ticks of a clip, so the sum over
  ticks is ``valid_ticks * grads``; the difference of two sums isolates a tick.
  """
  def summed(n):
    _, g, out = engine.loss_and_grads(spec, params, jnp.repeat(clip, n, 1),
                                      targets, mode='sideways')
    return jax.tree.map(lambda x: x * out.metrics['valid_ticks'], g)
  return jax.tree.map(jnp.subtract, summed(frames), summed(frames - 1))


@pytest.mark.parametrize('name', ['conv_skips_concat', 'mlp_skips_sum'])
def test_sideways_exact_on_constant_video_after_fill(name):
  spec, params = NETS[name]
  clip, targets = _data(spec, frames=1)
  depth = spec.depth
  exact = jax.grad(per_frame_reference, argnums=1)(spec, params, clip, targets)
  for t in (2 * depth, 2 * depth + 2):  # Tick 2L-2 and a later one.
    _close(_tick_grads(spec, params, clip, targets, t + 1), exact,
           rtol=1e-3, atol=1e-6)

  # One tick earlier the longest message path has not landed: not exact.
  early = _tick_grads(spec, params, clip, targets, 2 * depth)
  a = jnp.concatenate([g.ravel() for g in jax.tree.leaves(early['blocks'][0])])
  b = jnp.concatenate([g.ravel() for g in jax.tree.leaves(exact['blocks'][0])])
  assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) > 1e-2
  _close(early['blocks'][-1], exact['blocks'][-1], rtol=1e-3, atol=1e-6)


def test_stream_messages_carry_into_next_clip():
  """In a stream, messages in flight at a clip's end land in the next clip."""
  spec, params = NETS['mlp_skips_sum']
  clip, targets = _data(spec, frames=1)
  depth = spec.depth
  _, _, out = engine.loss_and_grads(spec, params,
                                    jnp.repeat(clip, 2 * depth, 1), targets,
                                    mode='sideways')
  assert any(float(jnp.abs(m).max()) > 0 for m in out.carry.msgs[:-1])
  _, g_next, _ = engine.loss_and_grads(spec, params, clip, targets,
                                       mode='sideways', carry=out.carry)
  fresh = _tick_grads(spec, params, clip, targets, 2 * depth + 1)
  # Same bottom-stage direction; the scale is the previous clip's 1/valid.
  a = jax.tree.leaves(g_next['blocks'][0])[0].ravel()
  b = jax.tree.leaves(fresh['blocks'][0])[0].ravel()
  cos = jnp.dot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b)
  assert float(cos) > 0.999


def test_sideways_differs_from_exact_on_moving_video():
  """The approximation is real: on random frames it is not the exact gradient."""
  spec, params = NETS['conv_skips_concat']
  clip, targets = _data(spec, frames=12)
  _, g_sw, _ = engine.loss_and_grads(spec, params, clip, targets,
                                     mode='sideways')
  _, g_ex, _ = engine.loss_and_grads(spec, params, clip, targets,
                                     mode='pipelined_bp')
  a = jax.tree.leaves(g_sw['blocks'][0])[0]
  b = jax.tree.leaves(g_ex['blocks'][0])[0]
  assert not np.allclose(a, b, rtol=1e-3)
  # The head sits on the top stage's tick: its gradient is exact.
  _close(g_sw['head'], g_ex['head'], rtol=1e-4, atol=1e-6)


# -- Oracle 3: skip edges deliver the frame offset l-1-k. --------------------

def _identity_net(frames, skip):
  layers = [stages.Identity() for _ in range(4)]
  rngs = nnx.Rngs(0)
  return network.split(network.Network(
      layers, stages.ClassifierHead(frames, 2, rngs=rngs),
      frame_shape=(frames,), skips=[skip], combine='sum', rngs=rngs))


@pytest.mark.parametrize('skip', [(0, 2), (0, 3), (1, 3)])
@pytest.mark.parametrize('mode', ['pipelined_bp', 'sideways', 'bp'])
def test_skip_edge_frame_offset(skip, mode):
  frames = 10
  spec, params = _identity_net(frames, skip)
  clip = jnp.eye(frames)[None]  # Frame t is one_hot(t): (1, T, T).
  _, (outs, _) = engine.forward(spec, params, clip, jnp.zeros((1,), jnp.int32),
                                mode=mode, collect=True)
  k, l = skip
  for t in range(frames):
    got = np.asarray(outs[l][t, 0])
    expected = np.zeros(frames)
    if mode == 'bp':  # Same tick: both edges carry frame t.
      expected[t] += 2
    else:
      chain_frame = t - l  # Chain: one tick per edge.
      skip_frame = t - 1 - k  # Skip: one tick, from stage k.
      assert skip_frame - chain_frame == l - 1 - k
      if chain_frame >= 0:
        expected[chain_frame] += 1
      if skip_frame >= 0:
        expected[skip_frame] += 1
    np.testing.assert_array_equal(got, expected, err_msg=f'tick {t}')


# -- Oracle 6: compiled temp memory flat in T for sideways only. -------------

def _temp_bytes(spec, params, mode, frames):
  clip = jax.ShapeDtypeStruct((2, frames, *spec.frame_shape), jnp.float32)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32)
  lowered = engine.loss_and_grads.lower(spec, params, clip, labels, mode=mode)
  return lowered.compile().memory_analysis().temp_size_in_bytes


def test_sideways_temp_memory_flat_in_clip_length():
  spec, params = network.split(models.default_net((32, 32, 1), 4,
                                                  rngs=nnx.Rngs(0)))
  sw16 = _temp_bytes(spec, params, 'sideways', 16)
  sw128 = _temp_bytes(spec, params, 'sideways', 128)
  assert abs(sw128 / sw16 - 1) < 0.05, (sw16, sw128)
  pb16 = _temp_bytes(spec, params, 'pipelined_bp', 16)
  pb128 = _temp_bytes(spec, params, 'pipelined_bp', 128)
  assert pb128 > 4 * pb16, (pb16, pb128)
  bp128 = _temp_bytes(spec, params, 'bp', 128)
  assert bp128 > 10 * sw128, (bp128, sw128)


# -- Streams, flush, online mode, per-frame targets. -------------------------

@pytest.mark.parametrize('mode', engine.MODES)
def test_stream_carry_continues_exactly(mode):
  """Two clips with the carry == one clip twice as long (forward)."""
  spec, params = NETS['conv_temporal_chain']
  clip, targets = _data(spec, frames=10)
  whole, (outs, _) = engine.forward(spec, params, clip, targets, mode=mode,
                                    collect=True)
  first, (o1, _) = engine.forward(spec, params, clip[:, :4], targets,
                                  mode=mode, collect=True)
  second, (o2, _) = engine.forward(spec, params, clip[:, 4:], targets,
                                   mode=mode, carry=first.carry, collect=True)
  _close(outs, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), o1, o2))
  assert int(second.carry.tick) == 10
  w = whole.metrics['valid_ticks']
  n1, n2 = first.metrics['valid_ticks'], second.metrics['valid_ticks']
  assert int(n1 + n2) == int(w)
  _close(whole.metrics['loss'],
         (first.metrics['loss'] * n1 + second.metrics['loss'] * n2) / w)


def test_clip_labels_stay_with_their_frames_across_a_stream():
  """Two clips of different labels in a stream == one clip whose per-frame
  labels change at the boundary: the outputs of clip 1's last frames, which
  come out during clip 2, are scored against clip 1's label."""
  spec, params = NETS['conv_skips_concat']
  clip, _ = _data(spec, frames=12)
  a, b = jnp.array([0, 1]), jnp.array([2, 0])
  per_frame = jnp.concatenate([jnp.repeat(a[:, None], 6, 1),
                               jnp.repeat(b[:, None], 6, 1)], axis=1)
  whole, _ = engine.forward(spec, params, clip, per_frame, mode='sideways')
  first, _ = engine.forward(spec, params, clip[:, :6], a, mode='sideways')
  second, _ = engine.forward(spec, params, clip[:, 6:], b, mode='sideways',
                             carry=first.carry)
  n1, n2 = first.metrics['valid_ticks'], second.metrics['valid_ticks']
  _close((first.metrics['loss'] * n1 + second.metrics['loss'] * n2)
         / (n1 + n2), whole.metrics['loss'])


def test_per_frame_targets_aligned_across_clips():
  """Next-frame targets delayed by the depth stay aligned over a stream."""
  spec, params = NETS['next_frame']
  clip, targets = _data(spec, frames=12)
  whole, _ = engine.forward(spec, params, clip, targets, mode='pipelined_bp')
  first, _ = engine.forward(spec, params, clip[:, :6], targets[:, :6],
                            mode='pipelined_bp')
  second, _ = engine.forward(spec, params, clip[:, 6:], targets[:, 6:],
                             mode='pipelined_bp', carry=first.carry)
  n1, n2 = first.metrics['valid_ticks'], second.metrics['valid_ticks']
  _close(whole.metrics['loss'],
         (first.metrics['loss'] * n1 + second.metrics['loss'] * n2) / (n1 + n2))


def sideways_reference(spec, params, clip, targets, flush, gate_from=None):
  """Sideways (DESIGN.md §1) as an unrolled Python loop of a stateless net:
  ``flush`` ticks repeat the last frame with the loss masked; the loss is
  the mean over the clip's ticks from ``depth`` on (clip labels).

  ``gate_from``: DESIGN.md's second fill convention instead: the loss of
  every clip tick is scored (mean over all of them) and stage ``l``'s
  parameter gradient counts from tick ``gate_from[l]`` on (the head's with
  the top stage's).
  """
  b, t_len = clip.shape[:2]
  top = spec.num_stages - 1
  n = t_len - spec.depth if gate_from is None else t_len
  first = ([0] * spec.num_stages if gate_from is None else list(gate_from))
  outs = [jnp.zeros((b, *s)) for s in spec.out_shapes]
  msgs = [jnp.zeros_like(o) for o in outs]
  grads = jax.tree.map(jnp.zeros_like, params)
  for t in range(t_len + flush):
    x = clip[:, min(t, t_len - 1)]
    weight = 1.0 / n if t_len - n <= t < t_len else 0.0
    ys, vjps = [], []
    for l in range(spec.num_stages):
      ins = (x,) if l == 0 else tuple(outs[k] for k in spec.in_edges[l])
      y, vjp = jax.vjp(lambda p, i, l=l: spec.apply_block(l, p, i, ())[0],
                       params['blocks'][l], ins)
      ys.append(y)
      vjps.append(vjp)
    head_g, top_cot = jax.grad(
        lambda h, y: weight * _head_loss(spec, {'head': h}, y, targets),
        argnums=(0, 1))(params['head'], ys[top])
    if t >= first[top]:
      grads['head'] = jax.tree.map(jnp.add, grads['head'], head_g)
    new_msgs = [jnp.zeros_like(y) for y in ys]
    for l in range(spec.num_stages):
      g_p, g_in = vjps[l](top_cot if l == top else msgs[l])
      if t >= first[l]:
        grads['blocks'][l] = jax.tree.map(jnp.add, grads['blocks'][l], g_p)
      for k, g in zip(spec.in_edges[l], g_in if l else ()):
        new_msgs[k] = new_msgs[k] + g
    outs, msgs = ys, new_msgs
  return grads


@pytest.mark.parametrize('flush', [0, 1, 3])
def test_flush_masks_loss_and_lets_messages_land(flush):
  spec, params = NETS['mlp_skips_sum']
  clip, targets = _data(spec, frames=6)
  loss0, g0, _ = engine.loss_and_grads(spec, params, clip, targets,
                                       mode='pipelined_bp')
  loss1, g1, out = engine.loss_and_grads(spec, params, clip, targets,
                                         mode='pipelined_bp', flush=flush)
  _close(loss0, loss1)
  _close(g0, g1)  # Flush ticks carry no loss: the exact gradient is unchanged.
  assert int(out.carry.tick) == 6 + flush
  # Sideways: the flush ticks repeat the last frame under a masked loss and
  # land the messages still in flight (the plain loop above).
  _, got, _ = engine.loss_and_grads(spec, params, clip, targets,
                                    mode='sideways', flush=flush)
  _close(got, sideways_reference(spec, params, clip, targets, flush),
         rtol=1e-4, atol=1e-6)
  if flush:  # The bottom stage really got more.
    _, g_none, _ = engine.loss_and_grads(spec, params, clip, targets,
                                         mode='sideways')
    assert not np.allclose(jax.tree.leaves(g_none['blocks'][0])[0],
                           jax.tree.leaves(got['blocks'][0])[0])


def test_online_mode_steps_every_k_ticks():
  spec, params = NETS['mlp_skips_sum']
  clip, targets = _data(spec, frames=8)
  opt = optax.sgd(0.1)
  state = opt.init(params)
  p_online, _, out = engine.train_step(spec, opt, params, state, clip, targets,
                                       mode='sideways', update_every=4)
  assert int(out.carry.tick) == 8
  # By hand: window 1, update, window 2 continuing the carry, update.
  _, g1, o1 = engine.loss_and_grads(spec, params, clip[:, :4], targets,
                                    mode='sideways')
  p = jax.tree.map(lambda p, g: p - 0.1 * g, params, g1)
  _, g2, _ = engine.loss_and_grads(spec, p, clip[:, 4:], targets,
                                   mode='sideways', carry=o1.carry)
  p = jax.tree.map(lambda p, g: p - 0.1 * g, p, g2)
  _close(p_online, p)
  with pytest.raises(ValueError, match='update_every'):
    engine.train_step(spec, opt, params, state, clip, targets,
                      mode='sideways', update_every=3)


def test_windows_whose_gates_are_all_shut_make_no_update():
  """mask_fill='stages' in online mode: the first window (ticks 0-1 of a
  depth-3 net) carries loss but no gradient; Adam's moments and weight
  decay must not see it (as a fill window under mask_fill=True)."""
  spec, params = NETS['mlp_skips_sum']
  clip, targets = _data(spec, frames=4)
  opt = optax.adamw(0.1, weight_decay=0.1)
  state = opt.init(params)
  got, _, _ = engine.train_step(spec, opt, params, state, clip, targets,
                                mode='sideways', mask_fill='stages',
                                update_every=2)
  _, g1, o1 = engine.loss_and_grads(spec, params, clip[:, :2], targets,
                                    mode='sideways', mask_fill=False)
  assert all(not np.any(x) for x in jax.tree.leaves(
      engine.loss_and_grads(spec, params, clip[:, :2], targets,
                            mode='sideways', mask_fill='stages',
                            carry=engine.init_carry(spec, params, clip,
                                                    targets, 'sideways'))[1]))
  _, g2, _ = engine.loss_and_grads(spec, params, clip[:, 2:], targets,
                                   mode='sideways', mask_fill='stages',
                                   carry=o1.carry)
  updates, _ = opt.update(g2, state, params)  # One update: window 2's.
  _close(got, optax.apply_updates(params, updates), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('mode', engine.MODES)
def test_train_step_learns_appearance(mode):
  """A few steps on a fixed batch reduce the loss in every mode."""
  spec, params = NETS['mlp_skips_sum']
  clip, targets = _data(spec, batch=8, frames=6)
  clip = clip.at[:, :, 0].set(targets[:, None] * 2.0)  # Label in every frame.
  opt = optax.adam(1e-2)
  state = opt.init(params)
  losses = []
  for _ in range(30):
    params, state, out = engine.train_step(spec, opt, params, state, clip,
                                           targets, mode=mode)
    losses.append(float(out.metrics['loss']))
  assert losses[-1] < 0.5 * losses[0], losses


def test_bad_mode_and_clip_shape_are_named():
  spec, params = NETS['mlp_skips_sum']
  clip, targets = _data(spec)
  with pytest.raises(ValueError, match="mode 'bpp' is unknown"):
    engine.loss_and_grads(spec, params, clip, targets, mode='bpp')
  with pytest.raises(ValueError, match=r'clip of shape \(2, 7, 5\)'):
    engine.loss_and_grads(spec, params, clip[..., :5], targets, mode='bp')


@pytest.mark.parametrize('mode', engine.MODES)
def test_bfloat16_compute_keeps_float32_params_and_grads(mode):
  spec, params = NETS['conv_skips_concat']
  clip, targets = _data(spec, frames=8)
  _, g32, _ = engine.loss_and_grads(spec, params, clip, targets, mode=mode)
  loss, g16, out = engine.loss_and_grads(spec, params, clip, targets, mode=mode,
                                         compute_dtype=jnp.bfloat16)
  assert loss.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  assert out.carry.outs[0].dtype == jnp.bfloat16
  a = jnp.concatenate([g.ravel() for g in jax.tree.leaves(g32)])
  b = jnp.concatenate([g.ravel() for g in jax.tree.leaves(g16)])
  assert float(jnp.dot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b)) > 0.98


# -- Oracle 2 with temporal stages: cached inputs' gradients are sent down. --

class _LeakyMemory(nnx.Module):
  """A user's stateful stage: an EMA of its inputs, ``m = a m + (1-a) x``."""

  def __init__(self, features, *, rngs):
    self.mix = nnx.Linear(2 * features, features, rngs=rngs)

  def init_state(self, x):
    return jnp.zeros(x.shape, x.dtype)

  def __call__(self, x, state):
    memory = 0.5 * state + 0.5 * x
    return nnx.relu(self.mix(jnp.concatenate([x, memory], -1))), memory


def _temporal_nets():
  rngs = nnx.Rngs(3)
  w = 8
  mid = network.split(network.Network(
      [stages.Mlp(6, [w], rngs=rngs), stages.TemporalConv(w, rngs=rngs),
       stages.Mlp(w, [w], rngs=rngs), stages.Mlp(w, [w], rngs=rngs)],
      stages.ClassifierHead(w, 3, rngs=rngs), frame_shape=(6,),
      skips=[(0, 2)], rngs=rngs))
  user = network.split(network.Network(
      [stages.Mlp(6, [w], rngs=rngs), _LeakyMemory(w, rngs=rngs),
       stages.Mlp(w, [w], rngs=rngs)],
      stages.ClassifierHead(w, 3, rngs=rngs), frame_shape=(6,), rngs=rngs))
  return {'temporal_top': NETS['conv_temporal_chain'],
          'temporal_mid_skip': mid, 'user_stateful': user}


TEMPORAL_NETS = _temporal_nets()


def _one_tick_grads(spec, params, clip, targets, frames, mode):
  """Unnormalized gradient of tick ``frames - 1`` alone (see _tick_grads)."""
  def summed(n):
    _, g, out = engine.loss_and_grads(spec, params, jnp.repeat(clip, n, 1),
                                      targets, mode=mode)
    return jax.tree.map(lambda x: x * out.metrics['valid_ticks'], g)
  return jax.tree.map(jnp.subtract, summed(frames), summed(frames - 1))


def _rel_err(a, b):
  a = jnp.concatenate([x.ravel() for x in jax.tree.leaves(a)])
  b = jnp.concatenate([x.ravel() for x in jax.tree.leaves(b)])
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize('name', sorted(TEMPORAL_NETS))
def test_sideways_exact_on_constant_video_with_temporal_stages(name):
  """Oracle 2 for temporal stages: the gradients w.r.t. a stage's cached
  inputs join its message down, so on a constant video (caches and messages
  filled) every stage's per-tick gradient is the exact one of that tick."""
  spec, params = TEMPORAL_NETS[name]
  clip, targets = _data(spec, frames=1)
  t = 4 * spec.depth + 24  # Pipeline, caches and the EMA (2^-20) filled.
  exact = _one_tick_grads(spec, params, clip, targets, t + 1, 'bp')
  got = _one_tick_grads(spec, params, clip, targets, t + 1, 'sideways')
  for l in range(spec.num_stages):
    assert _rel_err(got['blocks'][l], exact['blocks'][l]) < 1e-4, l
  assert _rel_err(got['head'], exact['head']) < 1e-4


class _Counter(nnx.Module):
  """State that is not a cache of the input: (B, 3) against inputs (B, 8)."""

  def __init__(self, *, rngs):
    self.fc = nnx.Linear(8, 8, rngs=rngs)

  def init_state(self, x):
    return jnp.zeros((x.shape[0], 3), x.dtype)

  def __call__(self, x, state):
    return nnx.relu(self.fc(x)) + state.sum(), state + 1


def test_state_that_is_not_an_input_cache_is_named_under_sideways():
  rngs = nnx.Rngs(0)
  spec, params = network.split(network.Network(
      [stages.Mlp(6, [8], rngs=rngs), _Counter(rngs=rngs)],
      stages.ClassifierHead(8, 3, rngs=rngs), frame_shape=(6,), rngs=rngs))
  clip, targets = _data(spec, frames=4)
  with pytest.raises(ValueError, match=r'_Counter: state leaf of shape '
                     r'\(2, 3\) is not a cache of its input \(2, 8\)'):
    engine.loss_and_grads(spec, params, clip, targets, mode='sideways')
  # The exact modes differentiate through any state.
  engine.loss_and_grads(spec, params, clip, targets, mode='pipelined_bp')


# -- Bad input: named at trace time where shapes decide. --------------------

@pytest.mark.parametrize('case, message', [
    ('short_clip', r'a clip of 4 frames has no loss tick in .sideways.: a '
     r'fresh stream through 5 stages masks its first 4 ticks'),
    ('labels_too_many', r'targets of shape \(3,\) do not fit the clip '
     r'\(2, 7, 16, 16, 1\) and the .xent. loss: expected \(2,\) \(clip '
     r'targets\) or \(2, 7\) \(frame targets\)'),
    ('labels_2d', r'targets of shape \(2, 3\) do not fit'),
    ('scalar_label', r'targets are a scalar: expected one per clip \(2,\)'),
    ('no_frames', r'clip of shape \(2, 0, 16, 16, 1\): expected \(batch, '
     r'frames >= 1'),
    ('negative_flush', r'flush=-1 must be an int >= 0'),
    ('frame_rank', r'clip of shape \(2, 7, 16, 16\): expected'),
])
def test_bad_inputs_are_named(case, message):
  spec, params = NETS['conv_skips_concat']
  clip, targets = _data(spec)
  args, kw = (clip, targets), {}
  if case == 'short_clip':
    args = (clip[:, :4], targets)
  elif case == 'labels_too_many':
    args = (clip, jnp.zeros((3,), jnp.int32))
  elif case == 'labels_2d':
    args = (clip, jnp.zeros((2, 3), jnp.int32))
  elif case == 'scalar_label':
    args = (clip, jnp.zeros((), jnp.int32))
  elif case == 'no_frames':
    args = (clip[:, :0], targets)
  elif case == 'negative_flush':
    kw = {'flush': -1}
  elif case == 'frame_rank':
    args = (clip[..., 0], targets)
  with pytest.raises(ValueError, match=message):
    engine.loss_and_grads(spec, params, *args, mode='sideways', **kw)


def test_short_clip_is_fine_in_a_stream_or_without_fill_mask():
  spec, params = NETS['conv_skips_concat']
  clip, targets = _data(spec)
  _, _, out = engine.loss_and_grads(spec, params, clip, targets,
                                    mode='sideways')
  _, _, nxt = engine.loss_and_grads(spec, params, clip[:, :2], targets,
                                    mode='sideways', carry=out.carry)
  assert int(nxt.metrics['valid_ticks']) == 2
  _, _, nomask = engine.loss_and_grads(spec, params, clip[:, :2], targets,
                                       mode='sideways', mask_fill=False)
  assert int(nomask.metrics['valid_ticks']) == 2


def test_uint8_clip_is_scaled_to_unit_range():
  spec, params = NETS['conv_skips_concat']
  clip, targets = _data(spec)
  raw = jnp.round(jax.nn.sigmoid(clip) * 255).astype(jnp.uint8)
  got = engine.loss_and_grads(spec, params, raw, targets, mode='sideways')
  want = engine.loss_and_grads(spec, params, raw.astype(jnp.float32) / 255,
                               targets, mode='sideways')
  _close(got, want)


def test_values_only_the_data_shows_are_named():
  spec, _ = NETS['conv_skips_concat']
  clip, targets = _data(spec)
  engine.check_values(spec, clip, targets)
  with pytest.raises(ValueError, match=r'label 7 is out of range for 3 '
                     r'classes: labels are 0..2'):
    engine.check_values(spec, clip, jnp.array([0, 7]))
  with pytest.raises(ValueError, match=r'label -1 is out of range'):
    engine.check_values(spec, clip, jnp.array([-1, 0]))
  with pytest.raises(ValueError, match=r'non-finite pixels \(first at index '
                     r'\(1, 2, 0, 0, 0\)'):
    engine.check_values(spec, clip.at[1, 2].set(jnp.nan), targets)


def test_network_input_mistakes_are_named():
  rngs = nnx.Rngs(0)
  layers = [stages.Mlp(6, [8], rngs=rngs) for _ in range(3)]
  head = stages.ClassifierHead(8, 3, rngs=rngs)
  with pytest.raises(ValueError, match=r'skips=\(0, 2\) is one edge without '
                     r'the outer list: write skips=\[\(0, 2\)\]'):
    network.Network(layers, head, frame_shape=(6,), skips=(0, 2), rngs=rngs)

  class NoState(nnx.Module):  # Declares state, returns only y.
    def init_state(self, x):
      return jnp.zeros(x.shape, x.dtype)

    def __call__(self, x, state):
      return x + state

  with pytest.raises(ValueError, match=r'NoState is a temporal stage .* '
                     r'must return \(y, new_state\)'):
    network.Network([layers[0], NoState()], head, frame_shape=(6,),
                    rngs=rngs)


# -- Which stages learn from a fresh clip. -----------------------------------

@pytest.mark.parametrize('name,flush', [('mlp_skips_sum', 0),
                                        ('conv_skips_concat', 2)])
def test_stage_gated_fill_equals_unrolled_reference(name, flush):
  """mask_fill='stages' (DESIGN.md's second fill convention): every tick's
  loss scored, stage l's gradient counted from tick depth + d_l."""
  spec, params = NETS[name]
  clip, targets = _data(spec, frames=9)
  loss, got, out = engine.loss_and_grads(spec, params, clip, targets,
                                         mode='sideways', flush=flush,
                                         mask_fill='stages')
  first = [spec.depth + d for d in engine.message_distances(spec)]
  _close(got, sideways_reference(spec, params, clip, targets, flush,
                                 gate_from=first), rtol=1e-4, atol=1e-6)
  assert int(out.metrics['valid_ticks']) == 9  # Every clip tick scored.
  # Through the skip edges the longer paths bring fill loss to the lower
  # stages: not the masked-loss convention's gradient up to a scale.
  _, masked, _ = engine.loss_and_grads(spec, params, clip, targets,
                                       mode='sideways', flush=flush)
  ratio = [float(optax.tree.norm(got['blocks'][l]) /
                 optax.tree.norm(masked['blocks'][l]))
           for l in range(spec.num_stages)]
  assert not np.allclose(ratio, ratio[-1], rtol=1e-3), ratio


def test_stage_gated_fill_on_a_chain_is_the_masked_gradient_rescaled():
  """On a chain every message before tick depth + d_l carries fill loss
  only, so the two conventions differ by the loss's normalisation alone."""
  spec, params = network.split(models.mlp_net(
      (6,), 3, width=8, num_stages=4, rngs=nnx.Rngs(1)))
  # Non-zero biases: with zero ones every fill activation is relu(0) and
  # sends no gradient, which would hide what the gates remove.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [
      p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  frames = 10
  clip, targets = _data(spec, frames=frames)
  _, gated, _ = engine.loss_and_grads(spec, params, clip, targets,
                                      mode='sideways', mask_fill='stages')
  _, masked, _ = engine.loss_and_grads(spec, params, clip, targets,
                                       mode='sideways')
  _, scored, _ = engine.loss_and_grads(spec, params, clip, targets,
                                       mode='sideways', mask_fill=False)
  scale = (frames - spec.depth) / frames
  _close(gated, jax.tree.map(lambda g: g * scale, masked), rtol=1e-4,
         atol=1e-7)
  # Without the gates the fill's loss reaches every stage below the top.
  for l in range(spec.depth):
    assert not np.allclose(jax.tree.leaves(scored['blocks'][l])[0],
                           jax.tree.leaves(gated['blocks'][l])[0])


@pytest.mark.parametrize('mask_fill,mode,message', [
    ('stages', 'pipelined_bp', "mask_fill='stages' in mode 'pipelined_bp'"),
    ('stages', 'bp', "mask_fill='stages' in mode 'bp'"),
    ('loss', 'sideways', "mask_fill='loss' is unknown"),
])
def test_bad_fill_rule_is_named(mask_fill, mode, message):
  spec, params = NETS['mlp_skips_sum']
  clip, targets = _data(spec)
  with pytest.raises(ValueError, match=message):
    engine.loss_and_grads(spec, params, clip, targets, mode=mode,
                          mask_fill=mask_fill)


def _summed_sideways(spec, params, clip, targets, n):
  """Sideways gradient summed over the first ``n`` ticks (zero when none is
  a loss tick)."""
  if n <= spec.depth:
    return jax.tree.map(jnp.zeros_like, params)
  _, g, out = engine.loss_and_grads(spec, params, clip[:, :n], targets,
                                    mode='sideways')
  return jax.tree.map(lambda x: x * out.metrics['valid_ticks'], g)


@pytest.mark.parametrize('name', ['conv_skips_concat', 'mlp_skips_sum',
                                  'conv_temporal_chain'])
def test_gradient_ticks_are_when_messages_first_land(name):
  """Stage l's Sideways gradient is zero until tick depth + d_l and not
  after it (d_l: the fewest edges up to the top; 2L-2-l on a chain)."""
  spec, params = NETS[name]
  dist = engine.message_distances(spec)
  if name == 'conv_temporal_chain':
    assert dist == tuple(range(spec.depth, -1, -1))
  # Two ticks past the last stage's first gradient (one compilation per
  # clip length below): every stage seen before and after its tick.
  frames = spec.depth + max(dist) + 2
  clip, targets = _data(spec, frames=frames)
  sums = [_summed_sideways(spec, params, clip, targets, n)
          for n in range(frames + 1)]
  for l in range(spec.num_stages):
    norms = [float(optax.tree.norm(jax.tree.map(
        jnp.subtract, sums[n + 1]['blocks'][l], sums[n]['blocks'][l])))
             for n in range(frames)]  # Tick n's contribution.
    first = spec.depth + dist[l]
    assert all(v == 0 for v in norms[:first]), (l, norms)
    assert all(v > 0 for v in norms[first:]), (l, norms)
    assert engine.gradient_ticks(spec, 'sideways', frames)[l] == (
        frames - first)
  assert engine.gradient_ticks(spec, 'sideways', spec.depth + 1)[0] == 0
  assert engine.gradient_ticks(spec, 'sideways', spec.depth + 1,
                               flush=dist[0])[0] == 1
  assert engine.gradient_ticks(spec, 'pipelined_bp', frames) == (
      (frames - spec.depth,) * spec.num_stages)


def test_opt_in_debug_checks_name_bad_values_inside_the_step():
  """Labels out of range give a NaN or plausible loss silently; with
  debug_checks the step itself names them (the training loop checks every
  batch on the host before the step instead)."""
  spec, params = NETS['conv_skips_concat']
  clip, _ = _data(spec)
  bad = jnp.array([0, 7])
  engine.loss_and_grads(spec, params, clip, bad, mode='sideways')  # Silent.
  with pytest.raises(Exception, match=r'label 7 is out of range for 3'):
    jax.block_until_ready(engine.loss_and_grads(
        spec, params, clip, bad, mode='sideways', debug_checks=True))
  optimizer = optax.sgd(0.1)
  with pytest.raises(Exception, match=r'non-finite pixels'):
    jax.block_until_ready(engine.train_step(
        spec, optimizer, params, optimizer.init(params),
        clip.at[0, 1].set(jnp.inf), jnp.array([0, 1]), mode='sideways',
        debug_checks=True))
