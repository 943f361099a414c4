"""Long clips in chunks (``skipside.streaming``) against the whole clip.

Oracle: ``engine.train_step`` on the whole clip, one device. The chunked
step (one program call per chunk, the carry passed on, gradients summed,
one update) must give the same params, optimizer state, metrics and final
carry: on one device and on meshes (1x4, 2x2), with a flush, with every
fill rule, clip and per-frame targets, a continued stream, a temporal
stage and a skip edge in the net.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from experiments.configs import default
from flax import nnx

from skipside import config as config_lib
from skipside import engine, evaluation, mesh, network, stages, streaming
from skipside import train


def _close(a, b, rtol=2e-5, atol=2e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def _net():
  """Conv -> temporal -> conv (skip from 0) -> conv; 8x8 frames."""
  rngs = nnx.Rngs(0)
  net = network.Network(
      [stages.Conv(1, 4, stride=2, rngs=rngs),
       stages.TemporalConv(4, rngs=rngs),
       stages.Conv(4, 8, stride=2, rngs=rngs),
       stages.Conv(8, 8, rngs=rngs)],
      stages.ClassifierHead(8, 3, rngs=rngs), frame_shape=(8, 8, 1),
      skips=[(0, 2)], rngs=rngs)
  return network.split(net)


SPEC, PARAMS = _net()
VIDEO = np.asarray(jax.random.normal(jax.random.key(1), (4, 16, 8, 8, 1)))
LABELS = np.array([0, 2, 1, 2], np.int32)
FRAME_LABELS = np.asarray(jax.random.randint(jax.random.key(2), (4, 16), 0,
                                             3), np.int32)
OPTIMIZER = optax.adam(1e-2)


def _whole(targets, *, carry=None, flush=0, mask_fill=True):
  return engine.train_step(SPEC, OPTIMIZER, PARAMS, OPTIMIZER.init(PARAMS),
                           jnp.asarray(VIDEO), jnp.asarray(targets),
                           mode='sideways', carry=carry, flush=flush,
                           mask_fill=mask_fill)


def _copy(tree):  # The chunked step donates its params and state.
  return jax.tree.map(jnp.array, tree)


@pytest.mark.parametrize('mask_fill,flush,per_frame', [
    (True, 0, False), (True, 3, True), ('stages', 2, False),
    (False, 0, True)])
def test_chunked_equals_whole_clip(mask_fill, flush, per_frame):
  targets = FRAME_LABELS if per_frame else LABELS
  want = _whole(targets, flush=flush, mask_fill=mask_fill)
  step = streaming.ChunkedStep(engine.LocalEngine(SPEC), OPTIMIZER,
                               mode='sideways', chunk_frames=4, flush=flush,
                               mask_fill=mask_fill)
  got = step(_copy(PARAMS), OPTIMIZER.init(PARAMS), VIDEO, targets)
  _close(got[0], want[0], rtol=1e-4, atol=1e-6)  # Params after Adam.
  _close(got[1], want[1], rtol=1e-4, atol=1e-6)
  for key in ('loss', 'accuracy', 'valid_ticks'):
    _close(got[2].metrics[key], want[2].metrics[key])
  _close(got[2].predictions, want[2].predictions)
  _close(got[2].carry, want[2].carry)  # In-flight messages too.


def test_a_continued_stream_is_the_same():
  """A second clip continues the first one's carry, chunked or whole."""
  first = _whole(LABELS)
  want = _whole(LABELS, carry=first[2].carry)
  step = streaming.ChunkedStep(engine.LocalEngine(SPEC), OPTIMIZER,
                               mode='sideways', chunk_frames=8)
  got = step(_copy(PARAMS), OPTIMIZER.init(PARAMS), VIDEO, LABELS,
             first[2].carry)
  _close(got[0], want[0], rtol=1e-4, atol=1e-6)
  _close(got[2].carry, want[2].carry)
  _close(got[2].metrics['loss'], want[2].metrics['loss'])


@pytest.mark.parametrize('shape', [(1, 4), (2, 2)])
def test_chunked_on_a_mesh_equals_one_device(shape):
  m = mesh.make_mesh(*shape, devices=jax.devices()[:4])
  eng = mesh.MeshEngine(mesh.place(SPEC, m, params=PARAMS))
  want = _whole(LABELS, flush=1)
  step = streaming.ChunkedStep(eng, OPTIMIZER, mode='sideways',
                               chunk_frames=4, flush=1)
  params, opt_state, out = step(eng.to_state(PARAMS),
                                eng.to_state(OPTIMIZER.init(PARAMS)), VIDEO,
                                LABELS)
  _close(eng.to_tree(params), want[0], rtol=1e-4, atol=1e-6)
  _close(out.metrics['loss'], want[2].metrics['loss'])
  _close(out.carry, want[2].carry)


def test_chunks_are_refused_by_name():
  step = streaming.ChunkedStep(engine.LocalEngine(SPEC), OPTIMIZER,
                               mode='bp', chunk_frames=4)
  with pytest.raises(ValueError, match="not 'bp'"):
    step(PARAMS, OPTIMIZER.init(PARAMS), VIDEO, LABELS)
  step = streaming.ChunkedStep(engine.LocalEngine(SPEC), OPTIMIZER,
                               mode='sideways', chunk_frames=5)
  with pytest.raises(ValueError, match='16 frames does not split into '
                     'chunks of 5'):
    step(PARAMS, OPTIMIZER.init(PARAMS), VIDEO, LABELS)


