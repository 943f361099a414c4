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

from skipside import data
from skipside import multigrid


def get_config(variant: str = '') -> ml_collections.ConfigDict:
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
  # (multigrid's fixed base size; skipside/batchnorm.py).
  c.model.norm_base_size = 8

  c.data = data.get_config()
  c.data.task = 'motion'
  # Whole 16-frame videos: under Sideways a fresh clip masks L-1 = 4 fill
  # ticks and stage l learns from tick L-1+d_l (d_l: edges up to the top),
  # so 8 frames gave the bottom stages 2 ticks of gradient and 16 give 10
  # (engine.gradient_ticks; the loop warns when a stage gets none).
  c.data.num_frames = 16
  c.data.batch_size = 32

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

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.log_every = 20
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 3
  c.train.update_every = 0  # >0: online mode, an optimizer step every k ticks.
  c.train.stream = False  # Carry the pipeline across batches (a stream).
  c.train.flush = 0  # Ticks repeating the last frame so messages land.
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

  # Multigrid (variable batch shapes on a schedule; off here): see
  # skipside/multigrid.py get_config and experiments/configs/multigrid.py.
  c.multigrid = multigrid.get_config()

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
