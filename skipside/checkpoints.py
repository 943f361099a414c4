"""The train state, a workdir's checkpoints, and the guard of a used workdir.

``TrainState`` is what a resumed run needs besides the data iterator's
state; ``Checkpointer`` keeps the last N in ``workdir/checkpoints`` (orbax)
and skips (with ``repair``: moves aside) unreadable ones;
``prepare_workdir`` refuses a used workdir whose checkpoints a new config
would not continue.

Example::

    spec, optimizer, state = checkpoints.init_state(config, info)
    ckpt = checkpoints.Checkpointer(workdir, keep=3)
    ckpt.save(state, data_state, {'step': state.step})
    state, data_state, meta = ckpt.restore(state)
"""

import dataclasses
import functools
import json
import logging as py_logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from skipside import config as config_lib
from skipside import multigrid, network, optim

PyTree = Any


class WorkdirConflictError(config_lib.ConfigError):
  """A used workdir whose checkpoints the new config would not continue."""


class CheckpointMismatchError(WorkdirConflictError):
  """A workdir whose checkpoints all fail to restore into this run."""


@dataclasses.dataclass
class TrainState:
  """Everything a resumed run needs, besides the data iterator's JSON state.

  ``carry`` is the stream carry (``None`` unless ``train.stream``).
  """
  step: int
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  carry: PyTree = None

  def tree(self) -> dict:
    t = {'step': np.asarray(self.step, np.int64), 'params': self.params,
         'opt_state': self.opt_state, 'rng': jax.random.key_data(self.rng)}
    if self.carry is not None:
      t['carry'] = self.carry
    return t

  @classmethod
  def from_tree(cls, t: dict) -> 'TrainState':
    return cls(step=int(t['step']), params=t['params'],
               opt_state=t['opt_state'], rng=jax.random.wrap_key_data(t['rng']),
               carry=t.get('carry'))


def init_state(config: ml_collections.ConfigDict, info,
               schedule: multigrid.Schedule | None = None
               ) -> tuple[network.NetworkSpec, optax.GradientTransformation,
                          TrainState]:
  """The network, optimizer and a fresh train state for data with ``info``
  (the optimizer's LR follows a multigrid ``schedule`` if given)."""
  net = config_lib.build_network(config, config_lib.frame_shape_of(info),
                                 info.num_classes, nnx.Rngs(config.seed))
  spec, params = network.split(net)
  trainable = functools.partial(
      network.trainable_mask, spec,
      frozen_stages=tuple(config.optimizer.get('frozen_stages', ())))
  # Only a net with batch statistics or frozen stages pays for the mask in
  # optimizer state.
  masked = not all(jax.tree.leaves(trainable(params)))
  optimizer = optim.make_optimizer(config, schedule,
                                   trainable=trainable if masked else None)
  state = TrainState(step=0, params=params, opt_state=optimizer.init(params),
                     rng=jax.random.key(config.seed))
  return spec, optimizer, state


