r"""Worked example: three ways to write your own stage, used from Python and
from a config.

  python -m experiments.examples.custom_stage [--steps 50]   # in Python
  python -m launch.train --config=experiments/examples/custom_stage.py \
      --workdir=workdir/custom_stage                          # from a config
  python -m launch.eval --workdir=workdir/custom_stage

1. ``GatedConv``: a stateless NNX stage (the common case).
2. ``LeakyMemory``: a temporal stage that declares its state (an exponential
   moving average of its inputs across ticks), the contract's second form.
3. A ``flax.linen`` module through ``adapters.from_linen`` (``pointwise``:
   a function returning the stage).

In Python, all three go into one Skip-Sideways network that trains on random
clips for a few steps in every mode; the printout shows the shapes the
network inferred. From a config, ``get_config`` names them in
``config.model.stages`` as ``package.module:Name(arg=value, ...)``; the
launcher records that string in ``config.json``, so a resumed run and
``launch.eval`` rebuild the same network. ``skipside.config.build_network``
calls each with the config's arguments plus, where its signature takes them,
``in_features`` (the input's last axis), ``in_shape`` (one frame's input
features, e.g. ``(8, 8, 16)``) and ``rngs``. The contract these follow is at
the top of ``skipside/stages.py``.
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx

from skipside import adapters, conv, engine, network, stages


class GatedConv(nnx.Module):
  """``y = conv(x) * sigmoid(gate(x))``: (B, H, W, C) -> (B, H/s, W/s, D)."""

  def __init__(self, in_features: int, out_features: int, *, stride: int = 1,
               rngs: nnx.Rngs):
    # conv.conv_general_dilated keeps the gradients fast inside the engine's
    # scan on CPU (a plain nnx.Conv works too, up to 39x slower there:
    # python -m experiments.benchmarks.conv).
    fast = {'conv_general_dilated': conv.conv_general_dilated}
    self.conv = nnx.Conv(in_features, out_features, (3, 3), strides=stride,
                         rngs=rngs, **fast)
    self.gate = nnx.Conv(in_features, out_features, (3, 3), strides=stride,
                         rngs=rngs, **fast)

  def __call__(self, x):
    return self.conv(x) * jax.nn.sigmoid(self.gate(x))


class LeakyMemory(nnx.Module):
  """A temporal stage: ``m_t = a m_{t-1} + (1 - a) x_t``, ``y_t = [x_t, m_t] W``.

  State: ``m`` of the input's shape ``(B, ..., C)``, zero at the start of a
  stream, carried by the engine across ticks and clips. It is a cache of
  past inputs, so under Sideways its gradient joins the input gradient sent
  down (``stages.link_cache``); the exact modes differentiate through it.
  """

  def __init__(self, in_features: int, *, decay: float = 0.8,
               rngs: nnx.Rngs):
    self.decay = decay
    self.mix = nnx.Linear(2 * in_features, in_features, rngs=rngs)

  def init_state(self, x: jax.ShapeDtypeStruct):
    return jnp.zeros(x.shape, x.dtype)

  def __call__(self, x, state):
    memory = self.decay * state + (1 - self.decay) * x
    y = nnx.relu(self.mix(jnp.concatenate([x, memory], axis=-1)))
    return y, memory


class LinenPointwise(nn.Module):
  """An existing linen module: a 1x1 conv with a residual."""
  features: int

  @nn.compact
  def __call__(self, x):
    return x + nn.relu(nn.Conv(self.features, (1, 1))(x))


def pointwise(in_shape: tuple[int, ...], *, rngs: nnx.Rngs) -> nnx.Module:
  """``LinenPointwise`` as a stage for inputs of one frame's ``in_shape``."""
  return adapters.from_linen(LinenPointwise(in_shape[-1]), in_shape, rngs=rngs)


def build(frame_shape=(32, 32, 3), num_classes=5, seed=0) -> network.Network:
  rngs = nnx.Rngs(seed)
  c = frame_shape[-1]
  layers = [
      GatedConv(c, 16, stride=2, rngs=rngs),                     # 16x16x16
      GatedConv(16, 32, stride=2, rngs=rngs),                    # 8x8x32
      LeakyMemory(32, rngs=rngs),                                # 8x8x32
      pointwise((8, 8, 32), rngs=rngs),
  ]
  return network.Network(layers, stages.ClassifierHead(32, num_classes,
                                                       rngs=rngs),
                         frame_shape=frame_shape, skips=[(0, 2), (1, 3)],
                         combine='concat', rngs=rngs)


def get_config(variant: str = ''):
  """``experiments/configs/default.py`` (and its variants) with the three
  stages above in place of its first three, named as a config names them."""
  from experiments.configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config(variant)
  here = 'experiments.examples.custom_stage'  # Importable by this name.
  if variant == 'tiny':  # 3 stages on 32x32 frames: 16x16x4, 8x8x8, 8x8x8.
    c.model.stages = (f'{here}:GatedConv(out_features=4, stride=2),'
                      f'conv:8:2,{here}:LeakyMemory(decay=0.5),'
                      f'{here}:pointwise')
    c.model.skips = ((0, 2), (1, 3))
  else:  # The default's 5 stages, the first three ours.
    c.model.stages = (f'{here}:GatedConv(out_features=8, stride=2),'
                      f'{here}:GatedConv(out_features=16, stride=2),'
                      f'{here}:LeakyMemory,{here}:pointwise,conv:32:2,res:32')
    c.model.skips = ((0, 3), (1, 4), (2, 5))
  return c


def main(steps: int = 50) -> dict:
  spec, params = network.split(build())
  print('stage inputs :', spec.in_shapes)
  print('stage outputs:', spec.out_shapes)
  print('temporal     :', spec.temporal)
  clip = jax.random.uniform(jax.random.key(0), (4, 12, 32, 32, 3))
  labels = jnp.arange(4) % 5
  optimizer = optax.adam(1e-3)
  final = {}
  for mode in engine.MODES:
    p, opt_state = params, optimizer.init(params)
    for _ in range(steps):
      p, opt_state, out = engine.train_step(spec, optimizer, p, opt_state, clip,
                                            labels, mode=mode)
    final[mode] = float(out.metrics['loss'])
    print(f'{mode:>13}: loss after {steps} steps on one batch '
          f'{final[mode]:.4f}')
  return final


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=50)
  main(parser.parse_args().steps)
