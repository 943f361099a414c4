"""Progressive training (PGT): fragments with carried state.

What is compared, precisely:

- Forward, every mode, ``'last'`` policy, momentum 0, overlap 0 and 2:
  ``progressive.predict`` == ``engine.forward`` on the whole video: the final
  stream carry (buffers, temporal states, target FIFO, tick), the video's mean
  loss and accuracy, and the logits averaged over all valid ticks. (With
  overlap the fragments' new frames tile the video, so it is the same
  stream.)
- Gradients, ``bp`` / ``pipelined_bp``, ``truncate_gradients=False``,
  ``loss_weighting='mean'`` (so the objective is the video's mean loss):
  == ``engine.loss_and_grads`` on the whole video. ``sideways`` (whose
  messages cross fragment boundaries like any tick): the same, with
  ``mask_fill=False`` so every fragment has the same number of valid ticks
  and the rescaling by ticks is uniform (messages carry their fragment's
  loss weight into the next one).
- Truncated gradients (the default), every mode: == a Python loop of
  ``engine.loss_and_grads`` over the fragments with the carry passed on,
  gradients summed ('sum', PGT); ``step_per='fragment'`` == a loop of
  ``engine.train_step``.
- Cache policies ``last``/``avg``/``max`` with momentum 0.25 and overlap:
  == a plain reference written tick by tick (an unrolled jnp loop of the
  temporal convolution, checked against numpy values), its ensembles and
  its gradient (truncated and not).
- Compiled temp memory of one progressive step: 64 vs 512 frames within 5%;
  whole-video ``bp`` grows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from skipside import engine, network, progressive, stages
from skipside.data import transforms


def _close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def _conv_net():
  """Conv -> temporal -> conv (skip from 0) -> temporal; 8x8 frames."""
  rngs = nnx.Rngs(0)
  net = network.Network(
      [stages.Conv(1, 4, stride=2, rngs=rngs),
       stages.TemporalConv(4, rngs=rngs),
       stages.Conv(4, 8, stride=2, rngs=rngs),
       stages.TemporalConv(8, rngs=rngs)],
      stages.ClassifierHead(8, 3, rngs=rngs), frame_shape=(8, 8, 1),
      skips=[(0, 2)], rngs=rngs)
  return network.split(net)


SPEC, PARAMS = _conv_net()
VIDEO = jax.random.normal(jax.random.key(1), (2, 12, 8, 8, 1))
LABELS = jnp.array([0, 2])


def _opts(overlap=0, **kw):
  kw.setdefault('cache_policy', 'last')
  kw.setdefault('momentum', 0.0)
  return progressive.Options(fragment_frames=4, overlap=overlap, **kw)


# -- Exactness against the whole video. ----------------------------------------

@pytest.mark.parametrize('overlap', [0, 2])
@pytest.mark.parametrize('mode', engine.MODES)
def test_forward_equals_whole_video(mode, overlap):
  got = progressive.predict(SPEC, PARAMS, VIDEO, LABELS, mode=mode,
                            options=_opts(overlap))
  want, _ = engine.forward(SPEC, PARAMS, VIDEO, LABELS, mode=mode)
  _close(got.ticks, want.predictions)
  _close(got.output.metrics['loss'], want.metrics['loss'])
  _close(got.output.metrics['accuracy'], want.metrics['accuracy'])
  assert int(got.output.metrics['valid_ticks']) == int(
      want.metrics['valid_ticks'])
  assert int(got.output.metrics['fragments']) == (3 if overlap == 0 else 5)
  _close(got.output.carry, want.carry)


def test_fragments_layout_equals_video_layout():
  """Fragments as the pipeline cuts them (B, F, Tf, ...) == the whole video."""
  opts = _opts(2, cache_policy='avg', momentum=0.25)
  frags = transforms.split_fragments(np.asarray(VIDEO), 4, 2)
  assert frags.shape[:3] == (2, 5, 4)
  got = progressive.predict(SPEC, PARAMS, jnp.asarray(frags), LABELS,
                            mode='pipelined_bp', options=opts)
  want = progressive.predict(SPEC, PARAMS, VIDEO, LABELS, mode='pipelined_bp',
                             options=opts)
  _close(got, want)


@pytest.mark.parametrize('overlap', [0, 2])
@pytest.mark.parametrize('mode', ['bp', 'pipelined_bp'])
def test_untruncated_grads_equal_whole_video(mode, overlap):
  opts = _opts(overlap, truncate_gradients=False, loss_weighting='mean')
  loss, grads, out = progressive.loss_and_grads(
      SPEC, PARAMS, VIDEO, LABELS, mode=mode, options=opts)
  want_loss, want_grads, want = engine.loss_and_grads(
      SPEC, PARAMS, VIDEO, LABELS, mode=mode)
  _close(loss, want_loss)
  _close(grads, want_grads, rtol=1e-4, atol=1e-6)
  _close(out.carry, want.carry)


@pytest.mark.parametrize('overlap', [0, 2])
@pytest.mark.parametrize('mask_fill', [True, False, 'stages'])
def test_sideways_mean_grads_equal_whole_stream(mask_fill, overlap):
  """'mean' gives every tick its weight in the whole video (1 / valid ticks
  of the video), messages in flight across a boundary included: the default
  mask_fill masks 3 of fragment 0's 4 ticks, so per-fragment weights differ."""
  opts = _opts(overlap, loss_weighting='mean', mask_fill=mask_fill)
  loss, grads, out = progressive.loss_and_grads(
      SPEC, PARAMS, VIDEO, LABELS, mode='sideways', options=opts)
  want_loss, want_grads, want = engine.loss_and_grads(
      SPEC, PARAMS, VIDEO, LABELS, mode='sideways', mask_fill=mask_fill)
  _close(loss, want_loss)
  _close(out.metrics['loss'], want.metrics['loss'])
  _close(grads, want_grads, rtol=1e-4, atol=1e-6)
  _close(out.carry, want.carry)  # In-flight messages too.
  # Progressive evaluation takes the same options (the stage gates are a
  # gradient rule: its forward scores every tick).
  pred = progressive.predict(SPEC, PARAMS, VIDEO, LABELS, mode='sideways',
                             options=opts)
  assert np.isfinite(np.asarray(pred.ticks)).all()


