"""Flash attention for TPU (Pallas Mosaic TPU): forward and backward, causal, GQA, segment ids.

Layout inside the kernels is [B, H, T, D] (heads outside the sequence, so a block is a (T, D) tile
in VMEM); the wrapper transposes from the model's [B, T, H, D]. GQA reads K/V head h // G through
the BlockSpec index maps, so repeated K/V are never materialised.

Three pallas_calls, following the FlashAttention-2 split (Dao 2023, Alg. 1 and 2):
  forward   grid (B, Hq, T/bq, S/bk), online softmax over the last axis, writes O and lse.
  dK, dV    grid (B, Hkv, S/bk, G*T/bq): the G query heads of a kv head and all q blocks are the
            reduction axis, so dK/dV of a kv head are summed in VMEM (no [B,S,Hq,D] intermediate).
  dQ        grid (B, Hq, T/bq, S/bk).
Causal: blocks wholly above the diagonal are skipped (pl.when) and their index maps clamped to a
needed block, so the pipeline does not fetch them. Tested on CPU with interpret=True.

Placement: XLA cannot split a Mosaic kernel across devices, so on a mesh of more than one device the
caller runs this inside jax.shard_map (batch and heads split, T and head_dim whole; K/V heads split
like Q heads). Lowering reads the target chip from the current mesh (jax.set_mesh or shard_map's), so
a call compiles for a TPU topology from a CPU host; inputs placed on a one-device mesh with no mesh
set get that mesh from their own sharding (tests/test_tpu_compile.py).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from pallas_kernels.flash_attention import padding, reference

# Finite, so a block whose row is fully masked gives exp(0)=1 terms that the next unmasked block's
# rescale exp(MASK - m) wipes out, instead of the NaN that -inf - -inf would give.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_BLOCKS = (512, 256, 128)
SEQ_MULTIPLE = 128  # self-attention of any other length is padded to it (padding.py)


def _pick_block(n: int) -> int | None:
  return next((b for b in _BLOCKS if n % b == 0), None)


def check_supported(q, k, v, segment_ids) -> str | None:
  """Returns why this backend cannot take these inputs, or None when it can."""
  t, d, s = q.shape[1], q.shape[3], k.shape[1]
  if q.dtype not in (jnp.bfloat16, jnp.float32):
    return f"mosaic_tpu takes bf16 or f32 inputs, got {q.dtype}"
  if (_pick_block(t) is None or _pick_block(s) is None) and t != s:
    return f"mosaic_tpu needs T and S multiples of 128 (or T == S, padded), got T={t}, S={s}"
  if d % 64:
    return f"mosaic_tpu needs head_dim a multiple of 64, got {d}"
  return None


def _mask(q_start, k_start, block_q, block_k, causal, qseg_ref, kvseg_ref):
  """[bq, bk] bool mask of allowed (query, key) pairs, or None when every pair is allowed."""
  mask = None
  if causal:
    rows = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    cols = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    mask = rows >= cols
  if qseg_ref is not None:
    same = qseg_ref[...] == kvseg_ref[...]  # [bq, 1] == [1, bk]
    mask = same if mask is None else mask & same
  return mask


def _logits(q, k, scale, mask):
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  return s if mask is None else jnp.where(mask, s, _MASK_VALUE)


def _split_seg(refs, has_seg):
  return (refs[0], refs[1], refs[2:]) if has_seg else (None, None, refs)


def _fwd_kernel(*refs, scale, causal, block_q, block_k, has_seg):
  qseg_ref, kvseg_ref, (q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split_seg(refs, has_seg)
  qi, ki = pl.program_id(2), pl.program_id(3)
  q_start, k_start = qi * block_q, ki * block_k

  @pl.when(ki == 0)
  def _init():
    m_scr[...] = jnp.full_like(m_scr, -jnp.inf)
    l_scr[...] = jnp.zeros_like(l_scr)
    acc_scr[...] = jnp.zeros_like(acc_scr)

  @pl.when((k_start < q_start + block_q) if causal else True)
  def _body():
    s = _logits(q_ref[...], k_ref[...], scale, _mask(q_start, k_start, block_q, block_k, causal, qseg_ref, kvseg_ref))
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_scr[...] = alpha * l_scr[...] + p.sum(axis=1, keepdims=True)
    m_scr[...] = m_new
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_scr[...] = alpha * acc_scr[...] + pv

  @pl.when(ki == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    o_ref[...] = (acc_scr[...] / l).astype(o_ref.dtype)
    lse_ref[...] = m_scr[...] + jnp.log(l)


def _dkv_kernel(*refs, scale, causal, block_q, block_k, num_q_blocks, has_seg):
  qseg_ref, kvseg_ref, rest = _split_seg(refs, has_seg)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
  kj, r = pl.program_id(2), pl.program_id(3)
  q_start, k_start = (r % num_q_blocks) * block_q, kj * block_k

  @pl.when(r == 0)
  def _init():
    dk_scr[...] = jnp.zeros_like(dk_scr)
    dv_scr[...] = jnp.zeros_like(dv_scr)

  @pl.when((k_start < q_start + block_q) if causal else True)
  def _body():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = _logits(q, k, scale, _mask(q_start, k_start, block_q, block_k, causal, qseg_ref, kvseg_ref))
    p = jnp.exp(s - lse_ref[...])  # [bq, bk]
    dv_scr[...] += jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dk_scr[...] += jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

  @pl.when(r == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, scale, causal, block_q, block_k, has_seg):
  qseg_ref, kvseg_ref, rest = _split_seg(refs, has_seg)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr = rest
  qi, kj = pl.program_id(2), pl.program_id(3)
  q_start, k_start = qi * block_q, kj * block_k

  @pl.when(kj == 0)
  def _init():
    dq_scr[...] = jnp.zeros_like(dq_scr)

  @pl.when((k_start < q_start + block_q) if causal else True)
  def _body():
    k = k_ref[...]
    s = _logits(q_ref[...], k, scale, _mask(q_start, k_start, block_q, block_k, causal, qseg_ref, kvseg_ref))
    p = jnp.exp(s - lse_ref[...])
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(kj == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _seg_specs(block_q, block_k, q_map, kv_map):
  """Segment ids travel as q [B, T, 1] (a column) and kv [B, 1, S] (a row) so they broadcast to [bq, bk]."""
  return [pl.BlockSpec((None, block_q, 1), lambda *g: (g[0], q_map(*g), 0)),
          pl.BlockSpec((None, 1, block_k), lambda *g: (g[0], 0, kv_map(*g)))]


def _struct(shape, dtype, like):
  """A pallas_call output type; inside shard_map it varies over the same mesh axes as `like`."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _params(n_parallel):
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def _forward(q, k, v, seg, causal, scale, interpret):
  """q [B,H,T,D], k/v [B,Hkv,S,D], seg ([B,T,1], [B,1,S]) or None -> (o [B,H,T,D], lse [B,H,T,1] f32)."""
  b, h, t, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  group, bq, bk = h // hkv, _pick_block(t), _pick_block(s)
  # Causal: the last kv block a q block needs; later grid steps re-point to it (no new fetch).
  kv_block = (lambda i, j: jnp.minimum(j, ((i + 1) * bq - 1) // bk)) if causal else (lambda i, j: j)
  q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_ // group, kv_block(i, j), 0))
  seg_specs = _seg_specs(bq, bk, lambda b_, h_, i, j: i, lambda b_, h_, i, j: kv_block(i, j)) if seg else []
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk, has_seg=bool(seg))
  return pl.pallas_call(
      kernel,
      grid=(b, h, t // bq, s // bk),
      in_specs=[*seg_specs, q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j: (b_, h_, i, 0))],
      out_shape=[_struct(q.shape, q.dtype, q), _struct((b, h, t, 1), jnp.float32, q)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_params(3),
      interpret=interpret,
  )(*(seg or ()), q, k, v)


def _backward(q, k, v, seg, o, lse, do, causal, scale, interpret):
  b, h, t, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  group, bq, bk = h // hkv, _pick_block(t), _pick_block(s)
  nq = t // bq
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [B,H,T,1]
  has_seg = bool(seg)

  # dK, dV: reduction index r walks (query head in group, q block); causal clamps to the first needed q block.
  q_block = (lambda j, r: jnp.maximum(r % nq, (j * bk) // bq)) if causal else (lambda j, r: r % nq)
  q_head = lambda hk, r: hk * group + r // nq
  row = lambda width: pl.BlockSpec((None, None, bq, width), lambda b_, hk, j, r: (b_, q_head(hk, r), q_block(j, r), 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, hk, j, r: (b_, hk, j, 0))
  seg_specs = _seg_specs(bq, bk, lambda b_, hk, j, r: q_block(j, r), lambda b_, hk, j, r: j) if has_seg else []
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk, num_q_blocks=nq,
                        has_seg=has_seg),
      grid=(b, hkv, s // bk, group * nq),
      in_specs=[*seg_specs, row(d), kv_spec, kv_spec, row(d), row(1), row(1)],
      out_specs=[kv_spec, kv_spec],
      out_shape=[_struct(k.shape, k.dtype, k), _struct(v.shape, v.dtype, v)],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      compiler_params=_params(3),
      interpret=interpret,
  )(*(seg or ()), q, k, v, do, lse, delta)

  kv_block = (lambda i, j: jnp.minimum(j, ((i + 1) * bq - 1) // bk)) if causal else (lambda i, j: j)
  q_spec = lambda width: pl.BlockSpec((None, None, bq, width), lambda b_, h_, i, j: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_ // group, kv_block(i, j), 0))
  seg_specs = _seg_specs(bq, bk, lambda b_, h_, i, j: i, lambda b_, h_, i, j: kv_block(i, j)) if has_seg else []
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk, has_seg=has_seg),
      grid=(b, h, nq, s // bk),
      in_specs=[*seg_specs, q_spec(d), kv_spec, kv_spec, q_spec(d), q_spec(1), q_spec(1)],
      out_specs=q_spec(d),
      out_shape=_struct(q.shape, q.dtype, q),
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_params(3),
      interpret=interpret,
  )(*(seg or ()), q, k, v, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention_bhtd(q, k, v, seg, causal, scale, interpret):
  return _forward(q, k, v, seg, causal, scale, interpret)[0]


def _attention_fwd(q, k, v, seg, causal, scale, interpret):
  o, lse = _forward(q, k, v, seg, causal, scale, interpret)
  return o, (q, k, v, seg, o, lse)


def _attention_bwd(causal, scale, interpret, res, do):
  q, k, v, seg, o, lse = res
  dq, dk, dv = _backward(q, k, v, seg, o, lse, do, causal, scale, interpret)
  return dq, dk, dv, None


_attention_bhtd.defvjp(_attention_fwd, _attention_bwd)


def _vary_alike(xs):
  """Inside shard_map: every input varies over the union of the inputs' varying mesh axes, so the
  kernels' outputs have one type; autodiff turns the cast into the psum a replicated K/V gradient needs."""
  leaves = jax.tree.leaves(xs)
  union = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in leaves))
  missing = lambda x: tuple(sorted(union - jax.typeof(x).manual_axis_type.varying))
  return jax.tree.map(lambda x: jax.lax.pcast(x, missing(x), to="varying"), xs)


def _placement_mesh(q):
  """The mesh to lower the kernels under, or None when the current context already names the chip.

  Lowering asks the current mesh (else the default device) which TPU it targets. Inputs placed on a
  one-device mesh with no mesh set (jit of ShapeDtypeStructs on a compile-only topology) name it
  through their sharding. More than one device outside shard_map cannot work: XLA cannot split a
  Mosaic kernel, so that is an error naming the fix.
  """
  current = jax.sharding.get_abstract_mesh()
  mesh = current if not current.empty else jax.typeof(q).sharding.mesh
  auto = {a: n for a, n in mesh.shape.items() if n > 1 and a not in mesh.manual_axes}
  if auto:
    raise ValueError(f"mosaic_tpu: called on a mesh with axes {auto} outside jax.shard_map; XLA cannot "
                     "partition a Mosaic kernel, so call flash_attention inside jax.shard_map over that mesh "
                     "(batch and heads split, T and head_dim whole)")
  return mesh if current.empty and not mesh.empty else None


def flash_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale=None, interpret=False):
  """Same contract as `api.flash_attention` ([B,T,H,D] in and out); `interpret` runs it on CPU."""
  reference.check_inputs(q, k, v, segment_ids)
  if (why := check_supported(q, k, v, segment_ids)) is not None:
    raise ValueError(f"{why}; use implementation='xla'")
  scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
  t = q.shape[1]
  q, k, v, segment_ids = padding.pad(q, k, v, segment_ids, causal, SEQ_MULTIPLE)
  seg = None
  if segment_ids is not None:
    seg_bt = segment_ids.astype(jnp.int32)
    seg = (seg_bt[:, :, None], seg_bt[:, None, :])
  to_bhtd = lambda x: jnp.swapaxes(x, 1, 2)

  def attention(q, k, v, seg):
    q, k, v, seg = _vary_alike((q, k, v, seg))
    return to_bhtd(_attention_bhtd(to_bhtd(q), to_bhtd(k), to_bhtd(v), seg, causal, scale, interpret))

  mesh = None if interpret else _placement_mesh(q)
  if mesh is not None:
    attention = jax.shard_map(attention, mesh=mesh, in_specs=P(), out_specs=P())
  return attention(q, k, v, seg)[:, :t]
