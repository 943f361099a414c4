"""A folder of video files, one subfolder per class, decoded with PyAV.

Layout (class names sorted alphabetically give the label ids):

    root/[split/]class_a/video1.mp4
    root/[split/]class_b/video2.avi ...

If `root/<split>` exists it is used, else `root` itself (one split; an
error if `root` holds other split folders such as `train/`, `test/`). Files with
the extensions in `VIDEO_EXTENSIONS` are listed.

Bad files (the pipeline logs one warning per file, naming it and the cause):

  * unreadable: cannot be opened, has no video stream, no decodable frame, or
    the decoder raises. Skipped (masked out in eval); counted once per file in
    `data/failed_videos` (every read in `data/failed_reads`).
  * truncated: a read decodes to the end of the file and finds fewer than
    `TRUNCATED_FRACTION` (half) of the frames the container states
    (`stream.frames`, else duration x average rate), e.g. an AVI or MKV cut
    in the middle (an MP4 cut in the middle has usually lost its index and is
    unreadable). Counted once per file in `data/truncated_videos`.
    A read that reaches the cut is skipped (masked out in eval), not used,
    because (1) the decoder conceals the partial data at the cut without an
    error: the last frame it returned was corrupt in most cut AVI and H.264
    files tried (mean error 20-100 of 255); (2) fewer than half the frames,
    looped or padded to a clip, are not the video the label describes.
    A read stops at its clip's last frame, so a training clip that ends
    before the cut is used (with B-frames its last frame may be one the cut
    damaged): finding the cut without decoding to the end would cost every
    read. Eval's centred clip always reaches the cut of a file cut before
    its middle, so eval always skips such a file. A file that lost less than
    half its frames decodes as a shorter video (`short_video` applies; its
    last frame may be damaged): containers often overstate their count by a
    few frames, and that must not count as damage.

Prepare:

  * HMDB51 (51 classes, ~7k clips): download `hmdb51_org.rar` and the split
    files from https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/
    then
        mkdir -p hmdb51 && cd hmdb51 && unrar x ../hmdb51_org.rar
        for f in *.rar; do mkdir -p "${f%.rar}" && unrar x "$f" "${f%.rar}/"; done
        rm *.rar
    which gives `hmdb51/<class>/<clip>.avi` (all splits in one folder). For
    the official 3 splits, move files into `hmdb51/train/<class>/` and
    `hmdb51/test/<class>/` following `testTrainMulti_7030_splits/<class>_test_split1.txt`
    (id 1 = train, 2 = test).
  * Kinetics-400/600/700: download with https://github.com/cvdfoundation/kinetics-dataset
    (`bash k400_downloader.sh && bash k400_extractor.sh`), then sort the
    clips into `kinetics400/{train,val}/<class>/<youtube_id>_<start>_<end>.mp4`
    with the annotation CSVs (`label,youtube_id,time_start,time_end,split`).
    Resizing once to a short side of 256 makes decoding ~4x faster:
        ffmpeg -i in.mp4 -vf scale=-2:256 -c:v libx264 -an out.mp4
  * Your own data: any such folder.

Then:

    config = skipside.data.get_config()
    config.dataset = 'video_folder'
    config.data_dir = '/path/hmdb51'
    config.split, config.eval_split = 'train', 'test'
    config.resize, config.crop_size = 128, 112
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import av
import numpy as np

from skipside.data import sources

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.mpg',
                    '.mpeg', '.ogv')

# A read that ends below this fraction of the container's frame count: a cut
# file, not the few frames containers commonly overstate.
TRUNCATED_FRACTION = 0.5

_SPLIT_NAMES = {'train', 'training', 'val', 'valid', 'validation', 'test',
                'testing'}


class DecodeError(Exception):
  """A video could not be read (missing, corrupt, empty, decoder error).

  Attributes:
    cause: what went wrong.
    path: the file, if the video is one (None for records without a name);
      the pipeline counts failures once per path.
  """

  def __init__(self, cause: str, path: str | None = None):
    super().__init__(cause, path)  # Both in args: pickles whole.
    self.cause, self.path = cause, path

  def __str__(self) -> str:
    return f'{self.path}: {self.cause}' if self.path else self.cause


@dataclasses.dataclass(frozen=True)
class Decoded:
  """One read of a video file.

  Attributes:
    path: the file.
    frames: uint8 (T, H, W, 3), the selected frames, or None if `select`
      dropped the video.
    decoded: frames decoded when the read ran to the end of the file; None
      when it stopped at the clip's last frame (the file holds at least that).
    expected: frames the container states (0: unknown).
  """
  path: str
  frames: np.ndarray | None
  decoded: int | None
  expected: int

  @property
  def truncated(self) -> bool:
    """The file ended far before its container said (a cut file)."""
    return (self.decoded is not None
            and self.decoded < TRUNCATED_FRACTION * self.expected)


def list_videos(
    root: str, split: str | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> tuple[list[str], list[int], list[str]]:
  """Lists `root[/split]/<class>/<file>`.

  Args:
    root: folder of class folders, or of split folders of class folders.
    split: subfolder of `root` to use if it exists.
    extensions: lower-case file name endings that count as videos.

  Returns:
    (paths, labels, class_names), sorted by class then file name.

  Raises:
    FileNotFoundError: `root` does not exist.
    ValueError: no class folder with a video in it.
  """
  root = os.path.expanduser(str(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Video folder not found: {root!r}')
  if split and os.path.isdir(os.path.join(root, split)):
    root = os.path.join(root, split)
  elif split:
    # A missing split next to other split folders is a typo, not one split.
    found = sorted(set(os.listdir(root)) & _SPLIT_NAMES)
    if found:
      raise FileNotFoundError(
          f'Split folder {os.path.join(root, split)!r} not found; {root!r} '
          f'has split folders {found}.')
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)))
  paths, labels = [], []
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    files = sorted(f for f in os.listdir(folder)
                   if f.lower().endswith(tuple(extensions)))
    paths += [os.path.join(folder, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise ValueError(
        f'No videos in {root!r}: expected {root}/<class>/<name>'
        f'{{{",".join(extensions)}}}; found class folders {classes[:10]}.')
  return paths, labels, classes


def _expected_frames(container, stream) -> int:
  """Frames the container states: its count, else duration x average rate."""
  if stream.frames > 0:
    return int(stream.frames)
  rate = stream.average_rate
  if stream.duration and stream.time_base:
    seconds = float(stream.duration * stream.time_base)
  elif container.duration:
    seconds = container.duration / av.time_base
  else:
    return 0
  return int(round(seconds * float(rate))) if rate else 0


def decode_video(
    path: str, select: Callable[[int], np.ndarray | None],
) -> Decoded:
  """Decodes the frames `select(num_frames)` of a video as RGB.

  Only frames up to the last selected one are decoded when the container
  states its frame count; otherwise (or if the count was overstated, e.g. a
  truncated file) all frames, and `select` is called again with the number
  decoded.

  Args:
    path: video file.
    select: maps the number of frames L to frame indices in [0, L), or None to
      drop the video (e.g. too short under `short_video='skip'`).

  Returns:
    Decoded: frames uint8 (len(indices), H, W, 3) or None, and the counts
    that tell a truncated file (`Decoded.truncated`).

  Raises:
    DecodeError: the file is missing, unreadable or has no video frames.
  """
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise DecodeError('no video stream', path)
      stream = container.streams.video[0]
      stream.thread_type = 'AUTO'
      claimed = stream.frames
      expected = _expected_frames(container, stream)
      indices = select(claimed) if claimed > 0 else None
      stop = int(indices.max()) + 1 if indices is not None else None
      frames, to_end = [], True
      for frame in container.decode(stream):
        frames.append(frame)
        if stop is not None and len(frames) >= stop:
          to_end = False
          break
  except (av.FFmpegError, OSError, ValueError, IndexError) as e:
    # FFmpeg's str(e) repeats the path; its strerror is the cause alone.
    raise DecodeError(getattr(e, 'strerror', None) or str(e), path) from e
  if not frames:
    raise DecodeError('no decodable frames', path)
  if indices is None or len(frames) < stop:
    # Frame count unknown or overstated (e.g. a truncated file): all decoded.
    indices = select(len(frames))
  decoded = len(frames) if to_end else None
  if indices is None:
    return Decoded(path, None, decoded, expected)
  video = np.stack([frames[i].to_ndarray(format='rgb24') for i in indices])
  return Decoded(path, video, decoded, expected)


def read_video(
    path: str, select: Callable[[int], np.ndarray | None],
) -> np.ndarray | None:
  """`decode_video(path, select).frames`: uint8 (T, H, W, 3) or None.

  A truncated file gives frames from its decodable part (the last ones may be
  corrupt); the pipeline reads with `decode_video` and skips such reads.
  """
  return decode_video(path, select).frames


def write_video(path: str, frames: np.ndarray, fps: int = 25,
                codec: str = 'mpeg4') -> None:
  """Writes uint8 (T, H, W, 3) frames to a video file (tests, examples)."""
  with av.open(path, mode='w') as container:
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = 'yuv420p'
    for f in frames:
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f),
                                         format='rgb24')
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


class VideoFolderSource:
  """grain `RandomAccessDataSource` of {'path': str, 'label': int} records.

  Decoding happens in the pipeline's map, so a broken file fails one element
  (skipped, counted and logged there), not the source.

  Example:
    source = VideoFolderSource('/data/hmdb51', split='train')
    len(source), source.class_names[:3], source[0]
  """

  def __init__(self, root: str, split: str | None = None):
    self.paths, self.labels, self.class_names = list_videos(root, split)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, object]:
    return {'path': self.paths[index], 'label': self.labels[index]}

  def __repr__(self) -> str:
    return (f'VideoFolderSource({len(self)} videos, '
            f'{len(self.class_names)} classes)')


def read_file(record: dict[str, object], select) -> Decoded:
  """``Source.read`` of {'path': ...} records: decodes with PyAV."""
  return decode_video(record['path'], select)


def make_source(config, split: str) -> sources.Source:
  """The ``sources.Source`` of ``split`` of the folder ``config.data_dir``
  (dataset ``video_folder``)."""
  if config.data_dir is None:
    raise ValueError('config.data_dir must name the video folder.')
  data = VideoFolderSource(config.data_dir, split)
  return sources.Source(data=data, read=read_file,
                        label=sources.label_of('label'),
                        num_classes=len(data.class_names),
                        class_names=data.class_names, name=config.data_dir)
