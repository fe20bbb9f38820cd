"""Compile before you rent (MaxText's train_compile): compile the train step for a mesh of N devices
from ShapeDtypeStructs alone, so sharding and memory errors show on a laptop. No weights are allocated.

  python -m lmjax.aot --config=configs/pretrain.py:size=1b --devices=8 --config.train.batch_size=8

On a CPU-only machine the N devices are faked (XLA's host-platform device count); the report gives the
compiled step's per-device memory from XLA's memory analysis.
"""
from __future__ import annotations

import os
import sys

if __name__ == '__main__':  # must happen before jax starts
  _n = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--devices=')), '8')
  os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={_n}')

import jax
import jax.numpy as jnp

from lmjax import model, sharding, train

BATCH_KEYS = {'inputs': jnp.int32, 'targets': jnp.int32, 'weights': jnp.float32,
              'segment_ids': jnp.int32, 'positions': jnp.int32}


def compile_train_step(config, n_devices: int):
  """Lowers and compiles the train step for `n_devices` devices; returns the compiled executable."""
  devices = jax.devices()
  if len(devices) < n_devices:
    raise ValueError(f'--devices={n_devices} but only {len(devices)} devices are visible; set '
                     f'XLA_FLAGS=--xla_force_host_platform_device_count={n_devices} before jax starts')
  mesh = sharding.make_mesh(config.mesh, devices[:n_devices])
  args = model.resolve(config.model)
  graphdef, (tx, schedule), abstract_state, state_sh, _ = train.init_state(config, args, mesh)
  shape = (config.train.batch_size, config.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(mesh))
           for k, dt in BATCH_KEYS.items()}
  step = jax.jit(train.make_train_step(graphdef, tx, schedule, config.train),
                 out_shardings=(state_sh, None), donate_argnums=0)
  with jax.set_mesh(mesh):
    return step.lower(abstract_state, batch).compile()


def main(argv):
  del argv
  from absl import flags
  compiled = compile_train_step(flags.FLAGS.config, flags.FLAGS.devices)
  memory = compiled.memory_analysis()
  print(f'compiled for {flags.FLAGS.devices} devices')
  if memory is not None:
    gib = 2 ** 30
    print(f'per device: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, '
          f'temporaries {memory.temp_size_in_bytes / gib:.2f} GiB, '
          f'outputs {memory.output_size_in_bytes / gib:.2f} GiB')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'configs/<name>.py[:knobs]', lock_config=True)
  flags.DEFINE_integer('devices', 8, 'number of devices to compile for')
  app.run(main)
