r"""Which stages' Sideways gradients stop Skip-Sideways learning motion.

  python -m experiments.benchmarks.motion_hybrid            # ~45 min, 2 cores
  python -m experiments.benchmarks.motion_hybrid --rows 0,1 --seeds 5
  python -m experiments.benchmarks.motion_hybrid --quick    # a smoke run

Section 1 of RESULTS.md trains the Skip-Sideways A net on motion to 52.0 +-
24.0% over 5 seeds while the exact gradient of the same pipelined net
(``pipelined_bp`` with the same skips) reaches 100% on every seed. Both
gradients are of one loss (the pipelined forward is the same); they differ
only per stage, in the time mismatch of each stage's Sideways VJP. This
benchmark locates the failure: every row trains with the *hybrid* gradient
that takes the Sideways gradient for the stages it names and the exact
``pipelined_bp`` gradient for every other stage (and the head), from the
same clip, the same forward, the same optimizer step
(``engine.optimize_clip``). With every stage named it is Skip-Sideways,
with none ``pipelined_bp`` (the test checks both, to float rounding, and
that ``optimizer.frozen_stages`` trains as the frozen rows do).

Settings, seeds, nets and the held-out score are section 1's (through
``motion_seeds.run_row`` and ``reproduce.train_run``): seed ``s`` here
starts from the same init and reads the same batches as seed ``s`` there.
Rows (Sideways stages, bottom first; stage 4's Sideways gradient is exact,
its staleness is 0):

- ``sideways on stages 0-1``: exact above. If the bottom stages' Sideways
  gradients are what fails, this row fails like Skip-Sideways;
- ``sideways on stages 2-4``: exact on stages 0-1;
- ``sideways on stage 0``, ``sideways on stage 1``: one stage each;
- ``stages 0-1 frozen, sideways on 2-4``: stages 0-1 keep their random
  init (no gradient). Against ``sideways on stages 2-4`` it asks whether
  the bottom stages need training at all; against Skip-Sideways, whether
  their Sideways gradient is worse than none;
- ``stage 1 frozen, sideways on 0, 2-4``: Skip-Sideways with one stage
  (the one that fails alone) left at its init.

Writes ``experiments/results/motion_hybrid.json`` (rows as
``motion_seeds``, each with its ``sideways_stages`` and ``frozen_stages``).

Measured (2-core CPU, 5 seeds, 2026-12-06, ~1.5 min per run; mean +- std,
seeds >= 95%). The committed JSON merges four invocations (``--rows 0,1``,
``2,3``, ``4``, ``5``; its ``config.invocations``): ``--rows 0,1,2,3,4,5``
makes it in one, each run depending only on its row and seed.

====================================  ==============  =====
row                                   held-out %      >= 95
====================================  ==============  =====
every stage Sideways (section 1)      52.0 +- 24.0    1
sideways on stages 0-1                81.4 +- 26.6    3
sideways on stages 2-4                99.96 +- 0.08   5
sideways on stage 1                   84.0 +- 20.7    3
sideways on stage 0                   100.0 +- 0.0    5
stages 0-1 frozen, sideways on 2-4    99.8 +- 0.2     5
stage 1 frozen, sideways on 0, 2-4    98.9 +- 1.9     5
====================================  ==============  =====

So the failure is stage 1's Sideways gradient (the second stage: stride 4,
messages 2 ticks away, 4 ticks stale; it feeds stage 2 by the chain and
stage 3 by a skip, where its features meet a newer frame's). Alone among
exact ones it fails 2 seeds (49.2% and 71.0%, both after a lower train
loss, 0.72 and 0.71: partly learnt, then regressed), and every row without
it learns every seed. Stage 0's, as stale, is harmless here. It is worse
than no gradient at all: left at its random init, stage 1 costs nothing
(Sideways on every other stage, 98.9 +- 1.9%). With stages 2-3 also
Sideways the failure grows (52.0%). Why stage 1's gradient misleads is not
established; its *mean* direction over held-out batches is near orthogonal
to the exact one (RESULTS section 6, ``fidelity --mean_seeds``: median
cosine 0.04).
"""

