"""Video data for skipside: MovingDigits, video folders, UCF101; grain pipeline.

Public API (all re-exported here):

  get_config() -> ml_collections.ConfigDict
      Data config with defaults (MovingDigits, task 'motion', 16 frames,
      batch 32); fields documented in `pipeline.get_config`.
  make_iterator(config, train=True, source=None) -> DataIterator
      Batches {'video': float32 (B, T, H, W, C) in [0, 1], 'label': int32 (B,)
      (or (B, K) multi-hot), 'mask': bool (B,)} (+ 'target' for task 'next_frame'; 'video' is
      (B, F, Tf, H, W, C) with fragments).
      Train: shuffled, repeated, augmented; this process's rows of each
      global batch.
  make_eval_iterator(config, source=None) -> DataIterator
      One ordered pass over config.eval_split, fixed start, centre crop, last
      batch padded; `mask` is False on padding and unreadable videos.
  make_dataset(config, train=True, source=None) -> (grain.IterDataset, DataInfo)
      The underlying grain dataset, for composing further.
  DataIterator: next(it); it.get_state() -> dict (JSON-able);
      it.set_state(state) (exact resume); it.stats -> DecodeStats;
      it.info -> DataInfo (.rows: this process's rows of each global batch).
  describe_process(info, mesh=None) -> str: the start-up line of a process
      (index, count, local devices, mesh, its rows of the global batch).
  DecodeStats: .failed, .too_short, .metrics() -> {'data/failed_videos': ..}.
  ClipParams, frame_indices, spatial_transform, load_clip: per-call clip
      sampling and augmentation (multigrid varies stride and crop per batch;
      `transforms.py`, `pipeline.load_clip`).
  split_fragments(video, fragment_frames, overlap=0): progressive training.
  next_frame_targets(batch): {'video': frames[:-1], 'target': frames[1:]}.

Modules: `pipeline` (a config to batches: clip loading, grain, the
iterator), `transforms` (clip sampling and augmentation, pure numpy),
`memory` (a split held in memory, cut a batch at a time), `multigrid_loader`
(batches whose shape follows the multigrid schedule), `sources` (the
`Source` contract and the registry of dataset openers).

Datasets: `moving_digits` (generated locally, no download),
`video_folder` (PyAV; HMDB51, Kinetics, your own), `ucf101` (TFDS, needs
TensorFlow). Prepare commands are in each module's docstring. Your own:
`register_source(name)(opener)` or `config.dataset =
'package.module:function'`, an opener `(config, split) -> Source`
(`skipside/data/sources.py`).

Example:

  from skipside import data
  config = data.get_config()
  config.task = 'appearance'
  it = data.make_iterator(config)
  batch = next(it)   # batch['video'].shape == (32, 16, 32, 32, 1)
"""

from skipside.data.pipeline import DataInfo
from skipside.data.pipeline import DataIterator
from skipside.data.pipeline import DecodeStats
from skipside.data.pipeline import describe_process
from skipside.data.pipeline import get_config
from skipside.data.pipeline import load_clip
from skipside.data.pipeline import make_dataset
from skipside.data.pipeline import make_eval_iterator
from skipside.data.pipeline import make_iterator
from skipside.data.sources import make_source
from skipside.data.sources import register as register_source
from skipside.data.sources import Source
from skipside.data.transforms import ClipParams
from skipside.data.transforms import frame_indices
from skipside.data.transforms import next_frame_targets
from skipside.data.transforms import spatial_transform
from skipside.data.transforms import split_fragments
