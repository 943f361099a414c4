"""What a config describes: its defaults, validation, the network, the mesh.

Every key a run reads has its default in ``defaults()`` (the data section's
in ``skipside.data.get_config``). Errors are
``ConfigError``s, one line each: ``<key>: <what is wrong> (<what is
allowed>)`` (the launchers print ``config error: `` and that, exit code 2).

``config.model.stages`` lists the stages, bottom to top: built-in kinds
(``conv:16:2``) and custom stages named by import path with keyword
arguments, ``package.module:Name(arg=value, ...)`` (``parse_stages``,
``build_network``). The string is the network's whole description, so the
``config.json`` of a run rebuilds it (resume, ``launch.eval``).

Example::

    from experiments.configs import default
    config = default.get_config('tiny')
    config.model.stages = ('conv:4:2,experiments.examples.custom_stage:'
                           'GatedConv(out_features=8, stride=2),res:8')
    config_lib.validate_config(config)
    net = config_lib.build_network(config, (32, 32, 1), 4, nnx.Rngs(0))
"""

import ast
import dataclasses
import importlib
import inspect
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from skipside import engine, multigrid, network, optim, placement, progressive
from skipside import streaming
from skipside import stages
from skipside import mesh as mesh_lib
from skipside import data as data_lib
from skipside.data import sources

PyTree = Any


PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# The mesh train state's layout by default (mesh.STATE_SHARDINGS): 'stage'
# moves nothing per step; 'even' (ZeRO) holds far less state per chip and
# pays a gather and a scatter per window (README, "Using the library").
STATE_SHARDING = 'stage'


STAGE_KINDS = ('conv', 'convbn', 'res', 'tconv', 'mlp')
# Filled in by ``build_network`` when a custom stage's constructor takes them.
FILLED_ARGS = ('in_features', 'in_shape', 'rngs')


class ConfigError(ValueError):
  """A config value the run cannot use, as one line naming the key.

  ``ConfigError(key, problem, allowed)`` reads ``<key>: <problem>
  (<allowed>)``, the form the launchers print after ``config error:``;
  one argument is a message already in that form.

  Example::

      str(ConfigError('config.data.batch_size', 'got 0', 'an integer > 0'))
      # 'config.data.batch_size: got 0 (an integer > 0)'
  """

  def __init__(self, key: str, problem: str = '', allowed: str = ''):
    text = f'{key}: {problem}' if problem else key
    text = f'{text} ({allowed})' if allowed else text
    super().__init__(' '.join(text.split()))  # One line.