import functools

import jax
import jax.numpy as jnp

from experiments import reproduce
from experiments.benchmarks import motion_seeds
from skipside import engine

# (name, stages whose gradient is Sideways's, stages with no gradient); the
# others take the exact one.
ROWS = (
    ('sideways on stages 0-1', (0, 1), ()),
    ('sideways on stages 2-4', (2, 3, 4), ()),
    ('sideways on stage 1', (1,), ()),
    ('sideways on stage 0', (0,), ()),
    ('stages 0-1 frozen, sideways on 2-4', (2, 3, 4), (0, 1)),
    ('stage 1 frozen, sideways on 0, 2-4', (0, 2, 3, 4), (1,)),
)


@functools.partial(jax.jit, static_argnames=('spec', 'optimizer',
                                             'sideways_stages',
                                             'frozen_stages'))
def hybrid_train_step(spec, optimizer, params, opt_state, clip, targets, *,
                      sideways_stages: tuple[int, ...],
                      frozen_stages: tuple[int, ...] = ()):
  """``engine.train_step`` (fresh stream, fill masked, no flush) with stage
  ``l``'s gradient from ``mode='sideways'`` if ``l in sideways_stages``,
  zero if ``l in frozen_stages`` (Adam then leaves it at its init), else
  from ``mode='pipelined_bp'``; the head's is exact in both.

  Args:
    spec, optimizer, params, opt_state: as ``engine.train_step``.
    clip: ``(B, T, H, W, C)``; targets: ``(B,)`` labels.
    sideways_stages, frozen_stages: stage indices, bottom = 0.

  Returns:
    ``(params, opt_state, ClipOutput)``, the output of the forward both
    gradients share.
  """
  eng = engine.LocalEngine(spec)
  kw = dict(mask_fill=True, compute_dtype=jnp.float32)

  def grads_fn(p, carry, start, length):
    loss, sideways, out = eng.window_grads(
        p, clip, targets, carry, mode='sideways', start=start, length=length,
        **kw)
    exact = sideways  # Its head gradient is the exact one too.
    if set(range(spec.num_stages)) - set(sideways_stages) - set(
        frozen_stages):  # Some stage takes the exact gradient.
      fresh = eng.init_carry(p, clip, targets, 'pipelined_bp')
      _, exact, _ = eng.window_grads(
          p, clip, targets, fresh, mode='pipelined_bp', start=start,
          length=length, **kw)
    blocks = [sideways['blocks'][l] if l in sideways_stages else b
              for l, b in enumerate(exact['blocks'])]
    blocks = [jax.tree.map(jnp.zeros_like, b) if l in frozen_stages else b
              for l, b in enumerate(blocks)]
    return loss, {**exact, 'blocks': blocks}, out

  carry = eng.init_carry(params, clip, targets, 'sideways')
  return engine.optimize_clip(grads_fn, optimizer, params, opt_state, carry,
                              num_frames=clip.shape[1], flush=0,
                              update_every=None)


def run_row(row, seeds: int, base) -> dict:
  """``motion_seeds.run_row`` on the Skip-Sideways A net, hybrid steps."""
  name, sideways_stages, frozen_stages = row
  step = functools.partial(hybrid_train_step,
                           sideways_stages=tuple(sideways_stages),
                           frozen_stages=tuple(frozen_stages))
  out = motion_seeds.run_row(
      (name, 'sideways', reproduce.STAGES, reproduce.SKIPS_A, 'default', 0),
      seeds, base, step)
  out['mode'] = 'hybrid'
  out['sideways_stages'] = list(sideways_stages)
  out['frozen_stages'] = list(frozen_stages)
  return out


def main(argv=None):
  motion_seeds.main(argv, ROWS, run_row, 'motion_hybrid', __doc__)


if __name__ == '__main__':
  main()
