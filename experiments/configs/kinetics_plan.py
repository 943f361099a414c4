r"""A Kinetics-600-shaped Skip-Sideways job to plan on a TPU pod (no data).

  python -m launch.train --config=experiments/configs/kinetics_plan.py \
      --compile_only --topology=v5e:16x16 --plan_json=plan.json

The shapes of a Kinetics-600 run at ResNet-like scale: 224x224x3 frames, 16
residual conv stages downsampling 32x to 7x7x512 (about 24 M parameters),
Skip-Sideways edges, bfloat16 compute, a global batch of 16 clips, on a
('data', 'stage') mesh of 16 x 16 (one stage per chip of a stage row).
Planning reads only shapes (``num_classes_hint``, ``data.crop_size``), so no
dataset is needed; to train, point ``data.data_dir`` at the video folder
(experiments/configs/kinetics600.py). Copy this file to plan your own net:
``experiments/benchmarks/scale.py --config=...`` compiles it for every mode
and finds the longest clip that fits. Variants: skip_sideways (default),
sideways, bp, pipelined_bp.
"""

from experiments.configs import video

STAGES = ('conv:64:2,res:64,res:64,conv:128:2,res:128,res:128,conv:256:2,'
          'res:256,res:256,res:256,res:256,conv:512:2,res:512,conv:512:2,'
          'res:512,res:512')


def get_config(variant: str = 'skip_sideways'):
  c = video.get_video_config(variant, num_classes_hint=600)
  c.data.dataset = 'video_folder'
  c.data.split, c.data.eval_split = 'train', 'validate'
  c.data.crop_size = 224
  c.data.scale_jitter = (256, 320)
  c.data.num_frames = 32
  c.data.batch_size = 16
  c.model.stages = STAGES
  # Skip edges of span 3 along the chain (Skip-Sideways), none for sideways.
  c.model.skips = () if variant == 'sideways' else (
      (0, 3), (3, 6), (6, 9), (9, 12), (12, 15))
  c.precision = 'bfloat16'
  c.mesh.data, c.mesh.stage = 16, 16
  return c