@pytest.mark.parametrize('mode', engine.MODES)
def test_truncated_equals_loop_of_clips(mode):
  """PGT's default: each fragment's gradient stops at its carry; summed."""
  loss, grads, out = progressive.loss_and_grads(
      SPEC, PARAMS, VIDEO, LABELS, mode=mode, options=_opts(0))
  carry = engine.init_carry(SPEC, PARAMS, VIDEO, LABELS, mode)
  want_loss, want_grads = 0.0, jax.tree.map(jnp.zeros_like, PARAMS)
  for f in range(3):
    l, g, o = engine.loss_and_grads(SPEC, PARAMS, VIDEO[:, 4 * f:4 * f + 4],
                                    LABELS, mode=mode, carry=carry)
    want_loss += l
    want_grads = jax.tree.map(jnp.add, want_grads, g)
    carry = o.carry
  _close(loss, want_loss)
  _close(grads, want_grads, rtol=1e-4, atol=1e-6)
  _close(out.carry, carry)


def test_step_per_fragment_equals_loop_of_train_steps():
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(PARAMS)
  params, state, out = progressive.train_step(
      SPEC, optimizer, PARAMS, opt_state, VIDEO, LABELS, mode='sideways',
      options=_opts(0, step_per='fragment'))
  want_p, want_s = PARAMS, opt_state
  carry = engine.init_carry(SPEC, PARAMS, VIDEO, LABELS, 'sideways')
  for f in range(3):
    want_p, want_s, o = engine.train_step(
        SPEC, optimizer, want_p, want_s, VIDEO[:, 4 * f:4 * f + 4], LABELS,
        mode='sideways', carry=carry)
    carry = o.carry
  _close(params, want_p, rtol=1e-4, atol=1e-5)
  _close(out.carry, carry, rtol=1e-4, atol=1e-5)


