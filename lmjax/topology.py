"""TPU slices by the names users rent, as devices the TPU compiler targets from a CPU host.

With libtpu installed (`pip install -e '.[tpu]'`: jax[tpu]==0.10.2, which pins libtpu 0.0.42.*), the TPU
compiler runs on a CPU machine: `devices('v5e-8')` gives the 8 compile-only devices of that slice, a
Mesh over them takes ShapeDtypeStructs, and `jit(f).lower(...).compile()` returns the compiler's
memory and cost analysis. No chip is touched; nothing can run.

  mesh = jax.sharding.Mesh(np.array(topology.devices('v5e-8')).reshape(2, 4), ('data', 'fsdp'))
  state, batch = ...  # ShapeDtypeStructs with NamedShardings on `mesh`
  compiled, report = topology.try_compile(jax.jit(step).lower(state, batch))
  print(report)  # 'fits: 7.64 GiB of 15.75 GiB per device (arguments 1.73, ...), headroom 8.11 GiB'

Names: v5e-N (also v5litepod-N) and v6e-N count chips; v4-N and v5p-N count TensorCores, two per
chip. A device is one chip on every generation here (v4 and v5p run megacore: one device drives both
TensorCores), so per-device numbers are per-chip numbers. `2xv5p-128` is two slices joined over the
data-center network (devices carry `slice_index`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

import jax
from jax.experimental import topologies

from lmjax import errors

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation: how get_topology_desc names it and what a chip holds and does."""
  topology_prefix: str        # get_topology_desc's topology_name is '<prefix>:<dims>'
  chip_config_name: str       # 'megacore': one device per chip (v4 defaults to one per TensorCore)
  device_kind: str            # what jax reports for its devices
  cores_per_chip: int         # TensorCores a device drives
  names_count: str            # 'chips' or 'cores': what the N of a rented name counts
  hbm_bytes: int              # per chip, spec sheet
  hbm_available_bytes: int    # the compiler's 'available HBM' for one program (its RESOURCE_EXHAUSTED)
  peak_bf16_flops: float      # per chip per second, spec sheet
  hbm_bytes_per_s: float      # per chip, spec sheet


# Spec sheets: Cloud TPU docs, one page per generation. hbm_available_bytes is what libtpu 0.0.42.1
# reports (to 0.01 GiB; benchmarks/tpu_aot_NOTES.md). v5p is sold as '95 GB' but the compiler offers
# a program 95.74 GiB, so the chip holds 96 GiB.
GENERATIONS = {
    'v4': Generation('v4', 'megacore', 'TPU v4', 2, 'cores', 32 * GIB, round(30.75 * GIB), 275e12, 1200e9),
    'v5e': Generation('v5e', 'default', 'TPU v5 lite', 1, 'chips', 16 * GIB, round(15.75 * GIB), 197e12, 819e9),
    'v5p': Generation('v5p', 'default', 'TPU v5', 2, 'cores', 96 * GIB, round(95.74 * GIB), 459e12, 2765e9),
    'v6e': Generation('v6e', 'default', 'TPU v6 lite', 1, 'chips', 32 * GIB, round(31.25 * GIB), 918e12, 1640e9),
}
ALIASES = {'v5litepod': 'v5e'}
_CHIPS_2D = (1, 4, 8, 16, 32, 64, 128, 256)      # v5e, v6e slice sizes
_SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}  # v4, v5p below a 4x4x4 cube
_MAX_CHIPS_3D = {'v4': 2048, 'v5p': 6144}  # v5p: the largest job is 16x16x24
_NAME = re.compile(r'(?:([1-9]\d*)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)')
_FORMS = ("[<slices>x]<generation>-<N>: v5e-N, v5litepod-N and v6e-N count chips "
          f"(N in {_CHIPS_2D}); v4-N and v5p-N count TensorCores, 2 per chip (N = 8, 16, 32, 64, then "
          "multiples of 128); e.g. 'v5e-8', 'v5p-128', '2xv5p-128'")


