"""Multigrid training: a schedule of batch shapes and one executable per shape.

Multigrid (Wu et al., CVPR 2020; DESIGN.md §3) trains on mini-batches of
varying shape ``(b, t, s)`` -- clips per batch, frames per clip, crop side --
keeping ``b·t·s²`` about constant, so coarse shapes take big, cheap steps:

- *Long cycle*: every baseline LR step is split over the stages of
  ``long_cycle_factors`` (``(t/T, s/S)``, default
  ``[(0.25, 0.7071), (0.5, 0.7071), (0.5, 1), (1, 1)]``, batch 8x/4x/2x/1x) in
  proportion to their mean batch factor; the last baseline LR step becomes a
  fine-tuning phase at the base shape (two LR levels); the whole schedule is
  stretched to ``epoch_factor`` (1.5) times the baseline's epochs. LR is linear
  in the long-cycle batch factor.
- *Short cycle*: within a stage, iterations cycle through crops
  ``short_cycle_factors · S`` (0.5, 0.7071) and the stage's own crop, with the
  batch scaled up to match; LR unchanged.

LR warm-up (``optimizer.warmup_steps``) is the reference's
(``lr_policy.get_lr_at_epoch``): linear from ``optimizer.warmup_start_lr`` to
the schedule's own rate at the warm-up's end, counted in training steps
(``Schedule.step_at_epoch`` converts the reference's ``WARMUP_EPOCHS``; the
loop caps it at half the run, as the cosine's: ``optim``).
End epochs are fractional by default; ``config.multigrid.round_epochs``
rounds them to integers as the reference does (its configs then give the
same phases, e.g. a stage of 0 epochs gets no steps).

Both cycles switch independently (the reference crashes with the long cycle
alone; here it works). Nothing is rebuilt at a shape change: every shape the
schedule uses (a *bucket*) is known before training and compiled ahead of time
into its own XLA executable (``programs.compile_ahead``, ``skipside/aot.py``);
a shape outside the table is an error, never a silent recompile. Each bucket
runs the network at its frame size through ``network.for_frame_shape`` (the
same params; stage shapes by inference).

Pieces: ``make_schedule`` / ``schedule_from_config`` (steps, shapes, LR);
the batches of the step's shape (frames, crop, a random stride in
``[stride, stride·T/t]``, the scale-jitter floor shrunk with the crop) come
from ``skipside/data/multigrid_loader.py``. Sub-batch BN, which keeps batch
statistics over a fixed base size whatever the bucket's batch, is the stage
``stages.SubBatchNorm`` (``skipside/sub_batch.py``). It normalizes within a
device, so a device's base batch must be a multiple of the base size (every
bucket then splits into whole groups of it). The reference also handles fewer
clips per device than the base (Charades/SSv2: 2 clips per GPU, base 8) by
switching the norm at each long-cycle stage (sub-batch BN above the base,
plain BN at it, BN synchronized over ``base / clips`` GPUs below it); stages
here take no statistics across devices, so that layout is a config error
(``config.validate_config``) -- on a depth-parallel mesh the devices of
``mesh.stage`` share their batch, so fewer ``mesh.data`` devices give each
more clips. ``depth_errors`` names buckets whose clips are too short for a
pipelined mode (no loss tick after the pipeline fill). The training loop
uses them when ``config.multigrid.long_cycle`` or ``short_cycle`` is on
(``skipside/train.py``; ``experiments/configs/multigrid.py``).

On a mesh, place the base spec once and every bucket's spec on the same
groups, so one params pytree serves all buckets::

    base = mesh.place(spec, m, params=params)
    bucket = mesh.place(network.for_frame_shape(spec, params, (s, s, c)), m,
                        groups=base.groups)

Example::

    sched = multigrid.make_schedule(
        num_frames=32, crop_size=224, batch_size=8, num_examples=240_000,
        lr_steps=(0, 94, 154, 196), max_epoch=239)
    print(sched.table())
    sched.shape(step)            # Shape(batch=64, frames=8, crop=158)
    sched.lr_multiplier(step)    # 8.0
    sched.buckets()              # every Shape of the run, known up front
    lr = sched.lr_schedule(0.1, warmup_steps=100)  # step -> learning rate
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

LONG_CYCLE_FACTORS = ((0.25, 0.5 ** 0.5), (0.5, 0.5 ** 0.5), (0.5, 1.0),
                      (1.0, 1.0))
SHORT_CYCLE_FACTORS = (0.5, 0.5 ** 0.5)
GAMMA = 0.1  # LR decay per baseline LR step (the 'step' schedule's).


class Shape(NamedTuple):
  """One batch shape (a bucket): global clips per batch, frames, crop side."""
  batch: int
  frames: int
  crop: int


class Phase(NamedTuple):
  """A run of steps at one LR level and one cycle of shapes.

  Attributes:
    lr_step: index of the baseline LR step it belongs to (the last one is the
      fine-tuning phase).
    cycle: the shapes of successive iterations, repeated; one shape without
      the short cycle, the long-cycle (base) shape last.
    lr_multiplier: of the base learning rate.
    start_step, num_steps: the phase's steps ``[start, start + num)``.
    end_epoch: epochs of data seen at the end of the phase.
  """
  lr_step: int
  cycle: tuple[Shape, ...]
  lr_multiplier: float
  start_step: int
  num_steps: int
  end_epoch: float


# ---------------------------------------------------------------------------
# The reference's long-cycle schedule (in epochs).

def _cycle_factors(t: int, crop: float, num_frames: int, crop_size: int,
                   short_cycle: bool, short_factors: Sequence[float]
                   ) -> list[tuple[int, int, float]]:
  """``[batch_factor, t, s]`` of each iteration of a long-cycle stage.

  The batch factor keeps ``b·t·s²`` at the base ``T·S²``; short-cycle crops
  are fractions of the *base* crop ``S`` (so a stage whose own crop is already
  ``0.7071·S`` gets 2x/1x/1x, as in the reference).
  """
  crops = ([f * crop_size for f in short_factors] if short_cycle else []) + [
      crop]
  size = float(num_frames * crop_size ** 2)
  return [(int(round(size / (t * s * s))), t, s) for s in crops]


def long_cycle_schedule(num_frames: int, crop_size: int,
                        lr_steps: Sequence[float], max_epoch: float, *,
                        long_factors=LONG_CYCLE_FACTORS,
                        short_factors=SHORT_CYCLE_FACTORS,
                        short_cycle: bool = True, epoch_factor: float = 1.5,
                        round_epochs: bool = True, min_frames: int = 1):
  """The reference's long-cycle schedule.

  Args:
    num_frames, crop_size: the base shape ``(T, S)``.
    lr_steps: epochs where the baseline's LR steps start, ``0`` first
      (``[0, 94, 154, 196]``); the last one starts the fine-tuning phase.
    max_epoch: the baseline's epochs.
    long_factors: ``(t/T, s/S)`` per long-cycle stage.
    short_factors: crop fractions of the short cycle.
    short_cycle: whether the short cycle is on (it changes the mean batch
      factors, hence the epoch allotment).
    epoch_factor: multigrid epochs over the baseline's.
    round_epochs: round end epochs to integers as the reference does (off
      for short runs of a few epochs).
    min_frames: the fewest frames a stage may have (not in the reference:
      pipelined modes mask their first ``depth`` ticks, so they need clips
      longer than that); batch factors follow the frames actually used.

  Returns:
    ``[(lr_step, cycle, end_epoch)]``, one entry per long-cycle stage per LR
    step, then the fine-tuning phase; ``cycle`` is the list of
    ``(batch_factor, t, s)`` of its iterations (base shape last; ``s`` of
    short-cycle entries unrounded, as the reference computes batches).
  """
  lr_steps = [float(s) for s in lr_steps]
  if len(lr_steps) < 2 or lr_steps[0] != 0 or any(
      b <= a for a, b in zip(lr_steps, lr_steps[1:])) or max_epoch <= lr_steps[
          -1]:
    raise ValueError(
        f'lr_steps {lr_steps} must start at 0, increase, hold at least one '
        f'step before the fine-tuning one, and end before max_epoch '
        f'{max_epoch}')
  cycles, mean_batch = [], []
  for t_factor, s_factor in long_factors:
    t = max(min_frames, int(round(num_frames * t_factor)))
    s = int(round(crop_size * s_factor))
    cycle = _cycle_factors(t, s, num_frames, crop_size, short_cycle,
                           short_factors)
    cycles.append(cycle)
    mean_batch.append(float(np.mean([c[0] for c in cycle])))

  # Epochs per stage in proportion to its mean batch: equal iterations.
  entries, total_iters = [], 0.0
  for i in range(len(lr_steps) - 1):
    step_epochs = lr_steps[i + 1] - lr_steps[i]
    for cycle, mean in zip(cycles, mean_batch):
      epochs = step_epochs * mean / sum(mean_batch)
      total_iters += epochs / mean
      entries.append((i, cycle, epochs))
  # The fine-tuning phase saves iterations at the same rate as the rest.
  saving = lr_steps[-1] / total_iters
  ft_epochs = (max_epoch - lr_steps[-1]) / saving * mean_batch[-1]
  # At the base shape, with the short cycle if it is on (its mean batch set
  # the iteration count just above). The reference indexes the third
  # short-cycle entry here, which crashes without the short cycle.
  entries.append((len(lr_steps) - 1, cycles[-1], ft_epochs))

  stretch = max_epoch * epoch_factor / sum(e for _, _, e in entries)
  out, total = [], 0.0
  for i, cycle, epochs in entries:
    total += epochs * stretch
    out.append((i, cycle, int(round(total)) if round_epochs else total))
  return out


# ---------------------------------------------------------------------------
# The schedule in steps.

def _round_crop(s: float, multiple: int) -> int:
  return max(multiple, int(round(s / multiple)) * multiple)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Multigrid schedule in training steps.

  Attributes:
    phases: consecutive ``Phase``s covering steps ``[0, num_steps)``.
    base: the base ``Shape`` (baseline batch, frames, crop).
    stride: the base temporal stride.
    scale_jitter: the base ``(lo, hi)`` shorter-side jitter, or ``None``.
  """
  phases: tuple[Phase, ...]
  base: Shape
  stride: int = 1
  scale_jitter: tuple[int, int] | None = None

  @property
  def num_steps(self) -> int:
    last = self.phases[-1]
    return last.start_step + last.num_steps

  def phase_index(self, step: int) -> int:
    """Index of the phase that holds ``step`` (the last one past the end)."""
    starts = [p.start_step for p in self.phases]
    return max(0, int(np.searchsorted(starts, step, side='right')) - 1)

  def shape(self, step: int) -> Shape:
    """The batch shape of ``step``."""
    p = self.phases[self.phase_index(step)]
    return p.cycle[(step - p.start_step) % len(p.cycle)]

  def lr_multiplier(self, step: int) -> float:
    return self.phases[self.phase_index(step)].lr_multiplier

  def buckets(self) -> list[Shape]:
    """Every shape the schedule uses, largest batch first."""
    return sorted({s for p in self.phases for s in p.cycle}, reverse=True)

  def lr_schedule(self, base_lr: float, *, warmup_steps: int = 0,
                  warmup_start_lr: float = 0.0
                  ) -> Callable[[jax.Array], jax.Array]:
    """An optax schedule: ``base_lr`` times the multiplier of each step.

    Piecewise constant over the phases, after a linear warm-up as the
    reference's ``get_lr_at_epoch``: for ``step < warmup_steps`` the rate is
    ``warmup_start_lr + step · (lr_end - warmup_start_lr) / warmup_steps``,
    ``lr_end`` being the piecewise rate at ``warmup_steps`` (so the ramp
    meets it; it may end in a later phase). The reference counts the
    warm-up in epochs; within one phase epochs are linear in steps, so the
    two agree when it ends in the first phase (``step_at_epoch``).

    Args:
      base_lr, warmup_start_lr: absolute rates (the start is not scaled by
        the batch factor, as in the reference).
      warmup_steps: training steps of warm-up (0: none).

    Returns:
      ``step (int32 scalar) -> rate (float32 scalar)``, jnp only: a pure
      function of the step, so every bucket's executable carries it and no
      shape change recompiles.
    """
    starts = jnp.asarray([p.start_step for p in self.phases[1:]], jnp.int32)
    values = jnp.asarray([base_lr * p.lr_multiplier for p in self.phases],
                         jnp.float32)
    lr_end = base_lr * self.lr_multiplier(warmup_steps)
    slope = (lr_end - warmup_start_lr) / max(1, warmup_steps)

    def lr(count):
      rate = values[jnp.searchsorted(starts, count, side='right')]
      if not warmup_steps:
        return rate
      ramp = warmup_start_lr + jnp.asarray(count, jnp.float32) * slope
      return jnp.where(count < warmup_steps, ramp, rate)
    return lr

  def step_at_epoch(self, epoch: float) -> int:
    """The step at which ``epoch`` epochs of data have been seen.

    Epochs grow linearly within a phase (its mean clips per step); past the
    end, ``num_steps``. Converts the reference's epoch counts (e.g.
    ``SOLVER.WARMUP_EPOCHS``) to steps.
    """
    prev = 0.0
    for p in self.phases:
      if epoch <= p.end_epoch:
        span = p.end_epoch - prev
        frac = (epoch - prev) / span if span > 0 else 0.0
        return p.start_step + int(round(max(0.0, frac) * p.num_steps))
      prev = p.end_epoch
    return self.num_steps

  def max_stride(self, shape: Shape) -> int:
    """Upper end of the random stride: ``stride · T / t``."""
    return self.stride * max(1, self.base.frames // shape.frames)

  def scale_jitter_for(self, shape: Shape) -> tuple[int, int] | None:
    """The jitter range with its lower bound shrunk with the crop."""
    if not self.scale_jitter:
      return None
    lo, hi = self.scale_jitter
    lo = max(1, int(round(lo * shape.crop / self.base.crop)))
    return lo, max(lo, hi)

  def position(self, step: int) -> dict:
    """Where ``step`` is: JSON-able, for checkpoint metadata and logs."""
    i = self.phase_index(step)
    p = self.phases[i]
    return {'step': int(step), 'phase': i, 'lr_step': p.lr_step,
            'step_in_phase': int(step - p.start_step),
            'shape': list(self.shape(step)),
            'lr_multiplier': p.lr_multiplier}

  def table(self) -> str:
    """A readable table of the phases."""
    rows = ['phase lr_step  steps         epoch   lr_mult  cycle (b, t, s)']
    for i, p in enumerate(self.phases):
      cycle = ' '.join(f'({s.batch},{s.frames},{s.crop})' for s in p.cycle)
      rows.append(
          f'{i:5d} {p.lr_step:7d}  {p.start_step:5d}+{p.num_steps:<6d} '
          f'{p.end_epoch:7.2f} {p.lr_multiplier:8.4g}  {cycle}')
    return '\n'.join(rows)


def make_schedule(*, num_frames: int, crop_size: int, batch_size: int,
                  num_examples: int, lr_steps: Sequence[float],
                  max_epoch: float, long_cycle: bool = True,
                  short_cycle: bool = True, epoch_factor: float = 1.5,
                  long_cycle_factors=LONG_CYCLE_FACTORS,
                  short_cycle_factors=SHORT_CYCLE_FACTORS,
                  lr_scaling: str = 'linear', crop_multiple: int = 1,
                  stride: int = 1, scale_jitter=None,
                  gamma: float = GAMMA, min_frames: int = 1,
                  round_epochs: bool = False) -> Schedule:
  """The multigrid schedule of a run, in steps.

  Args:
    num_frames, crop_size, batch_size: the base (baseline) shape ``T, S, B``.
    num_examples: training clips per epoch (converts epochs to steps).
    lr_steps: epochs where the baseline's LR steps start (``0`` first); the
      last one starts the fine-tuning phase. Its LR is ``gamma**i``.
    max_epoch: the baseline's epochs.
    long_cycle, short_cycle: switch each cycle.
    epoch_factor: multigrid epochs over the baseline's (long cycle: the whole
      schedule is stretched; short cycle alone: every LR step is).
    long_cycle_factors, short_cycle_factors: see the module docstring.
    lr_scaling: LR against the long-cycle batch factor: ``'linear'`` (the
      reference), ``'sqrt'`` (often better with Adam) or ``'none'``.
    crop_multiple: crops rounded to a multiple of this (1: the reference's
      rounding; a network whose skip edges pool needs sizes that divide).
    stride, scale_jitter: the base temporal stride and jitter range.
    gamma: LR decay per baseline LR step.
    min_frames: the fewest frames per clip (see ``long_cycle_schedule``).
    round_epochs: phase ends at whole epochs, as the reference's: rounded
      (long cycle; the fine-tuning LR then changes at the integer midpoint
      ``(a + b) // 2``) or truncated (short cycle alone, ``int(end · 1.5)``);
      a phase left with 0 epochs gets no steps. Off: fractional ends (runs
      of a few epochs would otherwise lose whole phases).

  Returns:
    A ``Schedule``. With both cycles off it is the baseline: one shape,
    ``gamma``-stepped LR, ``max_epoch`` epochs.
  """
  scale = {'linear': lambda f: float(f), 'sqrt': math.sqrt,
           'none': lambda f: 1.0}
  if lr_scaling not in scale:
    raise ValueError(f"lr_scaling={lr_scaling!r}: use 'linear', 'sqrt' or "
                     "'none'")
  crop = _crop_rounder(crop_multiple)
  base = Shape(batch_size, num_frames, crop_size)

  def shapes(cycle):
    """(batch factor, t, s) entries -> Shapes with rounded crops."""
    return tuple(Shape(batch_size * f, t, crop(s)) for f, t, s in cycle)

  # [(lr_step, cycle of Shapes, long-cycle batch factor, end epoch)].
  entries = []
  if long_cycle:
    sched = long_cycle_schedule(
        num_frames, crop_size, lr_steps, max_epoch,
        long_factors=long_cycle_factors, short_factors=short_cycle_factors,
        short_cycle=short_cycle, epoch_factor=epoch_factor,
        round_epochs=round_epochs, min_frames=min_frames)
    for i, cycle, end in sched:
      entries.append((i, shapes(cycle), cycle[-1][0], end))
  else:
    factor = epoch_factor if short_cycle else 1.0
    cycle = shapes(_cycle_factors(num_frames, crop_size, num_frames,
                                  crop_size, short_cycle, short_cycle_factors))
    ends = list(lr_steps[1:]) + [max_epoch]
    for i, end in enumerate(ends):
      end = end * factor
      # The reference truncates here (init_multigrid: int(s * EPOCH_FACTOR)).
      entries.append((i, cycle, 1, int(end) if round_epochs and short_cycle
                      else end))

  mults = [gamma ** i * scale[lr_scaling](bf) for i, _, bf, _ in entries]
  phases, start, prev_end = [], 0, 0.0

  def steps_between(a, b, cycle):
    """Steps over epochs ``(a, b]`` at ``cycle``'s mean clips per step."""
    if round_epochs and b <= a:  # 0 epochs: 0 iterations, as the reference.
      return 0
    clips = float(np.mean([s.batch for s in cycle]))
    return max(1, int(round((b - a) * num_examples / clips)))

  def add(i, cycle, mult, end, steps):
    nonlocal start, prev_end
    if steps:
      phases.append(Phase(i, cycle, mult, start, steps, end))
    start += steps
    prev_end = end

  for k, (i, cycle, _, end) in enumerate(entries):
    if long_cycle and k == len(entries) - 1:
      # Fine-tuning: the previous entry's LR (even if it got 0 epochs), then
      # its own; split at the reference's integer midpoint when rounding,
      # else at half the steps.
      if round_epochs:
        mid = (prev_end + end) // 2
        add(i, cycle, mults[k - 1], mid, steps_between(prev_end, mid, cycle))
      else:
        steps = steps_between(prev_end, end, cycle)
        first = max(1, steps // 2)
        add(i, cycle, mults[k - 1], prev_end + (end - prev_end) * first / steps,
            first)
        if steps > first:
          add(i, cycle, mults[k], end, steps - first)
        break
    add(i, cycle, mults[k], end, steps_between(prev_end, end, cycle))
  lost = sorted({e[0] for e in entries} - {p.lr_step for p in phases})
  if lost:  # One stage may round to 0 epochs (SSv2), not a whole LR step.
    raise ValueError(
        f'round_epochs=True (config.multigrid.round_epochs) leaves LR step(s) '
        f'{lost} of max_epoch={max_epoch} baseline epochs without a whole '
        'epoch: use fractional epochs for runs this short')
  return Schedule(phases=tuple(phases), base=base, stride=stride,
                  scale_jitter=tuple(scale_jitter) if scale_jitter else None)


def _crop_rounder(multiple: int) -> Callable[[float], int]:
  """Crop rounding to ``multiple`` (1: plain rounding)."""
  if multiple < 1:
    raise ValueError(f'crop_multiple={multiple} must be >= 1')
  return lambda s: _round_crop(s, multiple)


# ---------------------------------------------------------------------------
# Config.

def enabled(config) -> bool:
  """Whether ``config`` turns on either cycle."""
  mg = config.get('multigrid')
  return bool(mg and (mg.long_cycle or mg.short_cycle))


PIPELINED_MODES = ('pipelined_bp', 'sideways')


def depth_errors(schedule: Schedule, depth: int, mode: str) -> list[str]:
  """Buckets whose fresh clips have no loss tick in ``mode``.

  A pipelined mode masks the first ``depth`` ticks of a fresh clip (the
  pipeline fill; ``depth = L - 1`` for ``L`` stages), so a bucket of
  ``t <= depth`` frames would make zero-gradient steps (the engine rejects
  it at trace time; this says so before any compilation, naming the key).

  Args:
    schedule: the run's ``Schedule`` (every bucket is checked).
    depth: the network's pipeline depth (``NetworkSpec.depth``).
    mode: ``config.mode``; ``'bp'`` has no fill and no constraint.

  Returns:
    One message naming ``config.multigrid.min_frames``, the short buckets
    and the depth, or ``[]``.
  """
  if mode not in PIPELINED_MODES or depth < 1:
    return []
  short = [s for s in schedule.buckets() if s.frames <= depth]
  if not short:
    return []
  frames = sorted({s.frames for s in short})
  return [
      f'config.multigrid.min_frames: multigrid bucket(s) {short} (batch, '
      f'frames, crop) hold clips of {frames} frames, but {mode!r} through '
      f'{depth + 1} stages masks the first {depth} ticks of a fresh clip '
      f'(pipeline depth {depth}), so their steps would have no loss tick and '
      f'zero gradient. Set config.multigrid.min_frames >= {depth + 1} (or '
      "config.mode='bp')"]


def schedule_from_config(config, num_examples: int,
                         frame_side: int | None = None) -> Schedule:
  """The ``Schedule`` of a training config (``config.multigrid``, its keys
  in ``config.defaults``).

  Args:
    config: the full training config.
    num_examples: clips in the training split.
    frame_side: the native frame side, the base crop when
      ``data.crop_size`` is unset.
  """
  mg, d = config.multigrid, config.data
  crop_size = d.crop_size or frame_side
  if not crop_size:
    raise ValueError('multigrid needs config.data.crop_size (or frames of a '
                     'known size)')
  epochs = config.train.num_steps * d.batch_size / num_examples
  lr_steps = [0.0] + [b * epochs for b in config.optimizer.step_boundaries]
  return make_schedule(
      num_frames=d.num_frames, crop_size=crop_size, batch_size=d.batch_size,
      num_examples=num_examples, lr_steps=lr_steps, max_epoch=epochs,
      long_cycle=mg.long_cycle, short_cycle=mg.short_cycle,
      epoch_factor=mg.epoch_factor,
      long_cycle_factors=tuple(tuple(f) for f in mg.long_cycle_factors),
      short_cycle_factors=tuple(mg.short_cycle_factors),
      lr_scaling=mg.lr_scaling, crop_multiple=mg.crop_multiple,
      min_frames=mg.min_frames, round_epochs=mg.get('round_epochs', False),
      stride=d.stride,
      scale_jitter=tuple(d.scale_jitter) if d.scale_jitter else None)