def test_per_fragment_labels_follow_their_frames():
  """(B, F) labels == per-frame targets repeating each fragment's label,
  delayed through the pipeline like any per-frame target."""
  frag_labels = jnp.array([[0, 1, 2], [2, 2, 1]])
  per_frame = jnp.repeat(frag_labels, 4, axis=1)
  got = progressive.predict(SPEC, PARAMS, VIDEO, frag_labels,
                            mode='pipelined_bp', options=_opts(0))
  want, _ = engine.forward(SPEC, PARAMS, VIDEO, per_frame, mode='pipelined_bp')
  _close(got.output.metrics['loss'], want.metrics['loss'])
  _close(got.ticks, want.predictions)


# -- Cache policies against a plain reference. --------------------------------

C, K = 3, 4  # Channels, classes of the reference network.


def _ref_net():
  """Mlp -> TemporalConv(3) -> classifier: the temporal stage reads the Mlp
  features of the frame (bp) or of the frame one tick before (pipelined)."""
  rngs = nnx.Rngs(3)
  net = network.Network([stages.Mlp(C, [C], rngs=rngs),
                         stages.TemporalConv(C, rngs=rngs)],
                        stages.ClassifierHead(C, K, rngs=rngs),
                        frame_shape=(C,), rngs=rngs)
  return network.split(net)


def _reference(params, video, labels, *, tf, overlap, policy, momentum,
               delay, truncate=True, xp=jnp):
  """PGT on the reference net, one tick at a time (no engine, no scan).

  ``truncate``: caches and the pipeline buffers that cross a boundary are
  constants. Returns ``(objective = sum of fragment losses, per-fragment
  predictions, per-fragment valid ticks, per-fragment losses)``.
  """
  mlp = params['blocks'][0]['stage']['layers'][0]
  taps = params['blocks'][1]['stage']['taps']
  head = params['head']['fc']
  b, t_total, c = video.shape
  # The temporal stage's input at tick t: Mlp features of frame t - delay.
  u = [xp.zeros((b, c)) if t < delay else
       xp.maximum(video[:, t - delay] @ mlp['kernel'] + mlp['bias'], 0)
       for t in range(t_total)]
  step = tf - overlap
  frags = [list(range(tf))]
  while frags[-1][-1] + 1 < t_total:
    s = frags[-1][-1] + 1
    frags.append(list(range(s, s + step)))
  assert frags[-1][-1] == t_total - 1
  window = xp.zeros((b, 2, c))
  previous = None
  preds, counts, losses = [], [], []
  for f, ticks in enumerate(frags):
    if f > 0:
      seen = xp.stack([u[t] for t in frags[f - 1]])
      if policy == 'last':
        cache = window
      else:
        pooled = seen.mean(0) if policy == 'avg' else seen.max(0)
        cache = xp.stack([pooled, pooled], axis=1)
      if previous is not None:
        cache = (1 - momentum) * cache + momentum * previous
      if truncate:
        cache = jax.lax.stop_gradient(cache)
      window = previous = cache
    ps, ls = [], []
    for t in ticks:
      x = u[t]
      if truncate and f > 0 and t - ticks[0] < delay:
        x = jax.lax.stop_gradient(x)  # A pipeline buffer of fragment f-1.
      stacked = xp.concatenate([window[:, 0], window[:, 1], x], axis=-1)
      y = x + xp.maximum(stacked @ taps['kernel'] + taps['bias'], 0)
      window = xp.stack([window[:, 1], x], axis=1)
      if t < delay:  # Pipeline fill: masked.
        continue
      logits = y @ head['kernel'] + head['bias']
      ps.append(logits)
      logp = jax.nn.log_softmax(logits)
      ls.append(-xp.take_along_axis(logp, labels[:, None], 1).mean())
    preds.append(sum(ps) / len(ps))
    losses.append(sum(ls) / len(ls))
    counts.append(len(ps))
  return sum(losses), preds, counts, losses


