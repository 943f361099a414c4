"""The mesh engine against the single-device engine (DESIGN.md §2, oracle 5).

Every comparison runs with ``pad_value=NaN``: a padded slot that reached a
loss, gradient, metric or carry would turn it into NaN.

Covering set (not the full cross product, to stay fast on 2 cores): every
mode meets every mesh shape (1x8, 2x4, 4x2) and every network once, as a
Latin square; the networks are heterogeneous (``default_net``, downsampling,
concat skips), heterogeneous without skips (with a temporal stage), and
homogeneous (``mlp_net``) with and without skips. Grouping (more stages than
devices on 'stage') occurs on 2x4 and 4x2 for every 5- and 6-stage net; the
1x8 cases leave devices idle.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from skipside import engine, mesh, models, network, placement, stages

NAN = float('nan')


def _close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def _nets():
  rngs = nnx.Rngs(0)
  conv = dict(widths=(4, 8, 8, 8, 8), rngs=rngs)
  return {
      'conv_skips': network.split(models.default_net((16, 16, 1), 3, **conv)),
      'conv_temporal_chain': network.split(models.default_net(
          (16, 16, 1), 3, skips=(), temporal=True, **conv)),
      'mlp_skips': network.split(models.mlp_net(
          (6,), 3, width=8, num_stages=4, skips=((0, 2), (0, 3), (1, 3)),
          rngs=rngs)),
      'mlp_chain6': network.split(models.mlp_net(
          (6,), 3, width=8, num_stages=6, rngs=rngs)),
      'next_frame': network.split(models.default_net(
          (16, 16, 1), 0, head='next_frame', **conv)),
  }


NETS = _nets()
_MESHES = {}


def _mesh(shape: str):
  if shape not in _MESHES:
    data, stage = (int(v) for v in shape.split('x'))
    _MESHES[shape] = mesh.make_mesh(data, stage)
  return _MESHES[shape]


def _data(spec, batch=4, frames=7, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  clip = jax.random.normal(k1, (batch, frames, *spec.frame_shape))
  if spec.loss == 'mse':
    targets = jnp.roll(clip, -1, axis=1)
  else:
    targets = jax.random.randint(k2, (batch,), 0, 3)
  return clip, targets


def _check_same(mspec, params, got, want):
  """(loss, grads, ClipOutput) of both engines agree, the carry included."""
  loss, grads, out = got
  ref_loss, ref_grads, ref_out = want
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  _close(loss, ref_loss)
  _close(grads, ref_grads)
  _close(out.metrics, ref_out.metrics)
  if ref_out.predictions is not None:
    _close(out.predictions, ref_out.predictions)
  carry = mesh.to_stream_carry(mspec, params, out.carry)
  _close(carry, ref_out.carry)


CASES = [
    # (mode, net, mesh shape, flush)
    ('sideways', 'conv_skips', '2x4', 0),
    ('pipelined_bp', 'conv_skips', '4x2', 2),
    ('bp', 'conv_skips', '1x8', 0),
    ('sideways', 'mlp_skips', '1x8', 3),
    ('pipelined_bp', 'mlp_skips', '2x4', 0),
    ('bp', 'mlp_skips', '4x2', 0),
    ('sideways', 'conv_temporal_chain', '4x2', 0),
    ('pipelined_bp', 'conv_temporal_chain', '1x8', 0),
    ('bp', 'conv_temporal_chain', '2x4', 0),
    ('sideways', 'mlp_chain6', '2x4', 0),
    ('sideways', 'next_frame', '2x4', 0),  # Per-frame targets (FIFO).
]


@pytest.mark.parametrize('mode,name,shape,flush', CASES)
def test_mesh_equals_single_device(mode, name, shape, flush):
  spec, params = NETS[name]
  mspec = mesh.place(spec, _mesh(shape), pad_value=NAN)
  clip, targets = _data(spec)
  got = mesh.loss_and_grads(mspec, params, clip, targets, mode=mode,
                            flush=flush)
  want = engine.loss_and_grads(spec, params, clip, targets, mode=mode,
                               flush=flush)
  _check_same(mspec, params, got, want)
  # The padding was really there (and really NaN) in the carried buffers.
  used = [sum(np.prod(spec.out_shapes[l]) for l in g) for g in mspec.groups]
  if min(used) < max(used):
    assert np.isnan(np.asarray(got[2].carry.outs)).any()


@pytest.mark.parametrize('name,shape', [('conv_skips', '2x4'),
                                        ('mlp_skips', '1x8')])
def test_stage_gated_fill_matches_single_device(name, shape):
  """mask_fill='stages' gates each stage on its own device by the stream
  tick, as the single-device engine does; continued into a second clip."""
  spec, params = NETS[name]
  mspec = mesh.place(spec, _mesh(shape), pad_value=NAN)
  clip, targets = _data(spec)
  kw = dict(mode='sideways', mask_fill='stages')
  got = mesh.loss_and_grads(mspec, params, clip, targets, **kw)
  want = engine.loss_and_grads(spec, params, clip, targets, **kw)
  _check_same(mspec, params, got, want)
  # A stream past its fill: stages whose gates opened within clip 1 count
  # every tick of clip 2.
  got = mesh.loss_and_grads(mspec, params, clip, targets,
                            carry=got[2].carry, **kw)
  want = engine.loss_and_grads(spec, params, clip, targets,
                               carry=want[2].carry, **kw)
  _check_same(mspec, params, got, want)


@pytest.mark.parametrize('mode,name,shape', [
    ('sideways', 'next_frame', '2x4'),   # Per-frame targets split too.
    ('pipelined_bp', 'conv_skips', '1x8'),
    ('bp', 'next_frame', '4x2'),
    ('sideways', 'conv_temporal_chain', '2x4'),
])
def test_clip_split_over_stage_devices_matches_single_device(mode, name,
                                                             shape):
  """8-frame clips on 2, 4 or 8 stage devices: each device holds 8/S frames
  (``mesh.time_sharded``), and the frame of each tick reaches stage 0."""
  spec, params = NETS[name]
  mspec = mesh.place(spec, _mesh(shape), pad_value=NAN)
  clip, targets = _data(spec, frames=8)
  assert mesh.time_sharded(mspec.mesh, clip.shape)
  placed = mesh.global_batch(mspec.mesh, (clip, targets), clip.shape[0])
  num_stage = mspec.num_stage
  assert placed[0].sharding.shard_shape(clip.shape)[1] == 8 // num_stage
  got = mesh.loss_and_grads(mspec, params, *placed, mode=mode, flush=1)
  want = engine.loss_and_grads(spec, params, clip, targets, mode=mode,
                               flush=1)
  _check_same(mspec, params, got, want)
  # uint8 clips are scaled by the holder of each frame, as the engine does.
  raw = jnp.asarray((np.asarray(clip) > 0) * 255, jnp.uint8)
  got = mesh.loss_and_grads(mspec, params, raw, targets, mode=mode)
  want = engine.loss_and_grads(spec, params, raw, targets, mode=mode)
  _check_same(mspec, params, got, want)


def test_clip_memory_per_device_grows_with_its_share_of_frames():
  """On 1x4, a 4x longer clip adds a quarter of its bytes to each device's
  arguments (not the whole clip), and Sideways' temporary memory stays."""
  spec, params = NETS['conv_skips']
  m = mesh.make_mesh(1, 4, devices=jax.devices()[:4])
  eng = mesh.MeshEngine(mesh.place(spec, m, params=params))
  opt = optax.adam(1e-3)
  pstack = eng.state_like(params)
  state = eng.state_like(opt.init(params))

  def memory(frames):
    clip = jax.ShapeDtypeStruct((4, frames, *spec.frame_shape), jnp.float32)
    batch = eng.batch_like((clip, jax.ShapeDtypeStruct((4,), jnp.int32)), 4)
    return mesh.train_step_sharded.lower(
        eng.mspec, opt, pstack, state, *batch,
        mode='sideways').compile().memory_analysis()

  short, long = memory(16), memory(64)
  frame_bytes = 4 * np.prod(spec.frame_shape) * 4  # Batch 4, float32.
  grown = long.argument_size_in_bytes - short.argument_size_in_bytes
  assert grown == 48 * frame_bytes // 4, (grown, frame_bytes)
  assert long.temp_size_in_bytes <= short.temp_size_in_bytes + frame_bytes