def defaults() -> ml_collections.ConfigDict:
  """Every key a run reads, with its default: Skip-Sideways on the embedded
  MovingDigits motion task (``experiments/configs/default.py`` runs it as
  is). Experiment configs start here and set what they change; the data
  section is the data package's own (``skipside.data.get_config``, its
  fields documented there).

  Example::

      c = config.defaults()
      c.mode = 'bp'
      c.data.task = 'appearance'
      config.validate_config(c)
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = 'sideways'  # 'bp' | 'pipelined_bp' | 'sideways'.
  c.precision = 'float32'  # 'float32' | 'bfloat16' (compute; params stay f32).

  # Stages as kind:width[:stride]; kinds: conv, convbn (conv + sub-batch
  # norm), res (residual conv), tconv (causal temporal conv, keeps a cache),
  # mlp (flattens). Your own: package.module:Name(arg=value, ...), e.g.
  # experiments.examples.custom_stage:GatedConv(out_features=16, stride=2)
  # (README, "Your stages in a config run").
  c.model = ml_collections.ConfigDict()
  c.model.stages = 'conv:8:2,conv:16:2,res:16,conv:32:2,res:32'
  # Skip-Sideways edges (src, dst): spans of 3, each carrying features two
  # frames newer than the chain brings. The span-2 pattern ((0, 2), (1, 3),
  # (2, 4)) trained unstably here (experiments/RESULTS.md).
  c.model.skips = ((0, 3), (1, 4))
  c.model.combine = 'concat'  # 'sum' | 'concat' (+ projection).
  c.model.head = 'classifier'  # 'classifier' | 'next_frame'.
  # convbn stages: batch statistics over sub-batches of this many clips
  # (multigrid's fixed base size; skipside/sub_batch.py).
  c.model.norm_base_size = 8

  # MovingDigits, motion task. Whole 16-frame videos: under Sideways a
  # fresh clip masks L-1 = 4 fill ticks and stage l learns from tick
  # L-1+d_l (d_l: edges up to the top), so 8 frames gave the bottom stages
  # 2 ticks of gradient and 16 give 10 (engine.gradient_ticks; the loop
  # warns when a stage gets none). Batch 32 (global).
  c.data = data_lib.get_config()

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'  # 'adam' | 'adamw' | 'sgd' | 'momentum'.
  c.optimizer.learning_rate = 3e-4
  c.optimizer.schedule = 'cosine'  # 'constant' | 'cosine' | 'step'.
  c.optimizer.warmup_steps = 50
  # Rate at step 0 of the warm-up (multigrid; SlowFast's WARMUP_START_LR).
  c.optimizer.warmup_start_lr = 0.0
  c.optimizer.step_boundaries = (0.5, 0.75)  # Fractions of num_steps ('step').
  c.optimizer.weight_decay = 1e-4  # adamw (decoupled), sgd, momentum; not adam.
  c.optimizer.grad_clip_norm = 1.0  # 0 disables.
  # Stages (indices, bottom = 0) whose parameters never train: they keep
  # their init and count in neither clipping nor Adam; messages still pass
  # through them. Skip-Sideways A learns motion on every seed with stage 1
  # frozen (experiments/RESULTS.md section 6).
  c.optimizer.frozen_stages = ()

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.log_every = 20
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 3
  c.train.update_every = 0  # >0: online mode, an optimizer step every k ticks.
  c.train.stream = False  # Carry the pipeline across batches (a stream).
  c.train.flush = 0  # Ticks repeating the last frame so messages land.
  # >0 (sideways): each clip trains as chunks of this many frames, one
  # program call each, the carry passed on and gradients summed (the same
  # gradient; device memory flat in the clip's length: skipside/streaming.py).
  c.train.chunk_frames = 0
  c.train.on_nonfinite = 'stop'  # 'stop' | 'skip' the update.
  # The pipeline fill of a fresh stream (DESIGN.md's conventions): 'mask_loss'
  # masks its ticks out of the loss; 'gate_stages' (sideways) scores them but
  # counts stage l's gradient only once its messages carry a real frame's
  # loss; 'none' scores and counts every tick. Evaluation masks it always.
  c.train.fill = 'mask_loss'
  # Every N steps (0: never), log fidelity/cosine_stage_<l>: the cosine of
  # the Sideways and the exact gradient of a fixed probe batch (the first
  # eval batch), per stage (skipside/fidelity.py).
  c.train.fidelity_every = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.max_batches = 0  # 0: the whole eval split.
  # Sub-batch norm: training batches whose statistics evaluation uses.
  c.eval.norm_batches = 8

  # Multigrid (skipside/multigrid.py; experiments/configs/multigrid.py):
  # batch shapes and LR on a schedule, both cycles off here. The base shape
  # is data.batch_size, data.num_frames and data.crop_size (or the native
  # frame side); the baseline's epochs are train.num_steps * batch_size /
  # train examples with LR steps at optimizer.step_boundaries
  # (optimizer.schedule='step'), the last boundary starting the fine-tuning
  # phase.
  c.multigrid = ml_collections.ConfigDict()
  c.multigrid.long_cycle = False  # The cycles switch independently.
  c.multigrid.short_cycle = False
  c.multigrid.epoch_factor = 1.5  # Multigrid epochs over the baseline's.
  # (t/T, s/S) per long-cycle stage; short-cycle crops as fractions of S.
  c.multigrid.long_cycle_factors = multigrid.LONG_CYCLE_FACTORS
  c.multigrid.short_cycle_factors = multigrid.SHORT_CYCLE_FACTORS
  # LR against the long-cycle batch factor: 'linear' (the reference),
  # 'sqrt' or 'none'.
  c.multigrid.lr_scaling = 'linear'
  # Round crops to a multiple of this (1: plain rounding; 8 keeps the skip
  # edges of a three-times-downsampling net poolable).
  c.multigrid.crop_multiple = 1
  # The fewest frames per clip: pipelined modes mask their first depth
  # ticks, keep t above that (multigrid.depth_errors).
  c.multigrid.min_frames = 1
  # Whole-epoch phase ends as the reference's (True reproduces its configs,
  # runs of tens of epochs); off, since a run of a few epochs would lose
  # whole phases to the rounding.
  c.multigrid.round_epochs = False
  # JAX's persistent compilation cache (None: off); parallel bucket
  # compilations (0: one per bucket, at most 8).
  c.multigrid.compile_cache_dir = ml_collections.config_dict.placeholder(str)
  c.multigrid.compile_threads = 0

  # Progressive training (PGT; skipside/progressive.py): each video (of
  # data.num_frames) as serial fragments with carried stream and caches.
  c.progressive = ml_collections.ConfigDict()
  c.progressive.enabled = False
  c.progressive.fragment_frames = 8  # Tf; T = Tf + k * (Tf - overlap).
  c.progressive.overlap = 0  # Frames shared by consecutive fragments.
  c.progressive.cache_policy = 'last'  # 'last' | 'avg' | 'max'.
  c.progressive.momentum = 0.25  # Blend of the previous cache (PGT: 0.25).
  c.progressive.step_per = 'video'  # 'video' | 'fragment' optimizer steps.
  c.progressive.truncate_gradients = True  # False: exact through fragments.
  c.progressive.loss_weighting = 'sum'  # 'sum' (PGT) | 'mean' (by ticks).

  # Depth-parallel mesh ('data', 'stage'); 1x1 runs the single-device engine.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.stage = 1
  c.mesh.groups = ''  # '' = flops-balanced; or consecutive stages: '0-1,2,3-4'.
  # The train state's layout (mesh.STATE_SHARDINGS): 'stage' keeps each
  # group's params and optimizer state on its own stage devices, padded to
  # the largest group and replicated over 'data'; 'even' spreads them evenly
  # over every device (ZeRO; each window gathers its group's rows).
  c.mesh.state_sharding = STATE_SHARDING
  return c


@dataclasses.dataclass(frozen=True)
class StageItem:
  """One item of ``config.model.stages``.

  ``kind`` is a built-in kind (``STAGE_KINDS``; ``width`` 0 means "same as
  the input") or a custom stage's ``'package.module:Name'`` with its
  keyword ``args``.
  """
  text: str
  kind: str
  width: int = 0
  stride: int = 1
  args: dict = dataclasses.field(default_factory=dict)

  @property
  def custom(self) -> bool:
    return self.kind not in STAGE_KINDS


_CUSTOM = re.compile(r'([A-Za-z_][\w.]*):([A-Za-z_]\w*)\s*(?:\((.*)\))?',
                     re.DOTALL)


def _split_items(text: str) -> list[str]:
  """``text`` split at the commas outside brackets and quotes."""
  items, depth, quote, start = [], 0, '', 0
  for i, ch in enumerate(text):
    if quote:
      quote = '' if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      items.append(text[start:i])
      start = i + 1
  return [s.strip() for s in items + [text[start:]]]


def _literal_kwargs(text: str) -> dict:
  """``'a=1, b=(2, 3)'`` -> ``{'a': 1, 'b': (2, 3)}``; ValueError otherwise."""
  try:
    call = ast.parse(f'f({text})', mode='eval').body
    if call.args or any(k.arg is None for k in call.keywords):
      raise ValueError('positional')
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except (SyntaxError, ValueError, TypeError) as e:
    raise ValueError(text) from e


def parse_stages(text: str) -> list[StageItem]:
  """Parses ``config.model.stages``, items separated by commas.

  A built-in item is ``kind[:width[:stride]]`` (``STAGE_KINDS``); a custom
  stage is ``package.module:Name`` or ``package.module:Name(arg=value, ...)``
  with Python literals (``build_network`` calls ``Name`` with them).

  Example::

      parse_stages('conv:16:2,experiments.examples.custom_stage:'
                   'GatedConv(out_features=32)')
      # [StageItem(kind='conv', width=16, stride=2, ...),
      #  StageItem(kind='experiments.examples.custom_stage:GatedConv',
      #            args={'out_features': 32}, ...)]
  """
  out = []
  for i, item in enumerate(_split_items(text)):
    where = f'item {i} {item!r}'
    parts = item.split(':')
    custom = _CUSTOM.fullmatch(item)
    if parts[0] in STAGE_KINDS:
      numbers = parts[1:]
      if len(numbers) > 2 or not all(n.isdigit() for n in numbers) or (
          len(numbers) == 2 and int(numbers[1]) < 1):
        raise ConfigError(
            'config.model.stages', f'{where}: width and stride are not '
            'integers >= 0 and >= 1', 'kind[:width[:stride]], e.g. conv:16:2')
      # Defaults: width 0 (the input's), stride 1.
      width, stride = list(map(int, numbers)) + [0, 1][len(numbers):]
      out.append(StageItem(item, parts[0], width, stride))
    elif custom:
      name = f'{custom.group(1)}:{custom.group(2)}'
      try:
        args = _literal_kwargs(custom.group(3) or '')
      except ValueError as e:
        raise ConfigError(
            'config.model.stages', f'{where}: arguments are not name=value '
            'literals', f'e.g. {name}(out_features=16, stride=2)') from e
      out.append(StageItem(item, name, args=args))
    else:
      raise ConfigError(
          'config.model.stages', f'{where}: unknown stage kind {parts[0]!r}',
          f'{", ".join(STAGE_KINDS[:-1])} or {STAGE_KINDS[-1]} as '
          'kind[:width[:stride]], or package.module:Name(arg=value, ...)')
  return out


def _is_stage_class(obj) -> bool:
  return isinstance(obj, type) and issubclass(obj, nnx.Module)


def _parameters(fn) -> dict[str, inspect.Parameter]:
  """``fn``'s parameters; a class's are its ``__init__``'s without ``self``
  (``inspect.signature`` of an nnx class shows its metaclass' call)."""
  params = dict(inspect.signature(
      fn.__init__ if isinstance(fn, type) else fn).parameters)
  if isinstance(fn, type):
    params.pop(next(iter(params)))
  return params


def resolve_stage(index: int, item: StageItem):
  """The class (or function) a custom ``item`` names, its arguments checked.

  Raises:
    ConfigError: naming ``config.model.stages``, the item and what is wrong:
      a module that does not import, a missing name, a name that is not an
      nnx stage (an ``nnx.Module`` subclass or a function returning one),
      arguments its signature does not take.
  """
  def fail(problem, allowed):
    return ConfigError('config.model.stages',
                       f'item {index} {item.text!r}: {problem}', allowed)

  module_name, _, name = item.kind.partition(':')
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except  (any import error)
    raise fail(f'cannot import {module_name}: {e}',
               'an importable package.module:Name') from e
  if not hasattr(module, name):
    found = sorted(
        k for k, v in vars(module).items()
        if getattr(v, '__module__', None) == module_name and not
        k.startswith('_') and (_is_stage_class(v) or inspect.isfunction(v)
                               and 'rngs' in _parameters(v)))
    raise fail(f'{module_name} has no {name}',
               f'one of its stages: {", ".join(found) or "none"}')
  target = getattr(module, name)
  if not (_is_stage_class(target) or inspect.isfunction(target)):
    raise fail(f'{name} is not an nnx stage',
               'an nnx.Module subclass or a function returning one; a '
               'flax.linen module goes through skipside.adapters.from_linen')
  params = _parameters(target)
  filled = {k: None for k in FILLED_ARGS if k in params and k not in item.args}
  try:
    inspect.Signature(list(params.values())).bind(**item.args, **filled)
  except TypeError as e:
    own = [k for k in params if k not in FILLED_ARGS]
    raise fail(f'{name}: {e}', f'arguments: {", ".join(own)}; '
               f'{", ".join(FILLED_ARGS[:-1])} and {FILLED_ARGS[-1]} are '
               'filled in') from e
  return target


def _stage_of(index: int, item: StageItem, shape: tuple[int, ...], config,
              rngs: nnx.Rngs) -> nnx.Module:
  """The stage module of ``item`` on inputs of one frame's ``shape``."""
  width, out, stride = shape[-1], item.width or shape[-1], item.stride
  if item.kind == 'mlp':
    return stages.Mlp(int(np.prod(shape)), [out], rngs=rngs)
  if item.kind == 'tconv':
    return stages.TemporalConv(width, rngs=rngs)
  if item.kind in ('conv', 'convbn'):
    base = config.model.get('norm_base_size', 8) if item.kind == 'convbn' else 0
    return stages.Conv(width, out, stride=stride, norm_base_size=base,
                       rngs=rngs)
  if item.kind == 'res':
    return stages.ResidualConv(width, out, stride=stride, rngs=rngs)
  target = resolve_stage(index, item)
  params = _parameters(target)
  filled = {'in_features': width, 'in_shape': shape, 'rngs': rngs}
  args = {**{k: v for k, v in filled.items() if k in params}, **item.args}
  try:
    stage = target(**args)
  except (TypeError, ValueError) as e:
    raise ConfigError('config.model.stages',
                      f'item {index} {item.text!r}: {type(e).__name__}: {e}',
                      f'arguments {target.__name__} accepts') from e
  if not isinstance(stage, nnx.Module):
    raise ConfigError(
        'config.model.stages', f'item {index} {item.text!r}: '
        f'{target.__name__} returned a {type(stage).__name__}, not an nnx '
        'stage', 'an nnx.Module, the stage contract, skipside/stages.py')
  return stage


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int | None = None) -> None:
  """Fails fast, naming the key, on values the run cannot use.

  Raises:
    ConfigError: ``<key>: <what is wrong> (<what is allowed>)``, e.g.
      ``config.optimizer.learning_rate: got -1.0 (a number > 0)``.
  """
  def one_of(key, what, value, allowed):
    if value not in allowed:
      raise ConfigError(f'config.{key}', f'unknown {what} {value!r}',
                        f'one of {", ".join(map(repr, allowed))}')

  one_of('mode', 'mode', config.mode, engine.MODES)
  one_of('precision', 'precision', config.precision, tuple(PRECISIONS))
  items = parse_stages(config.model.stages)
  for i, item in enumerate(items):
    if item.custom:
      resolve_stage(i, item)
  num = len(items)
  try:  # The network's own edge checks, before anything is built or written.
    network._validate_edges(num, config.model.skips)  # pylint: disable=protected-access
  except ValueError as e:
    raise ConfigError('config.model.skips', str(e),
                      f'pairs (src, dst) of stages 0..{num - 1}, '
                      'src < dst - 1') from e
  one_of('model.combine', 'rule', config.model.combine, network.COMBINE_RULES)
  one_of('train.fill', 'fill rule', config.train.get('fill', 'mask_loss'),
         tuple(engine.FILL_NAMES))
  try:  # The dataset's own keys, before its data is built or read.
    bad = sources.config_error(config.data)
  except ValueError as e:  # An unknown dataset name or module path.
    raise ConfigError(str(e)) from e
  if bad:
    raise ConfigError(*bad)
  if config.train.get('fill') == 'gate_stages' and config.mode != 'sideways':
    raise ConfigError('config.train.fill',
                      f"'gate_stages' with mode {config.mode!r}",
                      "config.mode='sideways': it gates Sideways gradients")
  if not config.train.get('fidelity_every', 0) >= 0:
    raise ConfigError('config.train.fidelity_every',
                      f'got {config.train.fidelity_every}',
                      'steps between fidelity probes, 0 = never')
  one_of('model.head', 'head', config.model.head, ('classifier', 'next_frame'))
  for key in ('train.num_steps', 'train.log_every', 'train.eval_every',
              'train.checkpoint_every', 'data.num_frames', 'data.batch_size',
              'data.stride'):
    section, name = key.split('.')
    if not config[section][name] > 0:
      raise ConfigError(f'config.{key}', f'got {config[section][name]}',
                        'an integer > 0')
  depth = num - 1
  if config.mode != 'bp' and config.data.num_frames <= depth and not (
      config.train.stream or (config.get('progressive')
                              and config.progressive.enabled)):
    raise ConfigError(
        'config.data.num_frames', f'{config.data.num_frames} frames give no '
        f'loss tick in {config.mode!r}: a fresh clip through {num} stages '
        f'masks its first {depth} ticks',
        f'more than {depth} frames, or config.train.stream=True')
  one_of('train.on_nonfinite', 'value', config.train.on_nonfinite,
         ('stop', 'skip'))
  one_of('optimizer.name', 'optimizer', config.optimizer.name, optim.NAMES)
  one_of('optimizer.schedule', 'schedule', config.optimizer.schedule,
         optim.SCHEDULES)
  for key in ('learning_rate', 'weight_decay', 'warmup_steps',
              'warmup_start_lr'):
    if key not in config.optimizer:
      continue
    value = config.optimizer[key]
    if not (value > 0 if key == 'learning_rate' else value >= 0):
      raise ConfigError(f'config.optimizer.{key}', f'got {value}',
                        'a number > 0' if key == 'learning_rate'
                        else 'a number >= 0')
  frozen = config.optimizer.get('frozen_stages', ())
  if not isinstance(frozen, (tuple, list)) or any(
      not isinstance(l, int) or isinstance(l, bool) or not 0 <= l < num
      for l in frozen):
    raise ConfigError('config.optimizer.frozen_stages', f'got {frozen!r}',
                      f'a tuple of stage indices 0..{num - 1}')
  devices = num_devices or jax.device_count()
  mesh_size = config.mesh.data * config.mesh.stage
  if mesh_size > devices:
    raise ConfigError(
        'config.mesh', f'{config.mesh.data} data x {config.mesh.stage} stage '
        f'= {mesh_size} devices', f'at most the {devices} devices present')
  data = mesh_axes(config)[0]
  if config.data.batch_size % data:
    axis = (f'the data axis config.mesh.data={data}' if data == config.mesh.data
            else f"the {data} devices of this multi-process job (all on "
            "'data' when config.mesh is 1 x 1)")
    raise ConfigError('config.data.batch_size',
                      f'{config.data.batch_size} is not divisible by {axis}',
                      f'a multiple of {data}')
  if mesh_size > 1:
    for error in _mesh_config_errors(config, num, devices):
      raise error
  if config.train.flush < 0 or (config.train.flush and (
      config.train.update_every or config.train.stream)):
    raise ConfigError(
        'config.train.flush', f'got {config.train.flush}',
        '>= 0, and 0 with config.train.update_every or config.train.stream: '
        'a flush ends a stream')
  for error in _multigrid_config_errors(config, items):
    raise error
  if config.get('progressive') and config.progressive.enabled:
    try:  # Here, before the workdir is written (the loop checks it again).
      progressive.checked_options(config)
    except ValueError as e:
      raise _keyed('config.progressive', str(e)) from e
  if any(item.kind == 'convbn' for item in items):
    for error in _norm_config_errors(config):
      raise error
  for error in _chunk_config_errors(config, items):
    raise error
  every, frames = config.train.update_every, config.data.num_frames
  if every and frames % every:
    raise ConfigError(
        'config.train.update_every',
        f'{every} does not divide config.data.num_frames={frames}',
        'a divisor of config.data.num_frames, or 0')


def _chunk_config_errors(config, items) -> list[ConfigError]:
  """``config.train.chunk_frames``: sideways clips split into chunks."""
  chunk = config.train.get('chunk_frames', 0)
  if not chunk:
    return []
  key = 'config.train.chunk_frames'
  if chunk < 0:
    return [ConfigError(key, f'got {chunk}', '>= 0 (0: whole clips)')]
  if config.data.num_frames % chunk:
    return [ConfigError(key, f'{chunk} does not divide config.data.num_frames'
                        f'={config.data.num_frames}',
                        'a divisor of config.data.num_frames, or 0')]
  if config.mode not in streaming.MODES:
    return [ConfigError(key, f'{chunk} in mode {config.mode!r}: an exact '
                        "mode's gradient would stop at each chunk",
                        "0, or mode 'sideways'")]
  for other, on in (('config.train.update_every', config.train.update_every),
                    # Whole clips on the devices (an exact gradient, the
                    # norm statistics pass): what chunking avoids.
                    ('config.train.fidelity_every',
                     config.train.get('fidelity_every', 0)),
                    ('sub-batch norm stages (convbn) in config.model.stages',
                     any(item.kind == 'convbn' for item in items)),
                    ('config.progressive.enabled', config.get(
                        'progressive') and config.progressive.enabled),
                    ('config.multigrid', multigrid.enabled(config))):
    if on:
      return [ConfigError(key, f'{chunk} with {other}', f'0 with {other}')]
  return []


def _keyed(section: str, message: str) -> ConfigError:
  """A ``<name>=<value> ...; use <allowed>`` message of ``section`` (the
  form ``progressive.Options`` raises) as ``<section>.<name>: ...``.

  Example::

      _keyed('config.progressive', "config.progressive: momentum=2 must be "
             'in [0, 1]')
      # config.progressive.momentum: 2 (in [0, 1])
  """
  text = message.removeprefix(f'{section}: ')
  named = re.match(r'(config\.[\w./]+) (.*)$|(\w+)=(.*)$', text)
  if not named:
    return ConfigError(section, text)
  key = named.group(1) or f'{section}.{named.group(3)}'
  rest = named.group(2) or named.group(4)
  problem, *allowed = re.split(r';? use |: need | must be ', rest, maxsplit=1)
  return ConfigError(key, problem, ''.join(allowed))


def build_network(config: ml_collections.ConfigDict,
                  frame_shape: tuple[int, ...], num_classes: int,
                  rngs: nnx.Rngs) -> network.Network:
  """The network described by ``config.model`` for frames of ``frame_shape``.

  Each stage is built for the shape its predecessor outputs (inferred as
  ``network.Network`` infers it): a custom stage's constructor gets
  ``in_features`` (the input's last axis), ``in_shape`` (one frame's input
  features) and ``rngs`` where it takes them.

  Raises:
    ConfigError: naming the key and the stage item that failed.
  """
  layers, shape = [], tuple(frame_shape)  # Features of one frame, (..., C).
  for i, item in enumerate(parse_stages(config.model.stages)):
    layers.append(_stage_of(i, item, shape, config, rngs))
    try:
      shape = network._eval_stage(  # pylint: disable=protected-access
          layers[-1], i, jax.ShapeDtypeStruct((2, *shape), jnp.float32)
      ).shape[1:]
    except ValueError as e:
      raise ConfigError('config.model.stages', f'item {i} {item.text!r}: {e}',
                        'the stage contract, skipside/stages.py') from e
  width = shape[-1]
  if config.model.head == 'classifier':
    head = stages.ClassifierHead(width, num_classes, rngs=rngs)
    # Multi-hot labels: one sigmoid per class (Charades-style, mAP).
    loss = 'sigmoid_xent' if config.data.task == 'multi_label' else 'xent'
  else:
    h, w = frame_shape[:2]
    stride = (h // shape[0], w // shape[1]) if len(shape) == 3 else (1, 1)
    head = stages.FrameDecoderHead(
        width, frame_shape[:2], frame_shape[-1], rngs=rngs,
        upscale=math.gcd(4, h, w, *stride))  # Never above the net's stride.
    loss = 'mse'
  skips = [tuple(int(v) for v in e) for e in config.model.skips]
  try:
    return network.Network(layers, head, frame_shape=frame_shape, skips=skips,
                           combine=config.model.combine, loss=loss, rngs=rngs)
  except ValueError as e:
    raise ConfigError('config.model', str(e),
                      'stages whose outputs config.model.skips and '
                      'config.model.combine can join') from e


def mesh_axes(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """``(data, stage)`` of the run's mesh: ``config.mesh``, except that a
  multi-process job that sets neither (1 x 1) puts every device on 'data':
  data parallelism, each process loading its own rows of the global batch
  (one process per host would otherwise train alone)."""
  data, stage = config.mesh.data, config.mesh.stage
  if data * stage == 1 and jax.process_count() > 1:
    return jax.device_count(), 1
  return data, stage


def parse_groups(value, num_stages: int,
                 num_devices: int) -> tuple[tuple[int, ...], ...]:
  """``config.mesh.groups`` -> one run of stages per device on 'stage'.

  ``value``: ``'0-1,2,3-4'`` (``a-b`` is stages a..b inclusive) or a tuple
  of tuples; trailing empty groups are added (``placement.validate_groups``).
  """
  if isinstance(value, str):
    groups = []
    for item in (s.strip() for s in value.split(',')):
      lo, _, hi = item.partition('-')
      try:
        groups.append(tuple(range(int(lo), int(hi or lo) + 1)))
      except ValueError as e:
        raise ValueError(f'item {item!r} is not a stage or a run a-b') from e
  else:
    groups = [tuple(g) for g in value]
  return placement.validate_groups(groups, num_stages, num_devices)


def _mesh_config_errors(config, num_stages: int,
                        devices: int) -> list[ConfigError]:
  errors = []
  groups = config.mesh.get('groups')
  if groups:
    try:
      parse_groups(groups, num_stages, config.mesh.stage)
    except ValueError as e:
      errors.append(ConfigError(
          'config.mesh.groups', f'{groups!r}: {e}',
          f"runs of consecutive stages 0..{num_stages - 1}, one per device "
          "on 'stage', e.g. '0-1,2'"))
  sharding = config.mesh.get('state_sharding', STATE_SHARDING)
  if sharding not in mesh_lib.STATE_SHARDINGS:
    errors.append(ConfigError(
        'config.mesh.state_sharding', repr(sharding),
        f'one of {mesh_lib.STATE_SHARDINGS}'))
  size = config.mesh.data * config.mesh.stage
  if jax.process_count() > 1 and size != devices:
    errors.append(ConfigError(
        'config.mesh', f'{config.mesh.data} x {config.mesh.stage} leaves '
        'devices of this multi-process job idle',
        f'data x stage = all {devices} devices'))
  return errors


def _norm_config_errors(config) -> list[ConfigError]:
  """Batch sizes sub-batch norm cannot split into equal groups of
  ``config.model.norm_base_size`` clips (per device and whole batch)."""
  base = config.model.norm_base_size
  batch = config.data.batch_size
  per_device = batch // mesh_axes(config)[0]
  if base < 1:
    return [ConfigError('config.model.norm_base_size', f'got {base}',
                        'an integer > 0')]
  errors = []
  for what, b in (('', batch), ('the batch per device (config.data.batch_size'
                                ' / config.mesh.data) = ', per_device)):
    if b > base and b % base:
      errors.append(ConfigError(
          'config.data.batch_size', f'{what}{b} does not split into '
          f'sub-batches of config.model.norm_base_size={base} clips',
          f'a multiple of {base}, or at most {base}'))
  return errors


def _multigrid_config_errors(config, items: list[StageItem]
                             ) -> list[ConfigError]:
  """What a multigrid run cannot use (``config.multigrid`` on); ``items``:
  ``parse_stages(config.model.stages)``."""
  if not multigrid.enabled(config):
    return []
  errors = []
  if config.optimizer.schedule != 'step':
    errors.append(ConfigError(
        'config.optimizer.schedule',
        f'{config.optimizer.schedule!r} with multigrid',
        "'step': multigrid follows a stepwise LR, its last boundary starts "
        'the fine-tuning phase'))
  bounds = list(config.optimizer.step_boundaries)
  if not bounds or any(not 0 < b < 1 for b in bounds) or bounds != sorted(
      bounds):
    errors.append(ConfigError(
        'config.optimizer.step_boundaries', f'{tuple(bounds)} with multigrid',
        'at least one increasing fraction in (0, 1)'))
  if config.model.head != 'classifier':
    errors.append(ConfigError(
        'config.model.head', f'{config.model.head!r} with multigrid, which '
        'varies the frame size', "'classifier'"))
  if config.train.stream or config.train.update_every:
    key = 'stream' if config.train.stream else 'update_every'
    errors.append(ConfigError(
        f'config.train.{key}', 'a stream cannot carry its buffers across '
        'the shape changes of multigrid', 'off: False and 0'))
  if config.multigrid.lr_scaling not in ('linear', 'sqrt', 'none'):
    errors.append(ConfigError(
        'config.multigrid.lr_scaling',
        f'unknown {config.multigrid.lr_scaling!r}',
        "'linear', 'sqrt' or 'none'"))
  start_lr = config.optimizer.get('warmup_start_lr', 0.0)
  if not start_lr >= 0:
    errors.append(ConfigError('config.optimizer.warmup_start_lr',
                              f'got {start_lr}', 'a number >= 0'))
  base = config.model.get('norm_base_size', 8)
  batch, data = config.data.batch_size, config.mesh.data
  per_device = batch // data
  if (any(item.kind == 'convbn' for item in items) and base >= 1
      and per_device % base):
    # The reference (SlowFast, MULTIGRID.BN_BASE_SIZE) handles fewer clips
    # per device than the base (its Charades/SSv2 configs: 2 per GPU, base
    # 8) by switching the norm at each long-cycle stage: sub-batch BN above
    # the base, plain BN at it, BN synchronized over base/clips GPUs below
    # it. Norm stages here take statistics within a device only.
    errors.append(ConfigError(
        'config.model.norm_base_size',
        f'{base} with multigrid, but the base batch per device is '
        f'{per_device} clips (config.data.batch_size={batch} / '
        f'config.mesh.data={data}), not a multiple of {base}, so some '
        f'buckets would not split into whole groups of {base} clips (those '
        'with fewer per device would take statistics over fewer clips than '
        'the others). The reference switches the norm per long-cycle stage '
        '(BN synchronized over base/clips GPUs below the base); norm stages '
        'here take statistics within a device only, so this layout is not '
        'supported',
        f'give each device a multiple of {base} clips: fewer data-parallel '
        'devices (config.mesh.data; the devices of config.mesh.stage share '
        'their batch), a larger config.data.batch_size, or a '
        f'config.model.norm_base_size dividing {per_device} (statistics over '
        'fewer clips in every bucket)'))
  return errors


def mask_fill(config: ml_collections.ConfigDict):
  """The engines' ``mask_fill`` for ``config.train.fill``."""
  return engine.FILL_NAMES[config.train.get('fill', 'mask_loss')]


def run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
  """The run's ``('data', 'stage')`` mesh (``mesh_axes``; global if
  multi-process, the first devices if smaller than the job), or ``None``
  for a 1 x 1 run (the single-device engine)."""
  data, stage = mesh_axes(config)
  size = data * stage
  if size == 1:
    return None
  devices = None if size == jax.device_count() else jax.devices()[:size]
  return mesh_lib.make_mesh(data, stage, devices=devices)


def make_engine(config: ml_collections.ConfigDict, spec: network.NetworkSpec,
                params: PyTree, mesh: jax.sharding.Mesh | None):
  """The run's engine: ``engine.LocalEngine`` without a mesh, else
  ``mesh.MeshEngine`` with ``spec`` placed on ``mesh`` by
  ``config.mesh.groups`` if set, else in groups balanced on each stage's
  XLA flops (compiled on this host) at the per-device batch. ``params``:
  the params pytree (or its ``ShapeDtypeStruct``s with ``mesh.groups``).

  Example::

      eng = config.make_engine(config, spec, params, config.run_mesh(config))
  """
  if mesh is None:
    return engine.LocalEngine(spec)
  groups = config.mesh.get('groups')
  kw = dict(params=params, state_sharding=config.mesh.get('state_sharding',
                                                          STATE_SHARDING))
  if groups:
    mspec = mesh_lib.place(spec, mesh, parse_groups(
        groups, spec.num_stages, mesh.shape['stage']), **kw)
  else:
    mspec = mesh_lib.place(
        spec, mesh, batch_size=config.data.batch_size // mesh.shape['data'],
        **kw)
  return mesh_lib.MeshEngine(mspec)


def data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.data.to_dict())
  if config.model.head == 'next_frame':
    c.task = 'next_frame'
  return c


def frame_shape_of(info) -> tuple[int, ...]:
  return tuple(info.element_shape[1:])
