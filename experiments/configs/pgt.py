r"""PGT: progressive training on long-range MovingDigits (128-frame videos).

  python -m launch.train --config=experiments/configs/pgt.py --workdir=workdir/pgt

The label ('same') is whether the digit class shown in the first 8 frames
equals the one in the last 8; the frames between show distractor digits, so
only a network that carries information across the whole video can solve it.
Each 128-frame video is trained as 8 serial fragments of 16 frames (PGT,
skipside/progressive.py) with the carried stream and the temporal caches
('max' policy, momentum 0.25, gradients summed, one step per video: PGT's
Kinetics settings), exact backprop ('bp') within a fragment.

Variants (``--config=experiments/configs/pgt.py:<variant>``):
  (none)  PGT, as above.
  clip    the clip-based baseline: the same network trained on 16-frame clips
          sampled from the long videos (evaluated by one full pass).
  cpu     PGT at CPU scale (what ``experiments/benchmarks/pgt.py`` runs).
  cpu_clip  the clip baseline at CPU scale.

Evaluation in the training loop is one full pass over each eval clip: the
whole 128-frame video for PGT, a centred 16-frame clip for ``clip`` (the
benchmark evaluates both on whole videos, with every protocol);
``progressive.evaluate_fragments`` adds the fragment ensembles (mean, max, last).
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = default.get_config()
  c.mode = 'bp'  # PGT is exact backprop within a fragment.
  # Temporal stages (causal temporal convs with caches) at three depths: the
  # caches are what carries information from fragment to fragment.
  c.model.stages = 'conv:8:2,tconv,conv:16:2,tconv,conv:32:2,tconv'
  c.model.skips = ()
  c.model.combine = 'sum'

  c.data.task = 'long_range'
  c.data.dataset_config = 'long_range'  # 128 frames, 1000 / 200 videos.
  c.data.num_frames = 128
  c.data.batch_size = 16

  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20

  c.progressive.enabled = True
  c.progressive.fragment_frames = 16
  c.progressive.overlap = 0
  c.progressive.cache_policy = 'max'
  c.progressive.momentum = 0.25
  c.progressive.step_per = 'video'
  c.progressive.truncate_gradients = True
  c.progressive.loss_weighting = 'sum'

  c.train.num_steps = 2000
  c.train.eval_every = 250
  c.train.checkpoint_every = 250

  parts = set(variant.split('_')) - {''}
  if parts - {'clip', 'cpu'}:
    raise ValueError(f'unknown variant {variant!r} of pgt.py')
  if 'clip' in parts:
    c.progressive.enabled = False
    c.data.num_frames = 16  # Clips sampled from the 128-frame videos.
    c.train.num_steps *= 8  # Same frame-passes as PGT.
  if 'cpu' in parts:
    c.train.num_steps //= 13  # 153 PGT steps / 1230 clip steps.
    c.train.eval_every = c.train.num_steps
    c.train.checkpoint_every = c.train.num_steps
  return c