def test_grouping_with_more_stages_than_devices():
  spec, _ = NETS['mlp_chain6']
  mspec = mesh.place(spec, _mesh('2x4'))
  assert len(mspec.groups) == 4
  assert [l for g in mspec.groups for l in g] == list(range(6))
  assert all(mspec.groups)
  assert mspec.device_of == tuple(
      i for i, g in enumerate(mspec.groups) for _ in g)


@pytest.mark.parametrize('mode', engine.MODES)
def test_stream_carry_continues_exactly(mode):
  """Clip 2 continued from clip 1's carry == the engine doing the same."""
  spec, params = NETS['conv_temporal_chain']  # Carries temporal state.
  mspec = mesh.place(spec, _mesh('4x2'), pad_value=NAN)
  clip, targets = _data(spec, frames=10)
  # Explicit fresh carries: both clips then share one compilation.
  first = mesh.loss_and_grads(
      mspec, params, clip[:, :5], targets, mode=mode,
      carry=mesh.init_carry(mspec, params, clip, targets, mode))
  ref_first = engine.loss_and_grads(
      spec, params, clip[:, :5], targets, mode=mode,
      carry=engine.init_carry(spec, params, clip, targets, mode))
  second = mesh.loss_and_grads(mspec, params, clip[:, 5:], targets,
                               mode=mode, carry=first[2].carry)
  ref_second = engine.loss_and_grads(spec, params, clip[:, 5:], targets,
                                     mode=mode, carry=ref_first[2].carry)
  _check_same(mspec, params, second, ref_second)
  assert int(second[2].carry.tick) == 10
  if mode == 'sideways':  # An engine carry continues on the mesh (exactly).
    third = mesh.loss_and_grads(mspec, params, clip[:, 5:], targets,
                                mode=mode, carry=ref_first[2].carry)
    _check_same(mspec, params, third, ref_second)


