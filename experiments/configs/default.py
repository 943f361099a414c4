r"""Skip-Sideways on the embedded MovingDigits motion task (the default run).

  python -m launch.train --config=experiments/configs/default.py --workdir=workdir/default

Variants (``--config=experiments/configs/default.py:<variant>``):
  (none)        Skip-Sideways, motion task, about 2 min on a 2-core CPU.
  sideways      the same network without skip edges (chain-only Sideways).
  bp            synchronous exact backprop, same network.
  pipelined_bp  exact gradients through the pipelined graph, same skips.
  appearance    the appearance task (label visible in every frame).
  next_frame    next-frame prediction head (MSE).
  multi_label   digit and direction as one multi-hot label (sigmoid loss, mAP).
  tiny          a few steps on tiny clips: tests and smoke runs.

Any key can be overridden on the command line, e.g.
``--config.mode=bp --config.train.num_steps=100``.
"""

import ml_collections

from skipside import config as config_lib


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  # Every key and its default, with what it means: skipside/config.py
  # defaults() (the default run is the library's defaults).
  c = config_lib.defaults()
  if variant == 'sideways':
    c.model.skips = ()
  elif variant == 'bp':
    c.mode = 'bp'
  elif variant == 'pipelined_bp':
    c.mode = 'pipelined_bp'
  elif variant == 'appearance':
    c.data.task = 'appearance'
  elif variant == 'next_frame':
    c.model.head = 'next_frame'
    c.data.task = 'next_frame'
  elif variant == 'multi_label':
    c.data.task = 'multi_label'
  elif variant == 'tiny':
    c.data.dataset_config = 'small'
    c.data.num_frames = 6
    c.data.batch_size = 4
    c.model.stages = 'conv:4:2,conv:8:2,res:8'
    c.model.skips = ((0, 2),)
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.eval_every = 3
    c.train.checkpoint_every = 2
    c.eval.max_batches = 2
  elif variant:
    raise ValueError(f'unknown variant {variant!r} of default.py')
  return c