@dataclasses.dataclass(frozen=True)
class Slice:
  """A rented slice, as get_topology_desc wants it."""
  name: str
  generation: Generation
  num_slices: int
  chips: int                       # per slice
  dims: tuple[int, ...]            # chip grid of one slice
  chips_per_host: tuple[int, int, int]

  @property
  def topology_name(self) -> str:
    return f"{self.generation.topology_prefix}:{'x'.join(map(str, self.dims))}"

  @property
  def num_devices(self) -> int:
    return self.num_slices * self.chips


def _dims_2d(chips: int) -> tuple[int, int]:
  short = 2 ** (int(math.log2(chips)) // 2)
  return short, chips // short


def _dims_3d(chips: int) -> tuple[int, int, int]:
  """Below 64 chips the fixed small shapes; from 64 every side is a multiple of 4, the most cubic
  (smallest longest side, then smallest middle side): 4x4x20 for v5p-640, 8x8x12 for v4-1536."""
  if chips in _SMALL_3D:
    return _SMALL_3D[chips]
  cubes = chips // 64
  shapes = [(a, b, cubes // (a * b)) for a in range(1, cubes + 1) for b in range(a, cubes + 1)
            if cubes % (a * b) == 0 and cubes // (a * b) >= b]
  a, b, c = min(shapes, key=lambda s: (s[2], s[1]))
  return 4 * a, 4 * b, 4 * c


def slice_spec(name: str) -> Slice:
  """'v5e-8' -> Slice(chips=8, dims=(2, 4), ...); ValueError naming the valid forms otherwise."""
  match = _NAME.fullmatch(name)
  if match is None:
    raise errors.ConfigError(f'unknown TPU slice {name!r}; expected {_FORMS}')
  num_slices, gen_name, n = int(match[1] or 1), ALIASES.get(match[2], match[2]), int(match[3])
  gen = GENERATIONS[gen_name]
  if gen.names_count == 'chips':
    if n not in _CHIPS_2D:
      raise errors.ConfigError(f'TPU slice {name!r}: {gen_name}-N counts chips, N in {_CHIPS_2D}; expected '
                               f'{_FORMS}')
    dims, per_host = _dims_2d(n), (1, 1, 1) if n == 1 else (2, 4, 1) if n == 8 else (2, 2, 1)
    return Slice(name, gen, num_slices, n, dims, per_host)
  chips = n // 2
  if n % 2 or not (chips in _SMALL_3D or chips % 64 == 0) or chips > _MAX_CHIPS_3D[gen_name]:
    raise errors.ConfigError(f'TPU slice {name!r}: {gen_name}-N counts TensorCores (2 per chip), N in 8, 16, '
                             f'32, 64 or a multiple of 128 up to {2 * _MAX_CHIPS_3D[gen_name]}; expected '
                             f'{_FORMS}')
  return Slice(name, gen, num_slices, chips, _dims_3d(chips), (2, 2, 1))


def _allow_other_libtpu_processes() -> None:
  """libtpu holds /tmp/libtpu_lockfile for the life of a process that loads it (any JAX process
  started without JAX_PLATFORMS=cpu does), and a second process then fails get_topology_desc with
  ABORTED. Compile-only devices touch no chip, so off a TPU host several loads are safe."""
  if jax.default_backend() != 'tpu':
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


@functools.cache
def _devices(name: str) -> tuple:
  spec = slice_spec(name)
  _allow_other_libtpu_processes()
  try:
    topology = topologies.get_topology_desc(
        topology_name=spec.topology_name, platform='tpu', num_slices=spec.num_slices,
        chip_config_name=spec.generation.chip_config_name, chips_per_host_bounds=spec.chips_per_host)
  except RuntimeError as e:
    if 'TPU support not installed' not in str(e):
      raise
    raise errors.MissingExtra(f'compiling for TPU slice {name!r}', 'tpu', 'libtpu') from e
  return tuple(topology.devices)


def devices(name: str) -> list:
  """The compile-only TPU devices of slice `name` ('v5e-8', 'v5p-128', '2xv5p-128'), in id order.

  The same name gives the same device objects (a mesh cannot mix devices of two topologies).
  `jax.experimental.mesh_utils.create_device_mesh(shape, devices)` orders them along the torus.
  """
  return list(_devices(name))


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-device HBM of one program against what the compiler lets a program use."""
  needed_bytes: int
  available_bytes: int
  parts_bytes: dict   # arguments, outputs, aliased, temporaries, code; {} when read from an error

  @property
  def fits(self) -> bool:
    return self.needed_bytes <= self.available_bytes

  @property
  def headroom_bytes(self) -> int:
    """Negative: the shortfall."""
    return self.available_bytes - self.needed_bytes

  def __str__(self) -> str:
    gib = lambda b: f'{b / GIB:.2f}'
    used = f'{gib(self.needed_bytes)} GiB of {gib(self.available_bytes)} GiB per device'
    if self.parts_bytes:
      parts = (f"{k} {'-' * (k == 'aliased')}{gib(v)}" for k, v in self.parts_bytes.items())
      used += f" ({', '.join(parts)})"
    if self.fits:
      return f'fits: {used}, headroom {gib(self.headroom_bytes)} GiB'
    return f'does not fit: needs {used}, short by {gib(-self.headroom_bytes)} GiB'


_OUT_OF_HBM = re.compile(r'required for [^(]*\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)')
_UNIT = {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def _generation_of(compiled) -> Generation:
  shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
  kinds = {(d.device_kind, getattr(d, 'num_cores', None)) for s in shardings for d in s.device_set}
  by_kind = {(g.device_kind, g.cores_per_chip): g for g in GENERATIONS.values()}
  kind = next(iter(kinds)) if len(kinds) == 1 else None
  if kind not in by_kind:
    raise ValueError(f'memory_report needs a program compiled for topology.devices(name); its devices are '
                     f'(device_kind, num_cores) {sorted(kinds)}, expected one of {sorted(by_kind)}')
  return by_kind[kind]


def memory_report(compiled_or_error) -> MemoryReport:
  """Per-device memory of a compiled TPU program, or of the compiler's out-of-HBM error.

  A compiled program needs arguments + outputs - aliased (donated buffers reused as outputs) +
  temporaries + generated code, which is the total the compiler checks against its available HBM.
  The error (RESOURCE_EXHAUSTED: '... HLO temporaries (17.05G) exceeds available HBM (15.75G)')
  gives only the total and the limit, to 0.01 GiB.
  """
  if isinstance(compiled_or_error, Exception):
    error = compiled_or_error
    match = _OUT_OF_HBM.search(str(error))
    if match is None:
      raise ValueError(f'not an out-of-HBM error from the TPU compiler: {error}') from error
    needed, needed_unit, available, available_unit = match.groups()
    to_bytes = lambda value, unit: round(float(value) * _UNIT[unit])
    return MemoryReport(to_bytes(needed, needed_unit), to_bytes(available, available_unit), {})
  stats = compiled_or_error.memory_analysis()
  parts = {'arguments': stats.argument_size_in_bytes, 'outputs': stats.output_size_in_bytes,
           'aliased': stats.alias_size_in_bytes, 'temporaries': stats.temp_size_in_bytes,
           'code': stats.generated_code_size_in_bytes}
  needed = parts['arguments'] + parts['outputs'] - parts['aliased'] + parts['temporaries'] + parts['code']
  return MemoryReport(needed, _generation_of(compiled_or_error).hbm_available_bytes, parts)


def try_compile(lowered):
  """(compiled, report), or (None, report) when the program does not fit in HBM; other errors raise."""
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if not str(e).startswith('RESOURCE_EXHAUSTED') or _OUT_OF_HBM.search(str(e)) is None:
      raise
    return None, memory_report(e)
  return compiled, memory_report(compiled)