def test_train_step_matches_engine_and_keeps_params_structure():
  spec, params = NETS['conv_skips']
  mspec = mesh.place(spec, _mesh('2x4'), pad_value=NAN)
  clip, targets = _data(spec)
  opt = optax.adam(1e-2)
  p_mesh, s_mesh = params, opt.init(params)
  p_ref, s_ref = params, opt.init(params)
  for _ in range(3):
    p_mesh, s_mesh, out = mesh.train_step(mspec, opt, p_mesh, s_mesh, clip,
                                          targets, mode='sideways')
    p_ref, s_ref, ref = engine.train_step(spec, opt, p_ref, s_ref, clip,
                                          targets, mode='sideways')
  assert jax.tree.structure(p_mesh) == jax.tree.structure(params)
  _close(p_mesh, p_ref, rtol=1e-4, atol=1e-5)
  _close(out.metrics['loss'], ref.metrics['loss'], rtol=1e-4)


def test_online_mode_matches_engine():
  spec, params = NETS['mlp_skips']
  mspec = mesh.place(spec, _mesh('4x2'), pad_value=NAN)
  clip, targets = _data(spec, frames=8)
  opt = optax.sgd(0.1)
  got = mesh.train_step(mspec, opt, params, opt.init(params), clip, targets,
                        mode='sideways', update_every=4)
  want = engine.train_step(spec, opt, params, opt.init(params), clip,
                           targets, mode='sideways', update_every=4)
  _close(got[0], want[0])
  _close(got[2].metrics, want[2].metrics)


def test_forward_matches_engine():
  spec, params = NETS['conv_skips']
  mspec = mesh.place(spec, _mesh('4x2'), pad_value=NAN)
  clip, targets = _data(spec)
  out = mesh.forward(mspec, params, clip, targets, mode='sideways')
  ref, _ = engine.forward(spec, params, clip, targets, mode='sideways')
  _close(out.metrics, ref.metrics)
  _close(mesh.to_stream_carry(mspec, params, out.carry), ref.carry)


# -- Placement. ---------------------------------------------------------------

def _expensive_net():
  """Six Mlp stages, stage 2 about 50x the others."""
  rngs = nnx.Rngs(0)
  layers = [stages.Mlp(8, [8], rngs=rngs) for _ in range(6)]
  layers[2] = stages.Mlp(8, [512, 8], rngs=rngs)
  return network.split(network.Network(
      layers, stages.ClassifierHead(8, 3, rngs=rngs), frame_shape=(8,),
      rngs=rngs))


def test_automatic_placement_balances_an_expensive_stage():
  spec, params = _expensive_net()
  costs = placement.stage_costs(spec, params)
  assert costs[2] > 20 * max(c for i, c in enumerate(costs) if i != 2)
  mspec = mesh.place(spec, _mesh('2x4'), params=params)
  assert (2,) in mspec.groups  # The expensive stage has a device alone.
  by_count = mesh.place(spec, _mesh('2x4'))  # Balanced by count only.
  assert (placement.imbalance(costs, mspec.groups)
          < placement.imbalance(costs, by_count.groups))
  # The optimum: no grouping has a lower maximum group cost.
  assert max(placement.group_costs(costs, mspec.groups)) == pytest.approx(
      costs[2])


