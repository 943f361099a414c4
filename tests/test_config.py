"""Configs: one-line errors naming the key, and custom stages named in a config.

Every config error the launchers print is one line on stderr,
``config error: <key>: <what is wrong> (<what is allowed>)``, exit code 2,
before anything is written. Custom stages are named in
``config.model.stages`` as ``package.module:Name(arg=value, ...)``; the
string is recorded in ``config.json``, so a resumed run and ``launch.eval``
rebuild the same network.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments.configs import default
from experiments.examples import custom_stage
from skipside import config as config_lib
from skipside import network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = 'experiments.examples.custom_stage'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _run(module, *flags, timeout=300):
  """``python -m <module> <flags>`` from the repo root, as the README runs it."""
  env = dict(os.environ, XLA_FLAGS='')
  env.pop('JAX_PLATFORMS', None)  # The README's command sets none.
  return subprocess.run([sys.executable, '-m', module, *flags], cwd=REPO,
                        env=env, capture_output=True, text=True,
                        timeout=timeout)


def _tiny(**overrides):
  c = default.get_config('tiny')
  c.update_from_flattened_dict(overrides)  # Dotted keys: 'train.num_steps'.
  return c


# The launcher: each bad key or value of issue 15, one exact line, exit 2.
# Every way a flag fails in absl/ml_collections (translated by
# launch/errors.py), and config.validate_config's errors for each kind of
# flag value (a string, a negative integer, a tuple, an import); the lines of
# its other bad values are asserted in-process (test_validate_config_names_
# the_key below): the launcher prints them the same way, one process each
# would only repeat this path.
@pytest.mark.parametrize('flag, line', [
    ('--config.train.num_stepz=3', 'config.train.num_stepz: unknown key (did '
     'you mean config.train.num_steps?)'),
    ('--config.trian.num_steps=3', 'config.trian.num_steps: unknown key (did '
     'you mean config.train.num_steps?)'),
    ('--config.zzzz=3', 'config.zzzz: unknown key (did you mean config.seed?)'),
    ('--config=nope.py', "--config: file 'nope.py' not found (a config "
     'file[:variant], e.g. experiments/configs/default.py:tiny)'),
    ('--config=experiments/configs/default.py:nope',
     "--config: experiments/configs/default.py:nope: ValueError: unknown "
     "variant 'nope' of default.py (a Python file whose get_config(variant) "
     'returns a ConfigDict)'),
    ('--config.data.batch_size=abc',
     "config.data.batch_size: cannot read 'abc' (an integer)"),
    ('--config.optimizer.learning_rate=fast',
     "config.optimizer.learning_rate: cannot read 'fast' (a number)"),
    ('--workdr=x', '--workdr: unknown flag (did you mean --workdir?)'),
    ('--config.mode=bpp', "config.mode: unknown mode 'bpp' (one of 'bp', "
     "'pipelined_bp', 'sideways')"),
    ('--config.train.num_steps=-5', 'config.train.num_steps: got -5 (an '
     'integer > 0)'),
    ('--config.model.skips=((2, 1),)', 'config.model.skips: skip edge (2, 1) '
     'makes a cycle: edges must go up the network (src < dst), stage 1 '
     'already feeds stage 2 (pairs (src, dst) of stages 0..2, src < dst - 1)'),
    ('--config.model.stages=conv:4:2,nosuch.module:Stage',
     "config.model.stages: item 1 'nosuch.module:Stage': cannot import "
     "nosuch.module: No module named 'nosuch' (an importable "
     'package.module:Name)'),
])
def test_launcher_prints_one_line_naming_the_key(tmp_path, data_dir, flag,
                                                 line):
  workdir = tmp_path / 'bad'
  flags = ['--config=experiments/configs/default.py:tiny',
           f'--workdir={workdir}', f'--config.data.data_dir={data_dir}']
  if flag.startswith('--config='):  # In the tiny config's place.
    flags[0] = flag
  else:
    flags.append(flag)
  proc = _run('launch.train', *flags, timeout=120)
  assert (proc.returncode, proc.stderr) == (2, f'config error: {line}\n'), (
      proc.stderr[-3000:])
  assert not workdir.exists()  # Nothing written.


def test_eval_launcher_prints_one_line_naming_the_key(tmp_path):
  proc = _run('launch.eval', f'--workdir={tmp_path / "none"}', timeout=120)
  assert (proc.returncode, proc.stderr) == (
      2, f'config error: --workdir: {tmp_path / "none"} holds no config.json '
      '(the workdir of a python -m launch.train run)\n'), proc.stderr[-3000:]


@pytest.mark.parametrize('key, value, line', [
    ('mode', 'backprop', "config.mode: unknown mode 'backprop' (one of 'bp', "
     "'pipelined_bp', 'sideways')"),
    ('precision', 'fp8', "config.precision: unknown precision 'fp8' (one of "
     "'float32', 'bfloat16')"),
    ('model.head', 'mlp', "config.model.head: unknown head 'mlp' (one of "
     "'classifier', 'next_frame')"),
    ('model.combine', 'max', "config.model.combine: unknown rule 'max' (one "
     "of 'sum', 'concat')"),
    ('model.stages', 'conv:4:2,lstm:8', "config.model.stages: item 1 'lstm:8':"
     " unknown stage kind 'lstm' (conv, convbn, res, tconv or mlp as "
     'kind[:width[:stride]], or package.module:Name(arg=value, ...))'),
    ('model.stages', 'conv:4:x', "config.model.stages: item 0 'conv:4:x': "
     'width and stride are not integers >= 0 and >= 1 (kind[:width[:stride]], '
     'e.g. conv:16:2)'),
    ('train.update_every', 4, 'config.train.update_every: 4 does not divide '
     'config.data.num_frames=6 (a divisor of config.data.num_frames, or 0)'),
    ('train.on_nonfinite', 'ignore', "config.train.on_nonfinite: unknown "
     "value 'ignore' (one of 'stop', 'skip')"),
    ('data.num_frames', 2, "config.data.num_frames: 2 frames give no loss tick"
     " in 'sideways': a fresh clip through 3 stages masks its first 2 ticks "
     '(more than 2 frames, or config.train.stream=True)'),
    ('optimizer.weight_decay', -1e-4, 'config.optimizer.weight_decay: got '
     '-0.0001 (a number >= 0)'),
    ('optimizer.name', 'lamb', "config.optimizer.name: unknown optimizer "
     "'lamb' (one of 'adam', 'adamw', 'sgd', 'momentum')"),
    ('mesh.stage', 16, 'config.mesh: 1 data x 16 stage = 16 devices (at most '
     'the 8 devices present)'),
    ('data.task', 'colour', "config.data.task: unknown task 'colour' (one of "
     "'appearance', 'motion', 'long_range', 'majority', 'next_frame', "
     "'multi_label')"),
    ('data.dataset_config', 'huge', "config.data.dataset_config: unknown "
     "MovingDigits config 'huge' (one of 'default', 'smooth', 'large', "
     "'small', "
     "'long_range', 'long_range_512', 'majority', 'majority_512')"),
    ('train.fill', 'mask', "config.train.fill: unknown fill rule 'mask' (one "
     "of 'mask_loss', 'gate_stages', 'none')"),
    # Issue 15's values (the launcher prints these lines after 'config
    # error: ', test_launcher_prints_one_line_naming_the_key).
    ('optimizer.learning_rate', -1.0, 'config.optimizer.learning_rate: got '
     '-1.0 (a number > 0)'),
    ('optimizer.learning_rate', 0.0, 'config.optimizer.learning_rate: got '
     '0.0 (a number > 0)'),
    ('train.num_steps', 0, 'config.train.num_steps: got 0 (an integer > 0)'),
    ('data.num_frames', 0, 'config.data.num_frames: got 0 (an integer > 0)'),
    ('data.batch_size', 0, 'config.data.batch_size: got 0 (an integer > 0)'),
    ('data.batch_size', -4, 'config.data.batch_size: got -4 (an integer > '
     '0)'),
    ('model.skips', ((0, 9),), 'config.model.skips: skip edge (0, 9) points '
     'at missing stage 9: the network has stages 0..2 (pairs (src, dst) of '
     'stages 0..2, src < dst - 1)'),
    ('optimizer.frozen_stages', (1, 3), 'config.optimizer.frozen_stages: got '
     '(1, 3) (a tuple of stage indices 0..2)'),
])
def test_validate_config_names_the_key(key, value, line):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_config(_tiny(**{key: value}), num_devices=8)
  assert str(e.value) == line


@pytest.mark.parametrize('key, value, line', [
    ('cache_policy', 'mean', "config.progressive.cache_policy: 'mean' is "
     "unknown (one of ('last', 'avg', 'max'))"),
    ('momentum', 2.0, 'config.progressive.momentum: 2.0 (in [0, 1])'),
])
def test_progressive_keys_are_checked_before_anything_is_written(key, value,
                                                                 line):
  c = _tiny(**{'progressive.enabled': True, f'progressive.{key}': value})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_config(c)
  assert str(e.value) == line


def test_batch_not_divisible_by_the_data_axis_names_the_key():
  c = _tiny(**{'mesh.data': 2, 'data.batch_size': 5})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_config(c, num_devices=8)
  assert str(e.value) == ('config.data.batch_size: 5 is not divisible by the '
                          'data axis config.mesh.data=2 (a multiple of 2)')


# Custom stages named in config.model.stages.
GATED = f'{EXAMPLE}:GatedConv(out_features=4, stride=2)'


@pytest.mark.parametrize('item, problem', [
    ('nosuch_pkg.stages:Gated', "cannot import nosuch_pkg.stages: No module "
     "named 'nosuch_pkg' (an importable package.module:Name)"),
    (f'{EXAMPLE}:Gated', f'{EXAMPLE} has no Gated (one of its stages: '
     'GatedConv, LeakyMemory, pointwise)'),
    (f'{EXAMPLE}:LinenPointwise', 'LinenPointwise is not an nnx stage (an '
     'nnx.Module subclass or a function returning one; a flax.linen module '
     'goes through skipside.adapters.from_linen)'),
    (f'{EXAMPLE}:GatedConv(out_features=4, widht=4)', "GatedConv: got an unexpected keyword "
     "argument 'widht' (arguments: out_features, stride; in_features, "
     'in_shape and rngs are filled in)'),
    (f'{EXAMPLE}:GatedConv(stride=2)', "GatedConv: missing a required "
     "argument: 'out_features' (arguments: out_features, stride; "
     'in_features, in_shape and rngs are filled in)'),
    (f'{EXAMPLE}:GatedConv(4)', 'arguments are not name=value literals '
     f'(e.g. {EXAMPLE}:GatedConv(out_features=16, stride=2))'),
    (f'{EXAMPLE}:GatedConv(out_features=w)', 'arguments are not name=value '
     f'literals (e.g. {EXAMPLE}:GatedConv(out_features=16, stride=2))'),
])
def test_custom_stage_errors_name_the_key_and_item(item, problem):
  c = _tiny(**{'model.stages': f'conv:4:2,{item},res:8'})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_config(c)
  assert str(e.value) == f'config.model.stages: item 1 {item!r}: {problem}'


def test_custom_stage_that_breaks_the_contract_names_the_item():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  item = f'{EXAMPLE}:GatedConv(out_features=4)'  # A conv on flat features.
  c = _tiny(**{'model.stages': f'mlp:10,{item}', 'model.skips': ()})
  config_lib.validate_config(c)  # Names and arguments are right...
  with pytest.raises(config_lib.ConfigError) as e:  # ...the shapes are not.
    config_lib.build_network(c, (32, 32, 1), 4, nnx.Rngs(0))
  assert str(e.value).startswith(
      f'config.model.stages: item 1 {item!r}: stage 1 (GatedConv) ')
  assert str(e.value).endswith('(the stage contract, skipside/stages.py)')
  assert '\n' not in str(e.value)


def test_parse_stages_reads_custom_items_with_commas_in_arguments():
  items = config_lib.parse_stages(
      f"conv:8:2, {EXAMPLE}:GatedConv(out_features=16, stride=2),"
      f" {EXAMPLE}:LeakyMemory, m.n:F(shape=(1, 2), name='a,b'),tconv")
  assert [i.kind for i in items] == [
      'conv', f'{EXAMPLE}:GatedConv', f'{EXAMPLE}:LeakyMemory', 'm.n:F',
      'tconv']
  assert items[0].width == 8 and items[0].stride == 2
  assert items[1].args == {'out_features': 16, 'stride': 2}
  assert items[3].args == {'shape': (1, 2), 'name': 'a,b'}


def test_built_in_stages_build_the_same_network_as_before():
  """Shapes of every built-in kind through the config, as spelled out."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  c = _tiny(**{'model.stages': 'conv:4:2,convbn:8:2,res:8,tconv,res:16:2,mlp:10',
               'model.skips': ((0, 2),)})
  net = config_lib.build_network(c, (32, 32, 1), 4, nnx.Rngs(0))
  assert net.out_shapes == ((16, 16, 4), (8, 8, 8), (8, 8, 8), (8, 8, 8),
                            (4, 4, 16), (10,))


