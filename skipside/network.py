"""A network: stages, edges between them, a head and a loss.

Stages are numbered ``0 .. L-1``. The chain ``l-1 -> l`` always exists; *skip
edges* ``(src, dst)`` with ``src < dst - 1`` may be added. Each stage combines
its in-edges with its own rule:

- ``'sum'``: add the inputs; shapes must be equal.
- ``'concat'``: concatenate on the channel axis, then a learned linear
  projection back to the chain input's width.

In both rules a skip input whose spatial size is an integer multiple of the
chain input's is average-pooled to fit, so skips across a downsampling stage
work (``(B, 16, 16, 16)`` joins ``(B, 8, 8, 32)`` by a 2x2 pool).

Example::

    net = Network(
        [stages.Conv(1, 16, stride=2, rngs=rngs),
         stages.Conv(16, 32, stride=2, rngs=rngs),
         stages.ResidualConv(32, 32, rngs=rngs)],
        stages.ClassifierHead(32, 10, rngs=rngs),
        frame_shape=(32, 32, 1), skips=[(0, 2)], combine='concat', rngs=rngs)
    spec, params = split(net)   # static structure, parameter pytree

``spec`` is what the engines take; ``params`` is a plain nested dict that
optax and orbax handle directly.
"""

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from skipside import stages as stages_lib

PyTree = Any
COMBINE_RULES = ('sum', 'concat')
LOSSES = ('xent', 'sigmoid_xent', 'mse')