def test_balance_is_optimal_on_small_cases():
  assert placement.balance([1, 1, 1, 1], 2) == ((0, 1), (2, 3))
  assert placement.balance([5, 1, 1, 1, 1, 1], 2) == ((0,), (1, 2, 3, 4, 5))
  assert placement.balance([1, 2], 4) == ((0,), (1,), (), ())


def test_explicit_groups_override_and_are_validated():
  spec, params = NETS['conv_skips']
  mspec = mesh.place(spec, _mesh('4x2'), groups=[(0, 1, 2, 3), (4,)],
                     pad_value=NAN)
  assert mspec.groups == ((0, 1, 2, 3), (4,))
  clip, targets = _data(spec)
  got = mesh.loss_and_grads(mspec, params, clip, targets, mode='sideways')
  want = engine.loss_and_grads(spec, params, clip, targets, mode='sideways')
  _check_same(mspec, params, got, want)
  with pytest.raises(ValueError, match='once each, in order'):
    mesh.place(spec, _mesh('4x2'), groups=[(0, 2), (1, 3, 4)])
  with pytest.raises(ValueError, match='3 groups for 2 devices'):
    mesh.place(spec, _mesh('4x2'), groups=[(0,), (1, 2), (3, 4)])


def test_batch_must_split_over_data():
  spec, params = NETS['mlp_skips']
  mspec = mesh.place(spec, _mesh('4x2'))
  clip, targets = _data(spec, batch=6)
  with pytest.raises(ValueError, match='does not split over 4'):
    mesh.loss_and_grads(mspec, params, clip, targets, mode='bp')


def test_global_batch_from_process_local_rows():
  m = _mesh('2x4')
  rows = mesh.process_rows(m, 8)
  assert rows == slice(0, 8)  # One process holds every data shard.
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  g = mesh.global_batch(m, x[rows], 8)
  assert g.shape == (8, 3)
  assert g.sharding.spec[0] == 'data'
  np.testing.assert_array_equal(np.asarray(g), x)


def test_layout_report_counts_padding():
  """Every row against counts by hand from the stage sizes and the grouping:
  float32 (4 bytes), a batch of 4, every device sized to its largest."""
  def size(tree):
    return sum(x.size for x in jax.tree.leaves(tree))
  spec, params = NETS['conv_skips']
  # Params per stage, then the head; outputs per example (8x8x4, 4x4x8, ..).
  assert [size(b) for b in params['blocks']] == [40, 296, 1272, 720, 1304]
  assert size(params['head']) == 27
  assert [int(np.prod(s)) for s in spec.out_shapes] == [256, 128, 128, 32, 32]
  used_params, used_outs = 3659, 576
  cases = {
      # Params 40 | 296 | 1272 | 720+1304+27 (the head rides on top);
      # outputs 256 | 128 | 128 | 32+32. One device up: 0 -> 1, 1 -> 2,
      # 2 -> 3 and 4 (256, 128, 128 in buffers of 256); two up: 0 -> 2,
      # 1 -> 3 (256, 128 in buffers of 256).
      ((0,), (1,), (2,), (3, 4)): dict(
          params=(used_params, 4 * 2051), outs=(used_outs, 4 * 256),
          transfers=(256 + 128 + 128 + 256 + 128, 3 * 256 + 2 * 256)),
      # Params 40+296 | 1272 | 720 | 1304+27; outputs 256+128 | 128 | 32 |
      # 32. One up: 0 and 1 -> 2, 2 -> 3, 3 -> 4 (384, 128, 32 in buffers
      # of 384; 0 -> 1 stays on its device); two up: 1 -> 3, 2 -> 4 (128,
      # 128 in buffers of 128).
      ((0, 1), (2,), (3,), (4,)): dict(
          params=(used_params, 4 * 1331), outs=(used_outs, 4 * 384),
          transfers=(384 + 128 + 32 + 128 + 128, 3 * 384 + 2 * 128)),
  }
  for groups, want in cases.items():
    report = mesh.layout_report(
        mesh.place(spec, _mesh('2x4'), [list(g) for g in groups]), params, 4)
    for row, (used, total) in want.items():
      batch = 1 if row == 'params' else 4
      got = report[row]
      assert got['used_bytes'] == 4 * batch * used, (groups, row)
      assert got['total_bytes'] == 4 * batch * total, (groups, row)
      assert got['padding_share'] == pytest.approx(1 - used / total)
    assert report['msgs'] == report['outs']  # One message per output.
    assert report['states']['used_bytes'] == 0  # No temporal stage.
  # A temporal stage: the top stage's cache of its 2 last inputs (2x2x8).
  spec, params = NETS['conv_temporal_chain']
  report = mesh.layout_report(
      mesh.place(spec, _mesh('2x4'), [[0], [1], [2], [3, 4]]), params, 4)
  assert report['states'] == {'used_bytes': 4 * 4 * 64,
                              'total_bytes': 4 * 4 * 4 * 64,
                              'padding_share': 0.75}


