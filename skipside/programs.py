"""Every program a run compiles, bound to its config: one list, one lowering.

A run compiles a train step (plain, or PGT's over fragments), an evaluation
forward and, with sub-batch norms, a norm-statistics pass, once per batch
shape (one shape, or every multigrid bucket). The training loop calls them,
multigrid compiles them ahead of time (``skipside/aot.py``) and TPU
planning compiles them for a target topology (``skipside/tpu_plan.py``);
all three take them from here, so what is planned is what training runs.

- ``listing(config, info, schedule)``: every ``(name, global clip shape)``.
- ``train_step_for`` / ``eval_step_for``: the loop's functions for a
  config on an engine (``engine.LocalEngine`` or ``mesh.MeshEngine``).
- ``lower(name, ...)``: one program lowered from shapes (for
  ``aot.compile_buckets`` or the planner).

Example::

    step = programs.train_step_for(config, eng, optimizer)
    params, opt_state, out = step(params, opt_state, clip, targets, carry)
    for name, shape in programs.listing(config, info, schedule):
      lowered = programs.lower(name, shape, config, eng, optimizer,
                               params_like, opt_like, tree_params=shapes)
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from skipside import aot, batchnorm, evaluation, multigrid, network, optim
from skipside import progressive, streaming
from skipside import config as config_lib

PyTree = Any

TRAIN, TRAIN_PGT, EVAL, NORMS = ('train', 'train progressive', 'eval',
                                 'norm statistics')
# A chunked clip's programs (``streaming``): the first chunk's, every later
# chunk's, the flush's (with ``train.flush``) and the update; each a part of
# a train step (``TRAIN_PARTS``).
CHUNK_FIRST, CHUNK, CHUNK_FLUSH, CHUNK_UPDATE = (
    'train first chunk', 'train chunk', 'train flush', 'train update')
EVAL_FIRST_CHUNK, EVAL_CHUNK = 'eval first chunk', 'eval chunk'
CHUNK_PARTS = (CHUNK_FIRST, CHUNK, CHUNK_FLUSH, CHUNK_UPDATE,
               EVAL_FIRST_CHUNK, EVAL_CHUNK)
TRAIN_PARTS = (TRAIN, TRAIN_PGT, CHUNK_FIRST, CHUNK, CHUNK_FLUSH,
               CHUNK_UPDATE)


@functools.partial(jax.jit, static_argnames=('eng', 'optimizer', 'mode',
                                             'compute_dtype', 'update_every',
                                             'flush', 'skip_nonfinite',
                                             'mask_fill'),
                   donate_argnames=('params', 'opt_state'))
def train_step(eng, optimizer, params, opt_state, clip, targets, carry, *,
               mode, compute_dtype, update_every, flush, skip_nonfinite,
               mask_fill=True):
  """The loop's step on any engine (``engine.LocalEngine``,
  ``mesh.MeshEngine``): ``params`` and ``opt_state`` in its state layout,
  donated; the carry in and out as an ``engine.StreamCarry`` (checkpoints
  fit every engine). Returns ``(params, opt_state, ClipOutput)``."""
  new = eng.train_step(optimizer, params, opt_state, clip, targets,
                       mode=mode, carry=carry, compute_dtype=compute_dtype,
                       update_every=update_every, flush=flush,
                       mask_fill=mask_fill)
  out = new[2]
  out = out._replace(carry=eng.to_stream_carry(out.carry))
  params, opt_state = optim.finish_step(
      (params, opt_state), new[:2], out.metrics['loss'],
      skip_nonfinite=skip_nonfinite)
  return params, opt_state, out


def is_progressive(config: ml_collections.ConfigDict) -> bool:
  """Whether the run trains videos as PGT's serial fragments."""
  return bool(config.get('progressive') and config.progressive.enabled)