def _pool_to(x: jax.Array, spatial: tuple[int, ...]) -> jax.Array:
  """Average-pools the spatial axes of ``x: (B, *s, C)`` down to ``spatial``."""
  b, c = x.shape[0], x.shape[-1]
  shape = [b]
  for size, target in zip(x.shape[1:-1], spatial):
    shape += [target, size // target]
  x = x.reshape(*shape, c)
  return x.mean(axis=tuple(range(2, 2 + 2 * len(spatial), 2)))


def _fits(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
  """Whether features of shape ``src`` can be pooled to ``dst``'s spatial size."""
  if len(src) != len(dst):
    return False
  return all(s % d == 0 for s, d in zip(src[:-1], dst[:-1]))


class Sum(nnx.Module):
  """Combines in-edges by addition (skip inputs pooled to the chain's size)."""

  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    chain = inputs[0]
    out = chain
    for x in inputs[1:]:
      out = out + _pool_to(x, chain.shape[1:-1])
    return out


class ConcatProject(nnx.Module):
  """Concatenates in-edges on the channel axis and projects to the chain width."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.proj = nnx.Linear(in_features, out_features, rngs=rngs)

  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    chain = inputs[0]
    pooled = [chain] + [_pool_to(x, chain.shape[1:-1]) for x in inputs[1:]]
    return self.proj(jnp.concatenate(pooled, axis=-1))


class Block(nnx.Module):
  """One stage with the rule that combines its in-edges (``None`` for one)."""

  def __init__(self, stage: nnx.Module, combine: nnx.Module | None):
    self.stage = stage
    self.combine = combine

  def __call__(self, inputs: Sequence[jax.Array], state: PyTree, *,
               sideways: bool = False):
    """``(y, new_state)``; ``sideways`` as in ``stages.call_stage``."""
    return self.apply(inputs, state, sideways=sideways)[:2]

  def apply(self, inputs: Sequence[jax.Array], state: PyTree, *,
            sideways: bool = False):
    """``(y, new_state, x)`` with ``x`` the combined input."""
    x = inputs[0] if self.combine is None else self.combine(tuple(inputs))
    y, state = stages_lib.call_stage(self.stage, x, state, sideways=sideways)
    return y, state, x


def _describe(stage: nnx.Module, index: int) -> str:
  return f'stage {index} ({type(stage).__name__})'


def _validate_edges(num_stages: int, skips) -> tuple[tuple[int, int], ...]:
  """Checks skip edges; returns them sorted. Errors name the edge."""
  seen = set()
  if len(skips) == 2 and all(isinstance(v, int) for v in skips):
    raise ValueError(
        f'skips={tuple(skips)!r} is one edge without the outer list: write '
        f'skips=[{tuple(skips)!r}] (a list of (src, dst) pairs)')
  for edge in skips:
    if not isinstance(edge, Sequence) or len(edge) != 2:
      raise ValueError(f'skip edge {edge!r} must be a pair (src, dst); skips '
                       'is a list of pairs, e.g. [(0, 2), (1, 3)]')
    src, dst = (int(v) for v in edge)
    for end in (src, dst):
      if not 0 <= end < num_stages:
        raise ValueError(
            f'skip edge ({src}, {dst}) points at missing stage {end}: the '
            f'network has stages 0..{num_stages - 1}')
    if src >= dst:
      raise ValueError(
          f'skip edge ({src}, {dst}) makes a cycle: edges must go up the '
          f'network (src < dst), stage {dst} already feeds stage {src}'
          if src > dst else f'skip edge ({src}, {dst}) is a self-loop (a cycle)')
    if src == dst - 1:
      raise ValueError(
          f'skip edge ({src}, {dst}) duplicates the chain edge {src} -> {dst}')
    if (src, dst) in seen:
      raise ValueError(f'skip edge ({src}, {dst}) is given twice')
    seen.add((src, dst))
  return tuple(sorted(seen))


def _combine_rules(combine, num_stages: int) -> list[str]:
  if isinstance(combine, str):
    rules = [combine] * num_stages
  elif isinstance(combine, Mapping):
    rules = ['sum'] * num_stages
    for k, v in combine.items():
      if not 0 <= int(k) < num_stages:
        raise ValueError(f'combine rule given for missing stage {k}')
      rules[int(k)] = v
  else:
    rules = list(combine)
    if len(rules) != num_stages:
      raise ValueError(
          f'combine has {len(rules)} rules for {num_stages} stages')
  for i, r in enumerate(rules):
    if r not in COMBINE_RULES:
      raise ValueError(
          f'combine rule {r!r} for stage {i} is unknown; use one of '
          f'{COMBINE_RULES}')
  return rules


def _abstract_call(module: nnx.Module, fn, *args):
  """``jax.eval_shape`` of ``fn(module, *args)`` with the module's variables
  as arguments: they may be arrays or ``ShapeDtypeStruct``s (a spec's
  abstract params), and nothing the call writes leaks into ``module``."""
  graphdef, variables = nnx.split(module)
  return jax.eval_shape(
      lambda v, *a: fn(nnx.merge(graphdef, v), *a), variables, *args)


def _eval_stage(stage, index, x: jax.ShapeDtypeStruct):
  """Output shape of ``stage`` on ``x``; errors name the stage."""
  try:
    state = _abstract_call(stage, stages_lib.init_stage_state, x)
    y, new_state = _abstract_call(
        stage, lambda m, x, s: stages_lib.call_stage(m, x, s), x, state)
  except Exception as e:  # Re-raised with the stage and shape named.
    raise ValueError(
        f'{_describe(stage, index)} failed on input of shape {x.shape} '
        f'{x.dtype}: {e}') from e
  if not isinstance(y, jax.ShapeDtypeStruct):
    raise ValueError(
        f'{_describe(stage, index)} must return one array (the stage '
        f'contract, skipside/stages.py), got {type(y).__name__}')
  if y.ndim < 2:
    raise ValueError(
        f'{_describe(stage, index)} maps {x.shape} to rank-{y.ndim} output '
        f'{y.shape}: a stage returns (batch, features...), rank 2 or more')
  if y.shape[0] != x.shape[0]:
    raise ValueError(
        f'{_describe(stage, index)} maps {x.shape} to {y.shape}: the batch '
        'axis must come first and be preserved')
  if jax.tree.structure(new_state) != jax.tree.structure(state) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(new_state),
                                         jax.tree.leaves(state))):
    raise ValueError(
        f'{_describe(stage, index)} returns state of a different structure '
        'or shape than its init_state')
  return y


def _check_skips(l, rule, sources, shapes, stage_of):
  """Raises if stage ``l``'s skip inputs do not combine with its chain input
  under ``rule`` (naming the edge, both stages and both shapes)."""
  chain = shapes[0]
  for k, s in zip(sources[1:], shapes[1:]):
    if not (_fits(s, chain) and (rule == 'concat' or s[-1] == chain[-1])):
      raise ValueError(
          f'skip edge ({k}, {l}): {_describe(stage_of(k), k)} outputs '
          f'{tuple(s)} but {_describe(stage_of(l), l)} takes {tuple(chain)} '
          f'from the chain; with combine {rule!r} these do not combine ('
          + ('channels must match and ' if rule == 'sum' else '')
          + 'spatial sizes must be integer multiples of the chain input)')


def _infer_shapes(stage_of, head: nnx.Module, in_edges, rules,
                 frame_shape: Sequence[int], on_combine=None):
  """Shape inference over the stage graph, written once.

  ``Network`` runs it at construction (building its combine modules through
  ``on_combine``) and ``for_frame_shape`` on a spec's blocks at another frame
  size. Stage 0 reads a frame; stage ``l`` its in-edges (chain first),
  checked and combined by ``rules[l]`` into the chain input's shape; each
  stage's output comes from ``jax.eval_shape`` of its ``init_state`` and
  call, checked against the stage contract. Batch 2: batch 1 would hide
  batch-axis mistakes. Nothing is computed.

  Args:
    stage_of: stage index -> its stage module (params may be arrays or
      ``ShapeDtypeStruct``s).
    head: the head module.
    in_edges: per stage, its source stages, chain first (``()`` for 0).
    rules: per stage, its combine rule (``COMBINE_RULES``).
    frame_shape: one frame without the batch axis.
    on_combine: called as ``on_combine(l, shapes)`` for every stage
      ``l > 0`` with its in-edges' feature shapes once they are checked.

  Returns:
    ``(in_shapes, out_shapes, prediction_shape)``: per stage its combined
    input and its output feature shape, and the head's; no batch axis.

  Raises:
    ValueError: naming the stage (or the head) that fails on its input or
      breaks the contract, or the skip edge whose shapes do not combine.
  """
  x = jax.ShapeDtypeStruct((2, *frame_shape), jnp.float32)
  ins, outs = [], []
  for l, sources in enumerate(in_edges):
    if l > 0:
      shapes = [outs[k].shape[1:] for k in sources]
      _check_skips(l, rules[l], sources, shapes, stage_of)
      if on_combine is not None:
        on_combine(l, shapes)
      # Both rules give the chain input's shape (pool, then sum or project).
      x = jax.ShapeDtypeStruct((2, *shapes[0]), jnp.float32)
    ins.append(x)
    outs.append(_eval_stage(stage_of(l), l, x))
  try:
    pred = _abstract_call(head, lambda m, y: m(y), outs[-1])
  except Exception as e:  # Re-raised with the shape named.
    raise ValueError(
        f'head ({type(head).__name__}) failed on the top stage output '
        f'{outs[-1].shape}: {e}') from e
  return (tuple(tuple(v.shape[1:]) for v in ins),
          tuple(tuple(y.shape[1:]) for y in outs), tuple(pred.shape[1:]))


class Network(nnx.Module):
  """Stages + chain + skip edges + head + loss, validated at construction.

  Args:
    stages: the stage modules, bottom to top (see the contract in
      ``skipside/stages.py``).
    head: maps the top stage's output to predictions.
    frame_shape: one frame's shape without the batch axis, e.g. ``(32, 32, 1)``.
    skips: skip edges ``(src, dst)``, ``src < dst - 1``.
    combine: ``'sum'`` or ``'concat'`` for every stage, or a list / dict
      ``{stage: rule}`` (stages not named use ``'sum'``).
    loss: ``'xent'`` (int labels), ``'sigmoid_xent'`` (multi-hot labels) or
      ``'mse'`` (regression targets such as the next frame).
    rngs: for the projections of ``'concat'`` rules.
  """

  def __init__(self, stages: Sequence[nnx.Module], head: nnx.Module, *,
               frame_shape: Sequence[int], skips=(), combine='sum',
               loss: str = 'xent', rngs: nnx.Rngs):
    if not stages:
      raise ValueError('a network needs at least one stage')
    if loss not in LOSSES:
      raise ValueError(f'loss {loss!r} is unknown; use one of {LOSSES}')
    num = len(stages)
    self.skips = _validate_edges(num, skips)
    rules = _combine_rules(combine, num)
    self.frame_shape = tuple(int(d) for d in frame_shape)
    self.loss = loss
    in_edges = [(l - 1,) + tuple(s for s, d in self.skips if d == l)
                for l in range(num)]
    in_edges[0] = ()
    self.in_edges = tuple(in_edges)

    # Combine modules are built as inference reaches each stage: a concat
    # projection's width is its in-edges' channel count.
    combines = [None] * num

    def build_combine(l, shapes):
      if len(shapes) > 1:
        combines[l] = (Sum() if rules[l] == 'sum' else ConcatProject(
            sum(s[-1] for s in shapes), shapes[0][-1], rngs=rngs))

    self.in_shapes, self.out_shapes, self.prediction_shape = _infer_shapes(
        stages.__getitem__, head, self.in_edges, rules, self.frame_shape,
        on_combine=build_combine)
    self.blocks = nnx.List([Block(s, c) for s, c in zip(stages, combines)])
    self.head = head

  @property
  def num_stages(self) -> int:
    return len(self.blocks)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
  """The static structure of a network: what the engines need besides params.

  Hashable by value (graph definitions, edges, shapes, loss), so it can be a
  static argument of ``jax.jit``: equal networks share their compilations.

  Attributes:
    block_defs: NNX graph definitions, one per stage (its combine rule included).
    head_def: graph definition of the head.
    in_edges: per stage, the source stages of its in-edges, chain first
      (``()`` for stage 0, which reads the frame).
    out_edges: per stage, the stages it feeds (chain and skips).
    in_shapes, out_shapes: per stage, feature shapes without the batch axis.
    temporal: per stage, whether it carries temporal state.
    frame_shape, prediction_shape: one frame; one tick's head output.
    variants: specs of the same network for other frame sizes
      (``for_frame_shape``); internal cache.
    loss: the loss name (see ``Network``).
  """
  block_defs: tuple
  head_def: Any
  in_edges: tuple[tuple[int, ...], ...]
  out_edges: tuple[tuple[int, ...], ...]
  in_shapes: tuple[tuple[int, ...], ...]
  out_shapes: tuple[tuple[int, ...], ...]
  temporal: tuple[bool, ...]
  frame_shape: tuple[int, ...]
  prediction_shape: tuple[int, ...]
  loss: str
  # frame_shape -> spec, shared by a spec and those derived from it
  # (``for_frame_shape``), so each frame size maps to one spec object.
  variants: dict = dataclasses.field(default_factory=dict, repr=False,
                                     compare=False)

  @property
  def num_stages(self) -> int:
    return len(self.block_defs)

  @property
  def depth(self) -> int:
    """Ticks from a frame entering stage 0 to its chain output at the top."""
    return self.num_stages - 1

  def apply_block(self, l: int, params: PyTree, inputs: Sequence[jax.Array],
                  state: PyTree, *, sideways: bool = False):
    """Stage ``l`` on its in-edge values ``inputs`` (chain first): (y, state).

    ``sideways``: for the Sideways VJP, a temporal stage's cached inputs
    are linked to its current input (``stages.link_cache``).
    """
    return nnx.merge(self.block_defs[l], params)(tuple(inputs), state,
                                                 sideways=sideways)

  def apply_head(self, params: PyTree, y: jax.Array) -> jax.Array:
    return nnx.merge(self.head_def, params)(y)

  def init_states(self, params: PyTree, batch_size: int,
                  dtype=jnp.float32) -> tuple:
    """Zero temporal states for every stage (``()`` for stateless ones)."""
    states = []
    for l in range(self.num_stages):
      if not self.temporal[l]:
        states.append(())
        continue
      block = nnx.merge(self.block_defs[l], params['blocks'][l])
      x = jax.ShapeDtypeStruct((batch_size, *self.in_shapes[l]), dtype)
      states.append(jax.tree.map(lambda s: s.astype(dtype),
                                 block.stage.init_state(x)))
    return tuple(states)


def for_frame_shape(spec: NetworkSpec, params: PyTree,
                    frame_shape: Sequence[int]) -> NetworkSpec:
  """The spec of the same network on frames of another spatial size.

  Conv stages and a globally pooling head accept any spatial size; the stage
  shapes (hence carries, states and mesh buffers) change with it. Shapes are
  inferred over the spec's blocks by the same walk ``Network`` runs at
  construction (``_infer_shapes``); nothing is computed. The result is
  cached: one spec object per frame shape, so jitted functions that take it
  as a static argument compile once per shape.

  Args:
    spec, params: from ``split`` (``params`` may be ``ShapeDtypeStruct``s).
    frame_shape: ``(H, W, C)`` (or any shape of the same rank); the channel
      count must be the network's.

  Raises:
    ValueError: naming the shape, for a wrong rank or channel count, a skip
      edge whose spatial sizes no longer pool to the chain's, or a stage
      (or the head) that fails on its input at this size.
  """
  frame_shape = tuple(int(d) for d in frame_shape)
  cache = spec.variants
  cache.setdefault(spec.frame_shape, spec)
  if frame_shape in cache:
    return cache[frame_shape]
  base = spec.frame_shape
  if len(frame_shape) != len(base) or frame_shape[-1] != base[-1]:
    raise ValueError(
        f'frames of shape {frame_shape} do not fit the network: it takes '
        f'frames of rank {len(base)} with {base[-1]} channels (built for '
        f'{base})')
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                          params)
  blocks = [nnx.merge(d, p) for d, p in zip(spec.block_defs,
                                            abstract['blocks'])]
  rules = ['concat' if isinstance(b.combine, ConcatProject) else 'sum'
           for b in blocks]
  try:
    in_shapes, out_shapes, prediction_shape = _infer_shapes(
        lambda l: blocks[l].stage, nnx.merge(spec.head_def, abstract['head']),
        spec.in_edges, rules, frame_shape)
  except ValueError as e:
    raise ValueError(f'frames of shape {frame_shape}: {e}') from e
  derived = dataclasses.replace(
      spec, frame_shape=frame_shape, in_shapes=in_shapes,
      out_shapes=out_shapes, prediction_shape=prediction_shape,
      variants=cache)
  cache[frame_shape] = derived
  return derived


def trainable_mask(spec: NetworkSpec, params: PyTree,
                   frozen_stages: Sequence[int] = ()) -> PyTree:
  """``params``' structure with ``True`` on ``nnx.Param`` leaves and
  ``False`` on ``nnx.BatchStat`` ones (statistics evaluation fills in:
  ``optim.make_optimizer`` never updates or decays them) and on every leaf
  of the stages ``frozen_stages`` (they keep their values; messages still
  pass through them)."""
  def mask(graphdef, p, frozen=False):
    stats = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, p), nnx.BatchStat))
    paths = {path for path, _ in jax.tree_util.tree_leaves_with_path(stats)}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not frozen and path not in paths, p)
  return {'blocks': [mask(d, p, l in frozen_stages) for l, (d, p) in
                     enumerate(zip(spec.block_defs, params['blocks']))],
          'head': mask(spec.head_def, params['head'])}


def _split_module(module: nnx.Module, what: str):
  """Graph definition and pure-dict params; errors on non-Param variables."""
  graphdef, params, rest = nnx.split(module, (nnx.Param, nnx.BatchStat), ...)
  leaves = jax.tree_util.tree_leaves_with_path(rest)
  if leaves:
    names = sorted({jax.tree_util.keystr(p) for p, _ in leaves})
    raise ValueError(
        f'{what} holds non-parameter variables {names}; a stage may hold '
        'nnx.Param (and nnx.BatchStat) only, temporal state is declared with '
        'init_state '
        '(the stage contract, skipside/stages.py)')
  return graphdef, nnx.to_pure_dict(params)


def split(net: Network) -> tuple[NetworkSpec, dict]:
  """Splits a network into its static ``NetworkSpec`` and a params dict.

  Returns:
    ``(spec, params)`` with ``params = {'blocks': [p_0, .., p_{L-1}],
    'head': p_head}``, each a nested dict of arrays.
  """
  defs, block_params = [], []
  for l, block in enumerate(net.blocks):
    gd, p = _split_module(block, _describe(block.stage, l))
    defs.append(gd)
    block_params.append(p)
  head_def, head_params = _split_module(net.head, 'the head')
  num = net.num_stages
  out_edges = tuple(tuple(d for d in range(num) if l in net.in_edges[d])
                    for l in range(num))
  spec = NetworkSpec(
      block_defs=tuple(defs), head_def=head_def,
      in_edges=net.in_edges, out_edges=out_edges,
      in_shapes=net.in_shapes, out_shapes=net.out_shapes,
      temporal=tuple(stages_lib.is_temporal(b.stage) for b in net.blocks),
      frame_shape=net.frame_shape, prediction_shape=net.prediction_shape,
      loss=net.loss)
  return spec, {'blocks': block_params, 'head': head_params}