# -- The stage-sharded train state (state_sharding='stage'). -----------------

def _copy(tree):
  return jax.tree.map(jnp.array, tree)


def _three_steps_match_engine(mspec, opt, params, pstack, state, clip,
                              targets, mode):
  """Three ``train_step_sharded`` steps from ``(pstack, state)`` equal
  three ``engine.train_step`` steps from ``params``; returns ``pstack``."""
  spec = mspec.spec
  p_ref, s_ref = _copy(params), opt.init(params)
  for _ in range(3):
    pstack, state, out = mesh.train_step_sharded(
        mspec, opt, pstack, state, clip, targets, mode=mode)
    p_ref, s_ref, ref = engine.train_step(spec, opt, p_ref, s_ref, clip,
                                          targets, mode=mode)
  _close(mesh.unshard_tree(mspec, pstack), p_ref, rtol=1e-4, atol=1e-5)
  _close(mesh.unshard_tree(mspec, state), s_ref, rtol=1e-4, atol=1e-5)
  _close(out.metrics['loss'], ref.metrics['loss'], rtol=1e-4)
  return pstack


@pytest.mark.parametrize('mode,shape,opt', [
    # Global-norm clipping: one non-zero padded gradient (NaN here) would
    # turn every parameter NaN.
    ('sideways', '2x4', optax.chain(optax.clip_by_global_norm(0.5),
                                    optax.adamw(1e-2, weight_decay=0.1))),
    ('pipelined_bp', '1x8', optax.chain(optax.clip_by_global_norm(0.5),
                                        optax.adam(1e-2))),
    ('bp', '4x2', optax.sgd(0.1, momentum=0.9)),
])
def test_sharded_train_step_matches_engine(mode, shape, opt):
  spec, params = NETS['conv_skips']
  mspec = mesh.place(spec, _mesh(shape), params=params, pad_value=NAN)
  clip, targets = _data(spec)
  pstack = mesh.shard_tree(mspec, params)
  state = mesh.shard_tree(mspec, opt.init(params))
  assert pstack.sharding.spec[0] == 'stage'
  pstack = _three_steps_match_engine(mspec, opt, params, pstack, state, clip,
                                     targets, mode)
  # Padding stays exactly what it was: its gradient is zero (NaN stays NaN,
  # and never reached a used slot above).
  assert np.isnan(np.asarray(pstack)).sum() == np.isnan(np.asarray(
      mesh.shard_tree(mspec, params))).sum()


def test_sharded_state_round_trips_and_moves_between_mesh_shapes():
  spec, params = NETS['conv_temporal_chain']
  opt = optax.adam(1e-3)
  tree = opt.init(params)
  a = mesh.place(spec, _mesh('2x4'), params=params)
  b = mesh.place(spec, _mesh('4x2'), params=params)
  _close(mesh.unshard_tree(a, mesh.shard_tree(a, params)), params, 0, 0)
  moved = mesh.shard_tree(b, mesh.unshard_tree(a, mesh.shard_tree(a, tree)))
  _close(mesh.unshard_tree(b, moved), tree, 0, 0)


def _state_bytes_per_device(compiled, args) -> int:
  """Per-device argument bytes of ``args`` (params + optimizer state) as the
  compiled program holds them: its input shardings, one device's shards."""
  shardings = compiled.input_shardings[0]
  total = 0
  for x, s in zip(jax.tree.leaves(args), jax.tree.leaves(shardings)[:len(
      jax.tree.leaves(args))]):
    shape = s.shard_shape(x.shape)
    total += int(np.prod(shape)) * x.dtype.itemsize
  return total


