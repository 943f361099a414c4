"""Sub-batch normalization: the functional core, the stage, population
statistics for evaluation, and the training loop with multigrid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from skipside import batchnorm, checkpoints, engine, evaluation, mesh
from skipside import sub_batch
from skipside import config as config_lib
from skipside import network, stages

def test_sub_batch_moments_and_merge_against_a_plain_loop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, 3, 5, 4)).astype(np.float32) * np.arange(1, 5)
  means, variances = sub_batch.sub_batch_moments(x, base_size=8)
  assert means.shape == variances.shape == (3, 4)
  for j in range(3):  # Interleaved groups: examples j, j + 3, ...
    group = x[j::3].reshape(-1, 4)
    np.testing.assert_allclose(means[j], group.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variances[j], group.var(0), rtol=1e-4)
  mean, var = sub_batch.merge_moments(means, variances)
  np.testing.assert_allclose(mean, x.reshape(-1, 4).mean(0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(var, x.reshape(-1, 4).var(0), rtol=1e-4)
  y = np.asarray(sub_batch.sub_batch_norm(x, base_size=8))
  for j in range(3):
    g = x[j::3]
    want = (g - g.reshape(-1, 4).mean(0)) / np.sqrt(
        g.reshape(-1, 4).var(0) + 1e-5)
    np.testing.assert_allclose(y[j::3], want, rtol=1e-4, atol=1e-4)
  # A batch no larger than the base size is one group: plain batch norm.
  for b in (8, 5):
    m1, v1 = sub_batch.sub_batch_moments(x[:b], base_size=8)
    np.testing.assert_allclose(m1, [x[:b].reshape(-1, 4).mean(0)], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(v1, [x[:b].reshape(-1, 4).var(0)], rtol=1e-4)


def _net(base_size=4):
  rngs = nnx.Rngs(0)
  net = network.Network(
      [stages.Conv(1, 4, stride=2, norm_base_size=base_size, rngs=rngs),
       stages.TemporalConv(4, rngs=rngs),
       stages.Conv(4, 8, stride=2, norm_base_size=base_size, rngs=rngs)],
      stages.ClassifierHead(8, 3, rngs=rngs), frame_shape=(8, 8, 1),
      skips=[(0, 2)], rngs=rngs)
  return network.split(net)


CLIP = jax.random.normal(jax.random.key(1), (8, 4, 8, 8, 1))
LABELS = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])


def test_stage_trains_on_sub_batch_statistics_and_no_gradient_reaches_them():
  layer = stages.SubBatchNorm(3, base_size=4)
  layer.scale[...] = jnp.array([1.0, 2.0, 0.5])
  layer.bias[...] = jnp.array([0.0, 1.0, -1.0])
  x = jax.random.normal(jax.random.key(0), (8, 5, 5, 3)) * 3 + 1
  want = (np.asarray(sub_batch.sub_batch_norm(x, 4)) * [1.0, 2.0, 0.5]
          + [0.0, 1.0, -1.0])
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
  spec, params = _net()
  _, grads, _ = engine.loss_and_grads(spec, params, CLIP, LABELS, mode='bp')
  norm = grads['blocks'][0]['stage']['norm']
  for name in ('mean', 'var', 'ready'):
    assert not np.any(np.asarray(norm[name]))
  assert np.any(np.asarray(norm['scale']))  # The affine part does learn.


def test_population_statistics_merge_every_sub_batch_of_every_frame():
  spec, params = _net()
  clips = [CLIP, 2 * CLIP + 1]
  ev = batchnorm.population_statistics(spec, params, clips)
  # Reference: stage 0's conv output for every frame, sub-batch moments of
  # each (interleaved groups of 4 -> 2 groups), merged by the rule.
  conv = nnx.merge(spec.block_defs[0], params['blocks'][0]).stage.conv
  means, variances = [], []
  for clip in clips:
    for t in range(clip.shape[1]):
      y = np.asarray(conv(clip[:, t]))
      for j in range(2):
        g = y[j::2].reshape(-1, 4)
        means.append(g.mean(0))
        variances.append(g.var(0))
  means, variances = np.stack(means), np.stack(variances)
  want_mean = means.mean(0)
  want_var = variances.mean(0) + ((means - want_mean) ** 2).mean(0)
  got = ev['blocks'][0]['stage']['norm']
  np.testing.assert_allclose(got['mean'], want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got['var'], want_var, rtol=1e-4, atol=1e-5)
  assert float(got['ready']) == 1.0
  assert float(ev['blocks'][2]['stage']['norm']['ready']) == 1.0
  # Training params are untouched; evaluation now uses the stored values:
  # one example's prediction no longer depends on the rest of its batch.
  assert float(params['blocks'][0]['stage']['norm']['ready']) == 0.0
  full, _ = engine.forward(spec, ev, CLIP, LABELS, mode='bp')
  half, _ = engine.forward(spec, ev, CLIP[:4], LABELS[:4], mode='bp')
  np.testing.assert_allclose(full.predictions[:4], half.predictions,
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='at least one clip'):
    batchnorm.population_statistics(spec, params, [])


def test_statistics_read_uint8_clips_as_the_engines_do():
  """A uint8 clip is scaled to [0, 1] frame by frame by every engine
  (``engine.read_frame``); its statistics must be those of that input."""
  spec, params = _net()
  raw = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, CLIP.shape), jnp.uint8)
  got = batchnorm.population_statistics(spec, params, [raw])
  want = batchnorm.population_statistics(
      spec, params, [raw.astype(jnp.float32) / 255])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), got, want)


def test_uneven_batch_names_the_sizes():
  with pytest.raises(ValueError, match='batch 12 does not split into '
                     'sub-batches of 8'):
    sub_batch.sub_batch_moments(jnp.ones((12, 3)), 8)


@pytest.mark.parametrize('mode', ['pipelined_bp', 'sideways'])
def test_mesh_engine_equals_single_device(mode):
  spec, params = _net()
  m = mesh.make_mesh(1, 3)
  mspec = mesh.place(spec, m, [[0], [1], [2]])
  _, g_one, out_one = engine.loss_and_grads(spec, params, CLIP, LABELS,
                                            mode=mode)
  _, g_mesh, out_mesh = mesh.loss_and_grads(mspec, params, CLIP, LABELS,
                                            mode=mode)
  np.testing.assert_allclose(out_mesh.metrics['loss'],
                             out_one.metrics['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_mesh), jax.tree.leaves(g_one)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('on_mesh', [False, True])
def test_multigrid_training_loop_with_sub_batch_norm(tmp_path, on_mesh):
  """convbn stages under multigrid: batches of 4..64 clips, statistics over
  groups of 4, evaluation on population statistics, nothing compiled in the
  loop; on one device and on a 2 x 2 mesh."""
  from experiments.configs import multigrid as mg_config  # pylint: disable=g-import-not-at-top
  from skipside import train  # pylint: disable=g-import-not-at-top
  c = mg_config.get_config('tiny,bp')
  c.data.data_dir = str(tmp_path / 'tfds')
  c.model.stages = 'convbn:4:2,convbn:8:2,res:8'
  c.model.norm_base_size = 4
  if on_mesh:
    c.mesh.data, c.mesh.stage = 2, 2
    c.model.norm_base_size = 2  # The base batch per device.
  c.eval.norm_batches = 2
  summary = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert summary['compilations_in_loop'] == 0
  assert np.isfinite(summary['train/loss'])
  # The loop's evaluation (buckets compiled ahead, on the mesh its sharded
  # forward) against a plain one of the last checkpoint: population
  # statistics over the first training batches, then engine.forward.
  want = _plain_eval(c, str(tmp_path / 'run'))
  assert summary['eval/clips'] == want['clips']
  assert summary['eval/accuracy'] == pytest.approx(want['accuracy'])
  assert summary['eval/loss'] == pytest.approx(want['loss'], rel=1e-4)
  again = evaluation.evaluate_workdir(str(tmp_path / 'run'))
  assert again['eval/accuracy'] == pytest.approx(summary['eval/accuracy'])


def _plain_eval(c, workdir):
  """Eval loss, accuracy and clips of ``workdir``'s latest checkpoint,
  computed without the loop: ``c.eval.norm_batches`` training batches for
  the statistics, ``c.eval.max_batches`` eval batches, one device."""
  from skipside import data as data_lib  # pylint: disable=g-import-not-at-top
  data_config = config_lib.data_config(c)
  it = data_lib.make_iterator(data_config, train=True)
  clips = [next(it)['video'] for _ in range(c.eval.norm_batches)]
  it.close()
  it = data_lib.make_eval_iterator(data_config)
  spec, _, state = checkpoints.init_state(c, it.info)
  ckpt = checkpoints.Checkpointer(workdir, c.train.keep_checkpoints)
  params = ckpt.restore(state)[0].params
  ckpt.close()
  params = batchnorm.population_statistics(spec, params, clips)
  loss, correct, n = 0.0, 0, 0
  for batch in (next(it) for _ in range(c.eval.max_batches)):
    out, _ = engine.forward(spec, params, batch['video'], batch['label'],
                            mode=c.mode)
    mask = np.asarray(batch['mask'])
    assert mask.all()  # Full batches: the batch mean loss is the clips'.
    pred = np.asarray(out.predictions).argmax(-1)
    correct += int((pred == np.asarray(batch['label'])).sum())
    loss += float(out.metrics['loss']) * len(mask)
    n += len(mask)
  it.close()
  return {'loss': loss / n, 'accuracy': correct / n, 'clips': n}


def test_config_errors_name_the_batch_that_does_not_split():
  from experiments.configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config('tiny')
  c.model.stages = 'convbn:4:2,conv:8:2'
  c.model.skips = ()
  c.model.norm_base_size = 8
  c.data.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match=r'config.data.batch_size: 12 '
                     'does not split into sub-batches of '
                     r'config.model.norm_base_size=8'):
    config_lib.validate_config(c)
  c.data.batch_size = 16
  config_lib.validate_config(c)


def test_population_statistics_with_a_batch_that_does_not_split():
  """Eval statistics group the whole batch: any batch size works."""
  spec, params = _net(base_size=4)
  ev = batchnorm.population_statistics(spec, params, [CLIP[:6]])
  conv = nnx.merge(spec.block_defs[0], params['blocks'][0]).stage.conv
  y = np.stack([np.asarray(conv(CLIP[:6, t])) for t in range(4)])
  np.testing.assert_allclose(ev['blocks'][0]['stage']['norm']['mean'],
                             y.reshape(-1, 4).mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ev['blocks'][0]['stage']['norm']['var'],
                             y.reshape(-1, 4).var(0), rtol=1e-4, atol=1e-5)