# Keys a resumed run may change: they alter neither the train state nor what
# it means (cadence, length, where data lives, evaluation, the mesh layout:
# checkpoints are plain pytrees that restore on any mesh).
HARMLESS_KEYS = ('train.num_steps', 'train.log_every', 'train.eval_every',
                 'train.checkpoint_every', 'train.keep_checkpoints',
                 'train.on_nonfinite', 'train.fidelity_every', 'eval.',
                 'mesh.', 'data.data_dir', 'data.in_memory_gb',
                 'data.prepare', 'data.num_threads', 'data.prefetch',
                 'data.num_workers', 'data.shard_index', 'data.shard_count',
                 'multigrid.compile_cache_dir', 'multigrid.compile_threads')


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """``(harmful, harmless)`` keys that differ between two flat configs
  (``_flat`` of their JSON). A key only one side has was added to (or
  dropped from) skipside since the run started, which ran with its default:
  harmless, unless ``new`` sets it to something else."""
  default = _flat(json.loads(config_lib.defaults().to_json_best_effort()))
  changed = sorted(
      [k for k in old.keys() & new.keys() if old[k] != new[k]]
      + [k for k in new.keys() - old.keys()
         if k in default and new[k] != default[k]])
  harmless = [k for k in changed
              if any(k == h or (h.endswith('.') and k.startswith(h))
                     for h in HARMLESS_KEYS)]
  harmful = [k for k in changed if k not in harmless]
  return harmful, harmless + sorted((old.keys() ^ new.keys()) - set(changed))


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                    restart: bool = False, move: bool = True) -> None:
  """Refuses a used ``workdir`` whose checkpoints ``config`` would not
  continue, before anything is written; with ``restart`` moves its run
  aside (``replaced-<time>/``: nothing is deleted; only where ``move``,
  the main process) and starts over.

  Raises:
    WorkdirConflictError: one line naming the differing keys and the ways
      out. Harmless differences (``HARMLESS_KEYS``) are printed and allowed.
  """
  path = os.path.join(workdir, 'config.json')
  ckpts = os.path.join(workdir, 'checkpoints')
  if not (os.path.exists(path) and os.path.isdir(ckpts)
          and any(d.isdigit() for d in os.listdir(ckpts))):
    return  # No run to continue (or a start-up that failed before saving).
  with open(path) as f:
    old = _flat(json.load(f))
  new = _flat(json.loads(config.to_json_best_effort(sort_keys=True)))
  harmful, harmless = config_changes(old, new)
  if harmful and restart:
    if not move:
      return
    aside = os.path.join(workdir, time.strftime('replaced-%Y%m%d-%H%M%S'))
    os.makedirs(aside)
    for name in os.listdir(workdir):
      if name != os.path.basename(aside) and not name.startswith('replaced-'):
        os.replace(os.path.join(workdir, name), os.path.join(aside, name))
    print(f'--restart: moved the previous run of {workdir} to {aside}',
          flush=True)
    return
  if harmful:
    shown = ', '.join(f'config.{k} ({old.get(k)!r} -> {new.get(k)!r})'
                      for k in harmful[:4])
    more = f' and {len(harmful) - 4} more' if len(harmful) > 4 else ''
    raise WorkdirConflictError(
        f'{workdir} holds a run of another config: {shown}{more} differ; '
        'use a new --workdir, or --restart to move that run aside and start '
        'over here')
  if harmless:
    note = (' (the learning-rate schedule and multigrid phases are sized in '
            'train.num_steps: they change from here on)'
            if 'train.num_steps' in harmless else '')
    print(f'Resuming {workdir} with changed '
          f'{", ".join("config." + k for k in harmless)}{note}', flush=True)


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (one line: its path and the cause);
  the checkpoints before it are intact and nothing of it is left."""


def _one_line(e: BaseException) -> str:
  """The cause of a failed save, short: tensorstore's errors (a paragraph
  with pages of JSON) as the OS error they end in."""
  code = re.search(r"\[os_error_code='(\d+)'\]", str(e))
  if code:
    n = int(code.group(1))
    return f'OSError: [Errno {n}] {os.strerror(n)} (in tensorstore)'
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _join_orbax_threads(timeout: float) -> None:
  """Waits for orbax's background writers: a failed save leaves its other
  writes running (they would write on after its partial files are
  removed)."""
  deadline = time.time() + timeout
  for t in threading.enumerate():
    if (t is not threading.current_thread()
        and type(t).__module__.startswith('orbax.')):
      try:
        t.join(max(0.0, deadline - time.time()))
      except Exception:  # pylint: disable=broad-except
        pass  # orbax's threads re-raise their write's error: reported.


def _quiet_abandoned_writes() -> None:
  """After a failed save: the writes orbax abandoned (asyncio futures never
  read, coroutines never finished) would report again when collected, at
  exit, after the one line that names the failure."""
  py_logging.getLogger('asyncio').addFilter(
      lambda record: 'exception was never retrieved' not in record.msg)
  orbax_dir = os.path.dirname(os.path.dirname(ocp.__file__))
  hook = sys.unraisablehook

  def unraisable(u):
    code = getattr(u.object, 'cr_code', None)  # A coroutine's.
    if code is None or not code.co_filename.startswith(orbax_dir):
      hook(u)
  sys.unraisablehook = unraisable


class Checkpointer:
  """orbax CheckpointManager over ``workdir/checkpoints``, keep-last-N.

  A checkpoint holds the train state (StandardSave) and two JSON items: the
  data iterator's state and ``meta`` (step, schedule position, mode).

  Saves write in the background; a failed one raises
  ``CheckpointSaveError`` at the first ``check`` (cheap: call it every
  step), ``save``, ``wait`` or ``close`` after it failed, and its partial
  files are removed. With ``cleanup`` (the training run, which alone
  writes here) the partial saves of a killed run are removed at start.
  """

  def __init__(self, workdir: str, keep: int, *, cleanup: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=cleanup))
    self._pending = None  # The step being written in the background.

  def save(self, state: TrainState, data_state: dict, meta: dict,
           wait: bool = False) -> None:
    self.wait()  # The previous save's failure is reported as its own.
    self._pending = state.step

    def start():
      # orbax creates the step's directory in the background, and its
      # writers then wait minutes for it: an unwritable or full directory
      # is told here, at once.
      os.rmdir(tempfile.mkdtemp(prefix='.write-check-', dir=self.directory))
      return self.manager.save(state.step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state.tree()),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)))
    if not self._guard(start):  # orbax saves no step older than its latest.
      self._pending = None
    if wait:
      self.wait()

  def check(self) -> None:
    """Raises ``CheckpointSaveError`` if the save in the background failed;
    returns at once while it is still writing."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in the background; raises ``CheckpointSaveError``
    if it failed."""
    if self._pending is None:
      return
    self._guard(lambda: (self.manager.wait_until_finished(),
                         self.manager.check_for_errors()))
    if not os.path.isdir(os.path.join(self.directory, str(self._pending))):
      self._failed('orbax did not finalize it (see its log above)')
    self._pending = None

  def _guard(self, fn):
    """``fn()``; its exception fails the pending save."""
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      cause = _one_line(e)  # orbax logs its own traceback.
    self._failed(cause)

  def _failed(self, cause: str):
    """Removes the partial files of the pending step and raises."""
    step, self._pending = self._pending, None
    _quiet_abandoned_writes()
    _join_orbax_threads(timeout=60)
    if jax.process_index() == 0:
      for name in os.listdir(self.directory):
        if name.startswith(f'{step}.orbax-checkpoint-tmp'):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    raise CheckpointSaveError(f'checkpoint save failed: '
                              f'{os.path.join(self.directory, str(step))}: '
                              f'{cause}')

  def restore(self, like: TrainState | None = None, *, repair: bool = False):
    """Latest readable checkpoint as ``(state, data_state, meta)`` or ``None``.

    ``like`` gives the structure, shapes and dtypes to restore into; without
    it the saved tree comes back as saved (evaluation). A checkpoint that
    fails to restore (corrupt, truncated) is skipped with a warning and the
    previous one is tried. With ``repair`` (a training run) the unreadable
    ones newer than it are moved to ``workdir/unreadable_checkpoints/``
    (kept for inspection), so that the run saves those steps again: orbax
    saves no step older than the latest on disk.
    """
    abstract = None if like is None else jax.tree.map(
        ocp.utils.to_shape_dtype_struct, like.tree())
    unreadable, found = [], None
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
      except Exception as e:  # Any failure: fall back to the previous one.
        logging.warning('checkpoint at step %d is unreadable (%s: %s); '
                        'falling back to the previous one', step,
                        type(e).__name__, e)
        print(f'WARNING: checkpoint at step {step} is unreadable '
              f'({type(e).__name__}); falling back to the previous one',
              flush=True)
        unreadable.append(step)
        continue
      found = TrainState.from_tree(got.state), got.data, got.meta
      break
    if unreadable and found is None and like is not None:
      # Every checkpoint failing is a mismatch (code, config), not damage:
      # training from scratch would bury them.
      raise CheckpointMismatchError(
          f'no checkpoint in {self.workdir}/checkpoints restores into this '
          f'run\'s state (latest: step {unreadable[0]}); use a new '
          '--workdir, or --restart to move that run aside')
    if repair and unreadable:  # Older ones restored: the newer are damaged.
      self._move_aside(unreadable)
    return found

  def _move_aside(self, steps) -> None:
    """Unreadable step directories -> ``workdir/unreadable_checkpoints``."""
    aside = os.path.join(self.workdir, 'unreadable_checkpoints')
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        src = os.path.join(self.workdir, 'checkpoints', str(step))
        dst = os.path.join(aside, time.strftime(f'{step}-%Y%m%d-%H%M%S'))
        os.replace(src, dst)
        print(f'Moved the unreadable checkpoint at step {step} to {dst}',
              flush=True)
    if jax.process_count() > 1:  # Every process sees the move, then reloads.
      multihost_utils.sync_global_devices('skipside_unreadable_checkpoints')
    self.manager.reload()

  def close(self) -> None:
    """Waits for the save in the background (raising if it failed)."""
    self.wait()
    self.manager.close()