def test_sharded_state_is_not_replicated_on_1x4():
  """Each device holds its own row of the packed params and of each Adam
  moment (the largest group's size, padding included), not the whole."""
  spec, params = NETS['conv_skips']
  m = mesh.make_mesh(1, 4, devices=jax.devices()[:4])
  mspec = mesh.place(spec, m, params=params)
  opt = optax.adam(1e-3)
  clip, targets = _data(spec)
  pstack = mesh.shard_tree(mspec, params)
  state = mesh.shard_tree(mspec, opt.init(params))
  compiled = mesh.train_step_sharded.lower(
      mspec, opt, pstack, state, clip, targets, mode='sideways').compile()
  whole = 3 * sum(x.nbytes for x in jax.tree.leaves(params))  # p, mu, nu.
  row = 3 * pstack.shape[1] * pstack.dtype.itemsize
  padding = 3 * 4 * (pstack.size - sum(
      x.size for x in jax.tree.leaves(params)))
  per_device = _state_bytes_per_device(compiled, (pstack, state))
  assert per_device <= row + 64  # (+ Adam's step count.)
  assert per_device <= whole / 4 + padding + 64, (per_device, whole, padding)
  # The row is the largest group's params: no device holds more than that.
  sizes = [sum(x.size for x in jax.tree.leaves(b)) for b in params['blocks']]
  sizes[-1] += sum(x.size for x in jax.tree.leaves(params['head']))
  largest = max(sum(sizes[l] for l in g) for g in mspec.groups)
  assert pstack.shape[1] == largest and largest < sum(sizes)
  # And the program's own argument bytes agree (clip, labels on top).
  extra = clip.nbytes + targets.nbytes
  assert compiled.memory_analysis().argument_size_in_bytes <= (
      per_device + extra + 1024)


def test_train_steps_donate_params_and_optimizer_state():
  spec, params = NETS['mlp_skips']
  opt = optax.adam(1e-3)
  clip, targets = _data(spec)
  for sharding in mesh.STATE_SHARDINGS:
    # A pad value no other test uses: this step compiles here, so XLA's
    # warning about a donated buffer it could not use would show.
    mspec = mesh.place(spec, _mesh('2x4'), params=params, pad_value=0.375,
                       state_sharding=sharding)
    pstack = mesh.shard_tree(mspec, params)
    state = mesh.shard_tree(mspec, opt.init(params))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      mesh.train_step_sharded(mspec, opt, pstack, state, clip, targets,
                              mode='sideways')
    # Donated and reused: XLA warns when a donated buffer finds no output.
    assert not [w for w in caught if 'donated' in str(w.message)], sharding
    assert pstack.is_deleted()
    assert all(x.is_deleted() for x in jax.tree.leaves(state)
               if x.shape == pstack.shape)
  # The training loop's step, on one device.
  from skipside import programs  # pylint: disable=g-import-not-at-top
  p, s = _copy(params), opt.init(params)
  programs.train_step(engine.LocalEngine(spec), opt, p, s, clip, targets,
                      None, mode='sideways', compute_dtype=jnp.float32,
                      update_every=None, flush=0, skip_nonfinite=False)
  assert all(x.is_deleted() for x in jax.tree.leaves((p, s)))
  # The convenience steps keep their inputs (users reuse them).
  p = _copy(params)
  engine.train_step(spec, opt, p, opt.init(p), clip, targets, mode='sideways')
  assert not any(x.is_deleted() for x in jax.tree.leaves(p))


# -- The evenly sharded train state (ZeRO: state_sharding='even'). -----------