def test_device_arguments_do_not_grow_with_the_clip():
  """The chunk programs are the same for 16 and 64 frames: two compiles
  (the first chunk's, the others'), the chunk their only frames (a chunk
  length no other test uses)."""
  eng = engine.LocalEngine(SPEC)
  step = streaming.ChunkedStep(eng, OPTIMIZER, mode='sideways',
                               chunk_frames=2)
  programs = (streaming.first_chunk, streaming.next_chunk)
  before = [p._cache_size() for p in programs]
  long_video = np.concatenate([VIDEO] * 4, axis=1)
  step(_copy(PARAMS), OPTIMIZER.init(PARAMS), VIDEO, LABELS)
  step(_copy(PARAMS), OPTIMIZER.init(PARAMS), long_video, LABELS)
  assert [p._cache_size() for p in programs] == [n + 1 for n in before]


# -- In the training loop (config.train.chunk_frames). ------------------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _tiny(data_dir, **overrides):
  c = default.get_config('tiny')
  c.data.data_dir = data_dir
  c.train.flush = 2
  c.update_from_flattened_dict(overrides)
  return c


def _params(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  got = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  mngr.close()
  return got.state['params']


@pytest.mark.parametrize('base, overrides', [
    ({}, {'train.chunk_frames': 3}),
    ({}, {'train.chunk_frames': 2, 'mesh.stage': 2}),
    # A stream carried from clip to clip (and through the checkpoints).
    ({'train.stream': True, 'train.flush': 0}, {'train.chunk_frames': 3})])
def test_training_loop_in_chunks_equals_whole_clips(tmp_path, data_dir,
                                                     base, overrides):
  want = train.train_and_evaluate(_tiny(data_dir, **base),
                                  str(tmp_path / 'whole'))
  got = train.train_and_evaluate(_tiny(data_dir, **base, **overrides),
                                 str(tmp_path / 'chunked'))
  assert got['step'] == want['step'] == 6
  _close(_params(str(tmp_path / 'chunked')), _params(str(tmp_path / 'whole')),
         rtol=1e-4, atol=1e-6)
  for key in ('train/loss', 'eval/loss', 'eval/accuracy'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4)
  assert got['compilations_in_loop'] == 0
  # launch.eval's path reloads the checkpoint and evaluates in chunks too.
  again = evaluation.evaluate_workdir(str(tmp_path / 'chunked'))
  np.testing.assert_allclose(again['eval/loss'], want['eval/loss'], rtol=1e-4)


@pytest.mark.parametrize('overrides, message', [
    ({'train.chunk_frames': 4}, 'config.train.chunk_frames: 4 does not divide '
     'config.data.num_frames=6'),
    ({'train.chunk_frames': 3, 'mode': 'bp'},
     "config.train.chunk_frames: 3 in mode 'bp'"),
    ({'train.chunk_frames': 3, 'train.update_every': 3, 'train.flush': 0},
     'config.train.chunk_frames: 3 with config.train.update_every'),
    ({'train.chunk_frames': 3, 'train.fidelity_every': 2},
     'config.train.chunk_frames: 3 with config.train.fidelity_every'),
    ({'train.chunk_frames': 3, 'model.stages': 'convbn:4:2,conv:8:2,res:8'},
     r'config.train.chunk_frames: 3 with sub-batch norm stages \(convbn\)'),
])
def test_chunk_config_errors_name_the_key(data_dir, overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate_config(_tiny(data_dir, **overrides))


@pytest.mark.parametrize('shape', [None, (1, 4)])
def test_chunked_forward_equals_the_whole_clip(shape):
  """Evaluation's forward in chunks: clip predictions, each clip's loss
  and the metrics over every valid tick, as ``evaluation.eval_step``."""
  eng = engine.LocalEngine(SPEC)
  params = PARAMS
  if shape:
    m = mesh.make_mesh(*shape, devices=jax.devices()[:4])
    eng = mesh.MeshEngine(mesh.place(SPEC, m, params=PARAMS))
    params = eng.to_state(PARAMS)
  want = evaluation.eval_step(engine.LocalEngine(SPEC), PARAMS,
                              jnp.asarray(VIDEO), jnp.asarray(LABELS),
                              mode='sideways', compute_dtype=jnp.float32)
  got = streaming.ChunkedForward(eng, 'sideways', 4)(params, VIDEO, LABELS)
  _close(got.predictions, want.predictions)
  _close(got.example_loss, want.example_loss)
  for key in ('loss', 'accuracy', 'valid_ticks'):
    _close(got.metrics[key], want.metrics[key])


def test_run_chunks_keeps_at_most_two_chunks_in_flight(monkeypatch):
  """Chunk k+2 is not sent before program k is waited for: asynchronous
  dispatch would otherwise queue the whole clip on the devices."""
  events = []

  def batches():
    for k in range(5):
      events.append(('send', k))
      yield k, None

  def step(i, chunk, targets, state):
    del targets, state
    events.append(('run', i))
    return chunk

  def wait(state):
    events.append(('wait', state))
    return state

  monkeypatch.setattr(streaming.jax, 'block_until_ready', wait)
  state, _ = streaming.run_chunks(batches(), step)
  assert state == 4
  assert events[:5] == [('send', 0), ('run', 0), ('send', 1), ('wait', 0),
                        ('run', 1)]
  for k in range(3):
    assert events.index(('wait', k)) < events.index(('send', k + 2))
  assert [e for e in events if e[0] == 'run'] == [('run', i) for i in range(5)]