def train_step_for(config: ml_collections.ConfigDict, eng, optimizer
                   ) -> Callable:
  """The loop's ``step(params, opt_state, clip, targets, carry) -> (params,
  opt_state, ClipOutput)`` for ``config`` on engine ``eng``: PGT's
  (``progressive.make_train_step``) when ``config.progressive.enabled``,
  ``streaming.ChunkedStep`` (host ``clip`` and ``targets``) with
  ``config.train.chunk_frames``, else ``train_step`` with the config's
  options. Params and optimizer state are donated."""
  compute_dtype = config_lib.PRECISIONS[config.precision]
  skip_nonfinite = config.train.on_nonfinite == 'skip'
  if streaming.is_chunked(config):
    return streaming.ChunkedStep(
        eng, optimizer, mode=config.mode,
        chunk_frames=config.train.chunk_frames, flush=config.train.flush,
        mask_fill=config_lib.mask_fill(config), compute_dtype=compute_dtype,
        skip_nonfinite=skip_nonfinite, global_size=config.data.batch_size)
  if is_progressive(config):
    return progressive.make_train_step(eng, optimizer, config,
                                       compute_dtype=compute_dtype,
                                       skip_nonfinite=skip_nonfinite)
  # A partial of the module-level jit (not a closure): runs with equal
  # engines share its compilations.
  return functools.partial(
      train_step, eng, optimizer, mode=config.mode,
      compute_dtype=compute_dtype,
      update_every=config.train.update_every or None,
      flush=config.train.flush, skip_nonfinite=skip_nonfinite,
      mask_fill=config_lib.mask_fill(config))


def eval_step_for(config: ml_collections.ConfigDict, eng) -> Callable:
  """``forward(params, clip, targets) -> ClipOutput``: evaluation's forward
  for ``config`` on engine ``eng`` (``evaluation.forward_for``: chunked
  with ``config.train.chunk_frames``)."""
  return evaluation.forward_for(config, eng)


def lowered(fn: Callable, *args) -> jax.stages.Lowered:
  """``fn.lower(*args)`` for a jitted function or a ``functools.partial``
  of one (``train_step_for``, ``eval_step_for``)."""
  if isinstance(fn, functools.partial):
    return fn.func.lower(*fn.args, *args, **fn.keywords)
  return fn.lower(*args)


def listing(config: ml_collections.ConfigDict, info, schedule=None, *,
            norms: bool = False) -> list[tuple[str, tuple[int, ...]]]:
  """Every ``(program, global clip shape)`` the run compiles, in order.

  ``info``: the training data's ``DataInfo``; ``schedule``: the multigrid
  schedule, if any (one train shape per bucket); ``norms``: the network has
  sub-batch norms (``batchnorm.has_norms``), whose population statistics
  are a program of their own at the base shape.
  """
  element = tuple(info.element_shape)  # (T, h, w, C)
  base = (config.data.batch_size, *element)
  train = TRAIN_PGT if is_progressive(config) else TRAIN
  if schedule is not None:
    shapes = [(s.batch, s.frames, s.crop, s.crop, element[-1])
              for s in schedule.buckets()]
  else:
    shapes = [base]
  if streaming.is_chunked(config):  # Only a chunk reaches the devices.
    chunk = (base[0], config.train.chunk_frames, *base[2:])
    parts = [CHUNK_FIRST] + [CHUNK] * (base[1] > chunk[1]) + [
        CHUNK_FLUSH] * bool(config.train.flush) + [CHUNK_UPDATE]
    parts += [EVAL_FIRST_CHUNK] + [EVAL_CHUNK] * (base[1] > chunk[1])
    return [(name, chunk) for name in parts] + (
        [(NORMS, base)] if norms else [])
  out = [(train, s) for s in dict.fromkeys(shapes)] + [(EVAL, base)]
  return out + [(NORMS, base)] if norms else out


def engine_at(eng, tree_params: PyTree, frame_shape):
  """Engine ``eng`` with its network at another frame size (a multigrid
  bucket's; the same params and, on a mesh, the same groups)."""
  return eng.with_spec(network.for_frame_shape(eng.spec, tree_params,
                                               tuple(frame_shape)))


def _what(config) -> str:
  """Names a clip shape in errors: a multigrid bucket's, or the run's."""
  return 'multigrid bucket of ' if multigrid.enabled(config) else ''