def _flat_size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('mode,shape,name,groups', [
    ('sideways', '2x4', 'conv_skips', None),
    # Empty trailing groups: rows of zero parameters.
    ('bp', '1x8', 'mlp_skips', ((0,), (1, 2), (3,))),
    ('pipelined_bp', '4x2', 'conv_temporal_chain', None),
])
def test_even_train_state_matches_engine(mode, shape, name, groups):
  """Params and Adam state spread evenly over all devices (unpadded), each
  step gathering its rows and scattering the gradient back, train exactly
  as the single-device engine does; NaN on the layout's tail stays there."""
  spec, params = NETS[name]
  m = _mesh(shape)
  opt = optax.chain(optax.clip_by_global_norm(0.5),
                    optax.adamw(1e-2, weight_decay=0.1))
  mspec = mesh.place(spec, m, groups, params=params, pad_value=NAN,
                     state_sharding='even')
  clip, targets = _data(spec)
  pstack = mesh.shard_tree(mspec, params)
  state = mesh.shard_tree(mspec, opt.init(params))
  used = _flat_size(params)
  assert pstack.shape == (-(-used // m.size) * m.size,)
  assert {x.data.shape for x in pstack.addressable_shards} == {
      (pstack.size // m.size,)}  # An equal piece on every device.
  pstack = _three_steps_match_engine(mspec, opt, params, pstack, state, clip,
                                     targets, mode)
  flat = np.asarray(pstack)
  assert flat.size > used  # A tail to check (each of these nets has one).
  assert np.isfinite(flat[:used]).all() and np.isnan(flat[used:]).all()


def test_even_state_moves_between_layouts_and_mesh_shapes():
  spec, params = NETS['conv_temporal_chain']
  tree = optax.adam(1e-3).init(params)
  even = mesh.place(spec, _mesh('2x4'), params=params, pad_value=NAN,
                    state_sharding='even')
  stage = mesh.place(spec, _mesh('4x2'), params=params)
  _close(mesh.unshard_tree(even, mesh.shard_tree(even, params)), params, 0, 0)
  moved = mesh.shard_tree(stage, mesh.unshard_tree(
      even, mesh.shard_tree(even, tree)))
  _close(mesh.unshard_tree(stage, moved), tree, 0, 0)
  with pytest.raises(ValueError, match='state_sharding'):
    mesh.place(spec, _mesh('2x4'), params=params, state_sharding='data')


def test_even_state_is_a_quarter_per_device_on_1x4():
  """The default net's last stage holds most of its parameters, so the
  stage layout keeps that share on one device; the even layout keeps a
  quarter (plus rounding to the device count) on each, in the compiled
  train step's own input shardings."""
  spec, params = NETS['conv_skips']
  m = mesh.make_mesh(1, 4, devices=jax.devices()[:4])
  opt = optax.adam(1e-3)
  clip, targets = _data(spec)
  whole = 3 * 4 * _flat_size(params)  # p, mu, nu in float32.
  per_device = {}
  for sharding in mesh.STATE_SHARDINGS:
    mspec = mesh.place(spec, m, params=params, state_sharding=sharding)
    pstack = mesh.shard_tree(mspec, params)
    state = mesh.shard_tree(mspec, opt.init(params))
    compiled = mesh.train_step_sharded.lower(
        mspec, opt, pstack, state, clip, targets, mode='sideways').compile()
    per_device[sharding] = _state_bytes_per_device(compiled, (pstack, state))
  assert per_device['even'] <= whole / 4 + 3 * 4 * 4 + 64, (per_device, whole)
  assert per_device['stage'] > 0.5 * whole  # Stage 4's share, padded.


def test_even_state_gathers_rows_not_the_whole_vector():
  """Compile-only: a step's gather of its row from the even layout needs
  temporaries of about a row and two segments, not the whole vector (an
  all-gather of everything would be ``N`` per device)."""
  spec, params = network.split(models.mlp_net(
      (64,), 3, width=64, num_stages=8, rngs=nnx.Rngs(0)))
  m = _mesh('1x8')
  mspec = mesh.place(spec, m, params=params, state_sharding='even')
  flat = mesh.shard_tree(mspec, params)
  gather = jax.jit(lambda x: mesh._to_packed(mspec, x))  # pylint: disable=protected-access
  scatter = jax.jit(lambda x: mesh._from_packed(mspec, x))  # pylint: disable=protected-access
  rows = gather(flat)
  whole = flat.nbytes  # 8 rows of about N / 8 each.
  for fn, x in ((gather, flat), (scatter, rows)):
    temp = fn.lower(x).compile().memory_analysis().temp_size_in_bytes
    # Measured: 0.51 N for each (a buffer of a row and two segments, and
    # what one round adds to it); gathering the whole vector first: 1.0 N.
    assert temp < 0.75 * whole, (temp, whole)
  _close(mesh.unshard_tree(mspec, scatter(rows)), params, 0, 0)


@pytest.mark.parametrize('mode,sharding', [
    ('sideways', 'stage'), ('bp', 'stage'), ('sideways', 'even')])
def test_engines_share_one_interface(mode, sharding):
  """A runner written once against the engine interface (as the training
  loop and PGT are) gets the same results from the local engine and from a
  2x4 mesh engine on its sharded state, in either layout."""
  spec, params = NETS['conv_temporal_chain']
  clip, targets = _data(spec, frames=8)
  opt = optax.adam(1e-2)

  def runner(eng):
    p = eng.to_state(params)
    o = eng.to_state(opt.init(eng.to_tree(p)))
    p, o, out = eng.train_step(opt, p, o, clip, targets, mode=mode)

    @jax.jit
    def window(p, carry):
      return eng.window_grads(p, clip, targets, carry, mode=mode, start=0,
                              length=5, mask_fill=True,
                              compute_dtype=jnp.float32)
    loss, grads, win = window(p, eng.init_carry(p, clip, targets, mode))
    stream = eng.to_stream_carry(win.carry)
    again = eng.from_stream_carry(stream)
    fwd = eng.forward(p, clip, targets, mode=mode, carry=stream)
    return dict(params=eng.to_tree(p), opt=eng.to_tree(o),
                metrics=out.metrics, loss=loss, grads=eng.to_tree(grads),
                carry=stream, again=eng.to_stream_carry(again),
                predictions=fwd.predictions,
                fwd_carry=eng.to_stream_carry(fwd.carry))

  local = engine.LocalEngine(spec)
  on_mesh = mesh.MeshEngine(mesh.place(spec, _mesh('2x4'), params=params,
                                       pad_value=NAN,
                                       state_sharding=sharding))
  _close(runner(on_mesh), runner(local), rtol=1e-4, atol=1e-5)
  state = on_mesh.to_state(params)
  assert {x.data.shape for x in state.addressable_shards} == (
      {(1, state.shape[1])} if sharding == 'stage' else {(state.size // 8,)})
  like = on_mesh.batch_like((jax.ShapeDtypeStruct((2, 8, 16, 16, 1),
                                                  jnp.float32),), 4)[0]
  assert like.shape == (4, 8, 16, 16, 1) and like.sharding.spec[0] == 'data'
  with pytest.raises(ValueError, match='params=params'):
    mesh.MeshEngine(mesh.place(spec, _mesh('2x4')))


def test_exact_modes_keep_only_their_own_stages_residuals_per_device():
  """Compile-only: on a 1x4 mesh of 4 unequal stages, the exact modes'
  per-device temporary memory grows per frame by at most the largest
  stage's share of the single-device growth, plus a margin of 0.1 of it
  (measured: 0.27 of it against a share of 0.29; 1.0 before each device
  stopped keeping every branch's residuals)."""
  rngs = nnx.Rngs(0)
  layers = [stages.Conv(1, 8, stride=2, rngs=rngs),
            stages.Conv(8, 32, stride=2, rngs=rngs),
            stages.ResidualConv(32, 32, rngs=rngs),
            stages.Conv(32, 64, stride=2, rngs=rngs)]
  spec, params = network.split(network.Network(
      layers, stages.ClassifierHead(64, 4, rngs=rngs), frame_shape=(32, 32, 1),
      rngs=rngs))
  m = mesh.make_mesh(1, 4, devices=jax.devices()[:4])
  mspec = mesh.place(spec, m, groups=((0,), (1,), (2,), (3,)))
  sizes = [np.prod(s) for s in spec.out_shapes]
  share = max(sizes) / sum(sizes)

  def temp(fn, s, frames, mode):
    clip = jax.ShapeDtypeStruct((4, frames, 32, 32, 1), jnp.float32)
    labels = jax.ShapeDtypeStruct((4,), jnp.int32)
    return fn.lower(s, params, clip, labels, mode=mode).compile(
        ).memory_analysis().temp_size_in_bytes

  for mode in ('bp', 'pipelined_bp'):
    single = temp(engine.loss_and_grads, spec, 32, mode) - temp(
        engine.loss_and_grads, spec, 16, mode)
    per_device = temp(mesh.loss_and_grads, mspec, 32, mode) - temp(
        mesh.loss_and_grads, mspec, 16, mode)
    assert single > 0
    assert per_device <= (share + 0.1) * single, (mode, per_device, single)


def test_equal_networks_and_placements_compile_once():
  """Specs hash by value: rebuilding an equal network (a notebook rerun)
  reuses its compilations; a different one does not."""
  def build(seed):
    return network.split(models.mlp_net((6,), 3, width=8, num_stages=4,
                                        skips=((0, 2),),
                                        rngs=nnx.Rngs(seed)))
  (spec_a, params_a), (spec_b, params_b) = build(0), build(1)
  assert spec_a == spec_b and hash(spec_a) == hash(spec_b)
  assert spec_a != dataclasses.replace(spec_a, loss='mse')
  clip, targets = _data(spec_a)
  m = _mesh('2x4')
  before = mesh.loss_and_grads._cache_size()
  for spec, params in ((spec_a, params_a), (spec_b, params_b)):
    mspec = mesh.place(spec, m, params=params)
    mesh.loss_and_grads(mspec, params, clip, targets, mode='sideways')
  assert mesh.loss_and_grads._cache_size() == before + 1
  other = mesh.place(spec_a, m, groups=((0, 1), (2,), (3,)),
                     params=params_a)
  assert other != mspec