def test_fragment_cache_matches_numpy():
  rng = np.random.default_rng(0)
  window, previous = rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 2, 3))
  pooled = rng.normal(size=(2, 3))
  for policy, base in [('last', window),
                       ('avg', np.repeat(pooled[:, None], 2, 1)),
                       ('max', np.repeat(pooled[:, None], 2, 1))]:
    got = stages.fragment_cache(jnp.asarray(window), policy=policy,
                                momentum=0.25, pooled=jnp.asarray(pooled),
                                previous=jnp.asarray(previous))
    np.testing.assert_allclose(got, 0.75 * base + 0.25 * previous, rtol=1e-6)
  with pytest.raises(ValueError, match='unknown'):
    stages.fragment_cache(jnp.asarray(window), policy='min', momentum=0.0)


@pytest.mark.parametrize('mode,delay', [('bp', 0), ('pipelined_bp', 1)])
@pytest.mark.parametrize('policy', progressive.CACHE_POLICIES)
def test_cache_policies_match_reference(policy, mode, delay):
  spec, params = _ref_net()
  video = jax.random.normal(jax.random.key(5), (2, 9, C))
  labels = jnp.array([1, 3])
  opts = progressive.Options(fragment_frames=3, overlap=1,
                             cache_policy=policy, momentum=0.25)
  got = progressive.predict(spec, params, video, labels, mode=mode,
                            options=opts)
  # The reference in numpy values (float64), then the ensembles by hand.
  np_params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  _, preds, counts, losses = _reference(
      np_params, np.asarray(video, np.float64), np.asarray(labels), tf=3,
      overlap=1, policy=policy, momentum=0.25, delay=delay, truncate=False,
      xp=np)
  preds = np.stack(preds)
  assert len(preds) == 4
  _close(got.mean, preds.mean(0), rtol=1e-5, atol=1e-5)
  _close(got.max, preds.max(0), rtol=1e-5, atol=1e-5)
  _close(got.last, preds[-1], rtol=1e-5, atol=1e-5)
  w = np.asarray(counts, np.float64) / sum(counts)
  _close(got.ticks, np.einsum('f,fbk->bk', w, preds), rtol=1e-5, atol=1e-5)
  _close(got.output.metrics['loss'], np.dot(w, losses), rtol=1e-5, atol=1e-6)
  # The cache policy changed something (it is not the plain stream).
  if policy != 'last':
    stream, _ = engine.forward(spec, params, video, labels, mode=mode)
    assert np.abs(np.asarray(got.ticks - stream.predictions)).max() > 1e-4


@pytest.mark.parametrize('truncate', [True, False])
@pytest.mark.parametrize('policy,mode,delay', [
    ('avg', 'bp', 0), ('max', 'bp', 0), ('last', 'pipelined_bp', 1)])
def test_cache_policy_gradients_match_reference(policy, mode, delay, truncate):
  spec, params = _ref_net()
  video = jax.random.normal(jax.random.key(6), (2, 9, C))
  labels = jnp.array([0, 2])
  opts = progressive.Options(fragment_frames=3, overlap=1,
                             cache_policy=policy, momentum=0.25,
                             truncate_gradients=truncate)
  loss, grads, _ = progressive.loss_and_grads(spec, params, video, labels,
                                              mode=mode, options=opts)
  want_loss, want_grads = jax.value_and_grad(
      lambda p: _reference(p, video, labels, tf=3, overlap=1, policy=policy,
                           momentum=0.25, delay=delay, truncate=truncate)[0])(
                               params)
  _close(loss, want_loss, rtol=1e-5)
  _close(grads, want_grads, rtol=1e-4, atol=1e-6)


def test_untruncated_gradient_reaches_earlier_fragments():
  spec, params = _ref_net()
  video = jax.random.normal(jax.random.key(7), (2, 9, C))
  labels = jnp.array([0, 2])
  kw = dict(fragment_frames=3, overlap=1, cache_policy='avg', momentum=0.25)
  _, g_trunc, _ = progressive.loss_and_grads(
      spec, params, video, labels, mode='bp',
      options=progressive.Options(**kw))
  _, g_full, _ = progressive.loss_and_grads(
      spec, params, video, labels, mode='bp',
      options=progressive.Options(**kw, truncate_gradients=False))
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_trunc,
                      g_full)
  assert diff['blocks'][0]['stage']['layers'][0]['kernel'] > 1e-5