def batch_like(eng, config: ml_collections.ConfigDict, clip_shape,
               shard_count: int = 1) -> tuple:
  """Abstract ``(clip, targets)`` as the loop passes a batch of global
  shape ``clip_shape`` to ``eng`` (``eng.put_batch`` of each process's
  ``1/shard_count`` of the rows). Targets are the next frames for an
  ``'mse'`` head, multi-hot ``(b, K)`` labels for ``'sigmoid_xent'``,
  else ``(b,)`` labels."""
  local = (clip_shape[0] // shard_count, *clip_shape[1:])
  clip = jax.ShapeDtypeStruct(local, jnp.float32)
  labels = {'xent': local[:1],
            'sigmoid_xent': (local[0], *eng.spec.prediction_shape)}
  targets = (clip if eng.spec.loss == 'mse' else
             jax.ShapeDtypeStruct(labels[eng.spec.loss], jnp.int32))
  try:
    return eng.batch_like((clip, targets), clip_shape[0])
  except ValueError as e:  # The batch does not split over 'data'.
    raise config_lib.ConfigError(
        f'{_what(config)}clip shape {tuple(clip_shape)}: {e} '
        '(config.mesh.data)') from e


def lower(name: str, clip_shape, config: ml_collections.ConfigDict, eng,
          optimizer, params: PyTree, opt_state: PyTree, *,
          tree_params: PyTree, carry: PyTree = None, shard_count: int = 1,
          memo: dict | None = None) -> jax.stages.Lowered:
  """Program ``name`` (``listing``) lowered at global ``clip_shape``.

  ``eng``: the run's engine at its base frame size (``engine_at`` moves it
  to ``clip_shape``); ``params``, ``opt_state``: abstract, in the engine's
  state layout (``eng.state_like``); ``tree_params``: the params pytree's
  shapes (for the network at other frame sizes and the statistics pass);
  ``carry``: the abstract stream carry, if the run streams; ``memo``: a
  dict kept across the calls of one plan, ``(name, clip shape) ->
  output_shardings`` of the chunked parts compiled so far (each part takes
  the layout of the part before it).
  """
  if name == NORMS:  # On host batches, one device: the pytree's params.
    return batchnorm.jitted_clip_moments.lower(
        eng.spec, jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree_params),
        jax.ShapeDtypeStruct(tuple(clip_shape), jnp.float32))
  eng = engine_at(eng, tree_params, clip_shape[2:])
  clip, targets = batch_like(eng, config, clip_shape, shard_count)
  if name == TRAIN_PGT:  # Fragments must tile this bucket's clips.
    try:
      progressive.Options.from_config(config.progressive).num_fragments(
          clip_shape[1])
    except ValueError as e:
      raise config_lib.ConfigError(
          f'{_what(config)}clip shape {tuple(clip_shape)}: '
          f'config.progressive: {e}') from e
  if name in (TRAIN, TRAIN_PGT):
    return lowered(train_step_for(config, eng, optimizer), params, opt_state,
                   clip, targets, carry)
  if name in CHUNK_PARTS:
    return _lower_chunked(name, config, eng, optimizer, params, opt_state,
                          clip, targets, carry,
                          {} if memo is None else memo)
  if name == EVAL:
    return lowered(eval_step_for(config, eng), params, clip, targets)
  raise ValueError(f'unknown program {name!r} (one of '
                   f'{(*TRAIN_PARTS, EVAL, EVAL_FIRST_CHUNK, EVAL_CHUNK, NORMS)})')


def layout_key(name: str, clip_shape) -> tuple:
  """The key of a chunked part's output layout in a plan's ``memo``."""
  return name, tuple(clip_shape)