def test_config_with_custom_stages_builds_them_with_inferred_inputs():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  c = custom_stage.get_config()
  net = config_lib.build_network(c, (32, 32, 1), 4, nnx.Rngs(0))
  kinds = [type(b.stage).__name__ for b in net.blocks]
  assert kinds[:3] == ['GatedConv', 'GatedConv', 'LeakyMemory']
  assert net.out_shapes[:3] == ((16, 16, 8), (8, 8, 16), (8, 8, 16))
  spec, _ = network.split(net)
  assert spec.temporal[2]  # LeakyMemory declares its state.


def test_custom_stage_config_trains_resumes_and_evaluates(tmp_path, data_dir):
  """The worked example's config through the launchers: trained, resumed
  from its checkpoint, evaluated from config.json alone."""
  workdir = str(tmp_path / 'custom')
  flags = ['--config=experiments/examples/custom_stage.py:tiny',
           f'--workdir={workdir}', f'--config.data.data_dir={data_dir}']
  first = _run('launch.train', *flags, '--config.train.num_steps=4')
  assert first.returncode == 0, first.stderr[-3000:]
  with open(os.path.join(workdir, 'config.json')) as f:
    recorded = json.load(f)['model']['stages']
  assert f'{EXAMPLE}:GatedConv(out_features=4, stride=2)' in recorded
  assert f'{EXAMPLE}:LeakyMemory' in recorded
  assert f'{EXAMPLE}:pointwise' in recorded

  second = _run('launch.train', *flags, '--config.train.num_steps=6')
  assert second.returncode == 0, second.stderr[-3000:]
  summary = json.loads(second.stdout.split('Summary: ')[-1])
  assert summary['start_step'] == 4 and summary['step'] == 6

  evaluated = _run('launch.eval', f'--workdir={workdir}')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert metrics['step'] == 6 and 0 <= metrics['eval/accuracy'] <= 1