# -- Evaluation ensembles. ----------------------------------------------------

def test_evaluate_ensembles(monkeypatch):
  opts = _opts(0)
  batches = [{'video': VIDEO, 'label': LABELS,
              'mask': np.array([True, False])}] * 2
  passes = []  # The real predict, counted: one PGT pass per batch.
  real = progressive.predict
  monkeypatch.setattr(progressive, 'predict',
                      lambda *a, **k: passes.append(1) or real(*a, **k))
  got = progressive.evaluate_fragments(
      SPEC, PARAMS, batches, mode='bp', options=opts,
      ensembles=('full', 'mean', 'max', 'last'))
  monkeypatch.undo()
  assert len(passes) == 2
  assert got['eval/clips'] == 2
  preds = progressive.predict(SPEC, PARAMS, VIDEO, LABELS, mode='bp',
                              options=opts)
  full, _ = engine.forward(SPEC, PARAMS, VIDEO, LABELS, mode='bp')
  for name, p in [('full', full.predictions), ('mean', preds.mean),
                  ('max', preds.max), ('last', preds.last)]:
    want = float(np.asarray(p).argmax(-1)[0] == int(LABELS[0]))
    assert got[f'eval/accuracy_{name}'] == want, name
  # Ensembles really differ from one another on this video.
  assert not np.allclose(preds.mean, preds.max)


# -- Memory: one fragment's, whatever the video length. -----------------------

def _temp_bytes(fn, *args, **kw) -> int:
  return int(fn.lower(*args, **kw).compile().memory_analysis()
             .temp_size_in_bytes)


def test_compiled_memory_is_one_fragments():
  optimizer = optax.sgd(0.1)
  opt_state = jax.eval_shape(optimizer.init, PARAMS)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32)
  opts = progressive.Options(fragment_frames=8, cache_policy='avg')
  prog, whole = {}, {}
  for frames in (64, 512):
    video = jax.ShapeDtypeStruct((2, frames, 8, 8, 1), jnp.float32)
    prog[frames] = _temp_bytes(progressive.train_step, SPEC, optimizer,
                               PARAMS, opt_state, video, labels, mode='bp',
                               options=opts)
    whole[frames] = _temp_bytes(engine.loss_and_grads, SPEC, PARAMS, video,
                                labels, mode='bp')
  assert abs(prog[512] / prog[64] - 1) < 0.05, prog
  assert whole[512] > 4 * whole[64], whole
  assert prog[512] < whole[512] / 10, (prog, whole)


# -- Options. -----------------------------------------------------------------

def test_options_are_validated():
  with pytest.raises(ValueError, match='overlap'):
    progressive.Options(fragment_frames=4, overlap=4)
  with pytest.raises(ValueError, match='cache_policy'):
    progressive.Options(fragment_frames=4, cache_policy='min')
  with pytest.raises(ValueError, match="step_per='video'"):
    progressive.Options(fragment_frames=4, truncate_gradients=False,
                        step_per='fragment')
  with pytest.raises(ValueError, match='does not split'):
    progressive.Options(fragment_frames=4, overlap=1).num_fragments(12)
  assert progressive.Options(fragment_frames=8, overlap=1).num_fragments(
      36) == 5  # PGT's 36 frames = 5 fragments of 8 with 1 overlap.


# -- The mesh engine. ---------------------------------------------------------

@pytest.mark.parametrize('mode,policy,truncate,sharding', [
    ('sideways', 'avg', True, 'stage'),
    # Untruncated: the gradient flows back through the gather of the rows.
    ('bp', 'max', False, 'even')])