def _lower_chunked(name, config, eng, optimizer, params, opt_state, clip,
                   targets, carry, memo: dict) -> jax.stages.Lowered:
  """A chunked clip's program (``streaming``) lowered from shapes. Each
  later part takes the accumulators in the layout the part before it in
  the loop gives them (the first chunk's, or with more chunks the later
  chunks'): that part's compiled ``output_shardings``, from ``memo[(name,
  clip shape)]`` (a planner notes each part it compiles there), else
  compiled here once per ``memo``."""
  step = train_step_for(config, eng, optimizer)
  shape = tuple(clip.shape)

  def like(key, lowering, fn, *args):  # Output layout of a compiled part.
    if layout_key(key, shape) not in memo:  # (A planner notes its parts.)
      memo[layout_key(key, shape)] = lowering().compile().output_shardings
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(fn, *args), memo[layout_key(key, shape)])

  if name in (EVAL_FIRST_CHUNK, EVAL_CHUNK):
    kw = dict(mode=step.mode, compute_dtype=step.compute_dtype)
    first = functools.partial(streaming.first_forward.lower, eng, params,
                              clip, targets, **kw)
    if name == EVAL_FIRST_CHUNK:
      return first()
    carry, sums = like(EVAL_FIRST_CHUNK, first, functools.partial(
        streaming.first_forward, eng, **kw), params, clip, targets)
    return streaming.next_forward.lower(eng, params, clip, targets, carry,
                                        sums, **kw)
  kw = dict(mode=step.mode, mask_fill=step.mask_fill,
            compute_dtype=step.compute_dtype)
  frames = jax.ShapeDtypeStruct((), jnp.int32)
  first = functools.partial(streaming.first_chunk.lower, eng, params, clip,
                            targets, carry, frames, **kw)
  if name == CHUNK_FIRST:
    return first()
  acc = like(CHUNK_FIRST, first, functools.partial(
      streaming.first_chunk, eng, **kw), params, clip, targets, carry, frames)
  later = functools.partial(streaming.next_chunk.lower, eng, params, clip,
                            targets, acc, **kw)
  if name == CHUNK:
    return later()
  if config.data.num_frames > step.chunk_frames:  # After the later chunks.
    acc = like(CHUNK, later, functools.partial(
        streaming.next_chunk, eng, **kw), params, clip, targets, acc)
  flush = functools.partial(streaming.flush_ticks.lower, eng, params, clip,
                            targets, acc, flush=step.flush, **kw)
  if name == CHUNK_FLUSH:
    return flush()
  if step.flush:  # The update takes the flush's output.
    acc = like(CHUNK_FLUSH, flush, functools.partial(
        streaming.flush_ticks, eng, flush=step.flush, **kw), params, clip,
               targets, acc)
  return streaming.update.lower(eng, optimizer, params, opt_state, acc,
                                skip_nonfinite=step.skip_nonfinite)


def compile_ahead(config: ml_collections.ConfigDict, eng, optimizer,
                  params: PyTree, opt_state: PyTree, info, schedule, *,
                  tree_params: PyTree, norms: bool = False) -> tuple:
  """Every program of a multigrid run compiled before the first step.

  Returns ``(train step, eval forward, norm statistics or None)``, each an
  ``aot.BucketTable`` keyed by the clip shape the loop passes (its
  ``eng.put_batch``: per process on one device, global on a mesh) and
  called like ``train_step_for`` / ``eval_step_for`` /
  ``batchnorm.clip_moments``'s functions. ``params``, ``opt_state``:
  abstract, in the engine's layout; ``info``: the training data's
  ``DataInfo`` (this process's rows: ``info.shard_count``).
  """
  items = listing(config, info, schedule, norms=norms)

  def key(item):  # The clip shape the loop passes.
    name, shape = item
    if name == NORMS:
      return shape
    at = engine_at(eng, tree_params, shape[2:])
    return tuple(batch_like(at, config, shape, info.shard_count)[0].shape)

  def table(names, key_fn, title, threads=None):
    chosen = {key(i): i for i in items if i[0] in names}
    return aot.compile_buckets(
        lambda k: lower(*chosen[k], config, eng, optimizer, params, opt_state,
                        tree_params=tree_params,
                        shard_count=info.shard_count),
        list(chosen), key_fn=key_fn, name=title, num_threads=threads)

  steps = table((TRAIN, TRAIN_PGT),
                lambda p, o, clip, t, c=None: tuple(clip.shape), 'train step',
                config.multigrid.compile_threads or None)
  evals = table((EVAL,), lambda p, clip, t: tuple(clip.shape), 'eval forward')
  moments = (table((NORMS,), lambda p, clip: tuple(clip.shape),
                   'norm statistics') if norms else None)
  logging.info('compiled ahead: %d train shapes, eval%s in %.1fs',
               len(steps.executables), ' and norm statistics' if norms else '',
               sum(t.wall_seconds for t in (steps, evals, moments) if t))
  return steps, evals, moments