def test_mesh_equals_single_device(mode, policy, truncate, sharding):
  """The same progressive gradient on a 2x2 ('data', 'stage') mesh engine,
  on its sharded state (NaN padding): the pooled spec is placed with the
  same groups by the engine itself."""
  from skipside import mesh
  opts = _opts(2, cache_policy=policy, momentum=0.25,
               truncate_gradients=truncate)
  eng = mesh.MeshEngine(mesh.place(SPEC, mesh.make_mesh(2, 2), params=PARAMS,
                                   pad_value=float('nan'),
                                   state_sharding=sharding))
  loss, grads, out = progressive.loss_and_grads(
      eng, eng.to_state(PARAMS), VIDEO, LABELS, mode=mode, options=opts)
  want_loss, want_grads, want = progressive.loss_and_grads(
      SPEC, PARAMS, VIDEO, LABELS, mode=mode, options=opts)
  _close(loss, want_loss)
  assert grads.shape == eng.to_state(PARAMS).shape  # The state's layout.
  _close(eng.to_tree(grads), want_grads, rtol=1e-4, atol=1e-6)
  _close(out.metrics, want.metrics)
  pooled = eng.with_spec(progressive.pooled_spec(SPEC, policy))
  _close(pooled.to_stream_carry(out.carry), want.carry)
  with pytest.raises(TypeError, match='MeshEngine'):  # A bare MeshSpec.
    progressive.loss_and_grads(mesh.place(SPEC, mesh.make_mesh(2, 2)), PARAMS,
                               VIDEO, LABELS, mode=mode, options=opts)


def test_mesh_train_step_on_sharded_state():
  """PGT's step per fragment with Adam on the mesh's evenly sharded params
  and optimizer state equals the single-device step."""
  from skipside import mesh
  opts = _opts(2, cache_policy='avg', momentum=0.25, step_per='fragment')
  optimizer = optax.adam(1e-2)
  m = mesh.make_mesh(1, 4)
  eng = mesh.MeshEngine(mesh.place(SPEC, m, params=PARAMS,
                                   pad_value=float('nan'),
                                   state_sharding='even'))
  opt_state = optimizer.init(PARAMS)
  pstack, ostate, out = progressive.train_step(
      eng, optimizer, eng.to_state(PARAMS), eng.to_state(opt_state), VIDEO,
      LABELS, mode='sideways', options=opts)
  want_params, want_state, want = progressive.train_step(
      SPEC, optimizer, PARAMS, opt_state, VIDEO, LABELS, mode='sideways',
      options=opts)
  assert {x.data.shape for x in pstack.addressable_shards} == {
      (pstack.size // m.size,)}  # Never replicated.
  _close(eng.to_tree(pstack), want_params, rtol=1e-4, atol=1e-6)
  _close(eng.to_tree(ostate), want_state, rtol=1e-4, atol=1e-6)
  _close(out.metrics, want.metrics)


# -- The training loop. -------------------------------------------------------

def test_train_loop_progressive(tmp_path):
  from experiments.configs import default
  from skipside import optim, train
  c = default.get_config('tiny')
  c.data.data_dir = str(tmp_path / 'tfds')
  c.mode = 'bp'
  c.model.stages = 'conv:4:2,tconv,conv:8:2,tconv'
  c.model.skips = ()
  c.progressive.enabled = True
  c.progressive.fragment_frames = 4
  c.progressive.overlap = 2  # 6 frames: fragments [0, 4), [2, 6).
  c.progressive.cache_policy = 'avg'
  c.progressive.step_per = 'fragment'  # 2 optax updates per training step.
  c.train.num_steps = 2
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  summary = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert summary['step'] == 2
  assert summary['train/fragments'] == 2
  assert np.isfinite(summary['train/loss'])
  assert 'eval/accuracy' in summary
  # Step 2 used the schedule's rate of step 1 (the peak after a 1-step
  # warm-up), not that of the 3rd optax update (0: past the cosine's end).
  want = float(optim.learning_rate_schedule(c)(1))
  assert want > 0
  np.testing.assert_allclose(summary['train/learning_rate'], want, rtol=1e-6)
  c.progressive.overlap = 1  # 6 frames do not split into 4 with overlap 1.
  with pytest.raises(ValueError, match='does not split'):
    train.train_and_evaluate(c, str(tmp_path / 'run2'))
