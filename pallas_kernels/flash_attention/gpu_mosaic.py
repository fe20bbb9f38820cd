"""Flash attention for Hopper GPUs (Pallas Mosaic GPU: wgmma, TMA, warp specialisation).

Forward (FlashAttention-3 layout, Shah et al. 2024): a work tile is 2*BLOCK_Q query rows of one head;
two compute warpgroups (64 rows each) and one memory warpgroup that streams K/V blocks through a
STAGES-deep ring of shared-memory slots with TMA. A shared "schedule" barrier makes the two compute
warpgroups take turns on the tensor cores so one's softmax overlaps the other's matmuls. A CTA runs
one tile, or (`Config.persistent`) one CTA per SM loops over tiles: the K/V ring runs on into the next
tile's blocks as slots free up, and the next tile's Q loads during the current one's epilogue.
Backward, two kinds (`Config.backward`):
- 'fused': one kernel, CTA = 2 kv blocks of one kv head (one per compute warpgroup), pipeline over
  (q block, query head of the group); dK/dV accumulate in registers (GQA sums the group there and
  never materialises repeated K/V), and dQ comes from the same dS (5 block matmuls per block pair),
  added to an f32 buffer by TMA reduce-add.
- 'split' (FlashAttention-2): a dQ kernel (CTA = 2 q blocks, pipeline over kv blocks) and a dK/dV
  kernel as above without dQ (7 block matmuls per pair, but no dQ reduction traffic).
`default_config` picks per shape what measured fastest on the H200 (benchmarks/flash_attention.py;
the variants tried and their numbers are in benchmarks/flash_attention_NOTES.md).

Masking: causal (top-left, key <= query) skips blocks above the diagonal and masks only diagonal
blocks; segment ids are compared per element (q ids in registers, kv ids streamed with K).
Softmax runs in base 2 with scale*log2(e) folded into one multiply; lse is kept in those units.
Layouts: q/o [B, T, Hq, D], k/v [B, S, Hkv, D] sliced by TMA directly (no transposes);
lse/delta [B, Hq, T] f32. Technique read from JAX's ops/gpu/attention_mgpu.py and tokamax's sm90
kernels; this code adds bf16, softmax scale, causal backward, GQA backward and segment ids.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import llvm

from pallas_kernels.flash_attention import padding, reference

BLOCK_Q = 64  # rows per compute warpgroup: the wgmma M tile.
BLOCK_KV = 128  # forward kv block.
STAGES = 2  # K/V shared-memory ring depth.
BWD_BLOCK = 64  # q and kv block of the backward kernels.
_COMPUTE_WGS = 2
SEQ_MULTIPLE = math.lcm(_COMPUTE_WGS * BLOCK_Q, BLOCK_KV)  # self-attention of other lengths is padded (padding.py)
_LOG2E = math.log2(math.e)
# Finite start for the running max: a row fully masked in a block then gives exp2(-inf - m) = 0
# instead of exp2(-inf + inf) = NaN (rows can be fully masked in a block with segment ids).
_M_INIT = -1e30

_WGMMA = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row.
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per accumulator column.


def _smem(shape, dtype):
  # 128-byte swizzle with (8, 64) tiles: the wgmma operand layout for bf16 rows of 64 or 128.
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _params():
  return plgpu.CompilerParams(approx_math=True)


# Hardware named barriers (PTX bar.sync): 0 is __syncthreads and Mosaic GPU's warpgroup barriers take
# 1..3 (warpgroup index + 1), so these use ids above them.
_SCHEDULE_BARRIER_ID = 8  # forward: the compute warpgroups' turns on the tensor cores.


def _named_barrier_sync(barrier_id: int, num_threads: int = _COMPUTE_WGS * 128):
  """PTX `bar.sync id, n`: waits until n threads (both compute warpgroups) have arrived. A hardware
  barrier, no shared-memory mbarrier round trip (FlashAttention-3 and tokamax schedule with them)."""

  @plgpu.inline_mgpu()
  def emit(_):
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [], f"bar.sync {barrier_id}, {num_threads};", "",
                    has_side_effects=True)

  emit()


def check_supported(q, k, v, segment_ids) -> str | None:
  """Returns why this backend cannot take these inputs, or None when it can."""
  t, d, s = q.shape[1], q.shape[3], k.shape[1]
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"mosaic_gpu takes bf16 or f16 inputs, got {q.dtype}"
  if d not in (64, 128):
    return f"mosaic_gpu takes head_dim 64 or 128, got {d}"
  if (t % SEQ_MULTIPLE or s % SEQ_MULTIPLE) and t != s:
    return f"mosaic_gpu needs T and S multiples of {SEQ_MULTIPLE} (or T == S, padded), got T={t}, S={s}"
  return None


def _iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=_WGMMA)


def _bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


# ----------------------------------------------------------------------------------------------
# Forward.


def _num_sms() -> int:
  """Streaming multiprocessors of the first device; 132 (H100/H200 SXM) where it has none (CPU lowering)."""
  return getattr(jax.devices()[0], "core_count", None) or 132


def _forward(q, k, v, seg, *, causal, scale, config):
  """Returns o [B, T, Hq, D] (q.dtype) and lse [B, Hq, T] f32 in log2 units of (scale * q.k)."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  block_q, block_kv = BLOCK_Q, config.block_kv
  tile_q = _COMPUTE_WGS * block_q
  num_q_tiles, num_kv = t // tile_q, s // block_kv
  assert block_kv % tile_q == 0, (block_kv, tile_q)  # both warpgroups then need the same kv blocks.
  stages = min(STAGES, num_kv)
  has_seg = seg is not None
  dtype = q.dtype
  c = scale * _LOG2E
  # Work tiles (batch, q tile, head), heads fastest, as a 3-D grid would launch them (CTAs running
  # together share a q tile; K/V of few batches at once stay in L2); causal: each batch's heaviest q
  # tiles first, so the tail of the grid is short tiles. One CTA per tile, or (Config.persistent) one
  # CTA per SM taking every num_ctas-th tile, whose K/V ring and next Q load then run ahead across
  # tile boundaries.
  num_tiles = b * num_q_tiles * hq
  num_ctas = min(num_tiles, _num_sms()) if config.persistent else num_tiles

  def tile_index(i):
    hi, rest = lax.rem(i, hq), lax.div(i, hq)
    qt, bi = lax.rem(rest, num_q_tiles), lax.div(rest, num_q_tiles)
    return bi, hi, (num_q_tiles - 1 - qt if causal else qt)

  def kv_steps_of(qi):
    # Causal: kv blocks up to the tile's last query. Both warpgroups need the same ones: block_kv is a
    # multiple of the 128-row tile, so no kv block boundary falls inside the tile.
    return lax.min(num_kv, pl.cdiv((qi + 1) * tile_q, block_kv)) if causal else num_kv

  def for_each_tile(body):
    """Runs body(bi, hi, qi, has_next, next_tile, base) over this CTA's tiles; base counts the kv blocks
    of its earlier tiles (the ring's position); next_tile is the index of the next one if has_next."""
    cta = lax.axis_index("ctas")
    num_local = lax.div(num_tiles - cta + num_ctas - 1, num_ctas)

    def step(j, base):
      i = cta + j * num_ctas
      bi, hi, qi = tile_index(i)
      body(bi, hi, qi, j + 1 < num_local, i + num_ctas, base)
      return base + kv_steps_of(qi)

    lax.fori_loop(0, num_local, step, jnp.int32(0))

  def kernel(*refs):
    if has_seg:
      (q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, q_smem2, o_smem2, k_smem, v_smem, lse_smem2, kseg_smem,
       k_bar, v_bar, q_bar, kseg_bar, k_consumed, v_consumed, sched) = refs
    else:
      (q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem2, o_smem2, k_smem, v_smem, lse_smem2,
       k_bar, v_bar, q_bar, k_consumed, v_consumed, sched) = refs
      seg_ref = kseg_smem = kseg_bar = None
    wg = lax.axis_index("wg")

    def schedule_barrier():
      if config.named_barriers:
        _named_barrier_sync(_SCHEDULE_BARRIER_ID)
      else:
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    def turn_for_pv(slot):
      # Hands the tensor cores to the other warpgroup; V of `slot` is needed next.
      if config.named_barriers:
        plgpu.barrier_wait(v_bar.at[slot])
        _named_barrier_sync(_SCHEDULE_BARRIER_ID)
      else:
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(sched)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute_wg():
      plgpu.set_max_registers(232, action="increase")
      q_smem, o_smem, lse_smem = q_smem2.at[wg], o_smem2.at[wg], lse_smem2.at[wg]

      def load_q(i):
        bi, hi, qi = tile_index(i)
        rows = (bi, pl.ds(qi * tile_q + wg * block_q, block_q), hi)
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_bar.at[wg])

      load_q(lax.axis_index("ctas"))

      def tile(bi, hi, qi, has_next, next_tile, base):
        q_base = qi * tile_q + wg * block_q
        kv_steps = kv_steps_of(qi)
        qseg = None
        if has_seg:
          qseg = plgpu.load(seg_ref.at[bi, pl.ds(q_base, block_q)], (), layout=_ROW, optimized=False)
        plgpu.barrier_wait(q_bar.at[wg])

        m_i = plgpu.layout_cast(jnp.full((block_q,), _M_INIT, jnp.float32), _ROW)
        l_i = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), _ROW)
        acc = plgpu.layout_cast(jnp.zeros((block_q, d), jnp.float32), _WGMMA)

        @pl.when(kv_steps > 0)
        def _():
          plgpu.barrier_wait(k_bar.at[lax.rem(base, stages)])

        pl.when(wg == 1)(schedule_barrier)

        def kv_step(step, carry, diagonal):
          acc, m_i, l_i = carry
          slot = lax.rem(base + step, stages)

          def qk_and_ids(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
            schedule_barrier()
            kseg = None
            if has_seg:
              plgpu.barrier_wait(kseg_bar.at[slot])
              kseg = plgpu.load(kseg_smem.at[slot], (), layout=_COL)
            return acc_ref[...], kseg

          qk, kseg = pl.run_scoped(qk_and_ids, plgpu.ACC((block_q, block_kv), jnp.float32))
          plgpu.barrier_arrive(k_consumed.at[slot])
          shape = (block_q, block_kv)
          if diagonal:
            qk = jnp.where(q_base + _iota(shape, 0) >= step * block_kv + _iota(shape, 1), qk, -jnp.inf)
          if has_seg:
            qk = jnp.where(_bcast(qseg, shape, 0) == _bcast(kseg, shape, 1), qk, -jnp.inf)

          m_new = jnp.maximum(m_i, qk.max(axis=1) * c)
          alpha = jnp.exp2(m_i - m_new)
          p = jnp.exp2(qk * c - _bcast(m_new, shape, 0))
          acc *= _bcast(alpha, acc.shape, 0)
          l_i = l_i * alpha + p.sum(axis=1)
          p16 = p.astype(dtype)
          # Same order as JAX's attention_mgpu: finish the softmax before the tensor-core turn.
          acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
          turn_for_pv(slot)

          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
            nxt = step + 1

            @pl.when(nxt < kv_steps)
            def _():
              plgpu.barrier_wait(k_bar.at[lax.rem(base + nxt, stages)])

          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
          plgpu.barrier_arrive(v_consumed.at[slot])
          return acc, m_new, l_i

        carry = (acc, m_i, l_i)
        if causal:
          full_steps = lax.min(kv_steps, lax.div(q_base, block_kv))
          carry = lax.fori_loop(0, full_steps, functools.partial(kv_step, diagonal=False), carry)
          carry = lax.fori_loop(full_steps, kv_steps, functools.partial(kv_step, diagonal=True), carry)
        else:
          carry = lax.fori_loop(0, kv_steps, functools.partial(kv_step, diagonal=False), carry)
        acc, m_i, l_i = carry
        pl.when(wg == 0)(schedule_barrier)
        # Q of this tile is read by now: every thread of both warpgroups waited on its last QK^T before
        # arriving at the last turn_for_pv barrier, which this thread has passed. So the next tile's Q
        # can load into q_smem during this one's epilogue.
        pl.when(has_next)(lambda: load_q(next_tile))

        acc *= _bcast(1.0 / l_i, acc.shape, 0)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's O and lse are out of smem.
        o_smem[...] = acc.astype(dtype)
        lse_smem[...] = m_i + jnp.log(l_i) * _LOG2E  # log2(l) = ln(l) * log2(e)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, pl.ds(q_base, block_q), hi])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(q_base, block_q)])

      for_each_tile(tile)
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory_wg():
      plgpu.set_max_registers(40, action="decrease")

      def tile(bi, hi, qi, has_next, next_tile, base):
        del has_next, next_tile
        kv_head = lax.div(hi, group)

        @pl.loop(0, kv_steps_of(qi))
        def _(step):
          slot = lax.rem(base + step, stages)

          @pl.when(base + step >= stages)
          def _():
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])

          rows = (bi, pl.ds(step * block_kv, block_kv), kv_head)
          plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
          if has_seg:
            plgpu.copy_gmem_to_smem(seg_ref.at[bi, pl.ds(step * block_kv, block_kv)], kseg_smem.at[slot],
                                    kseg_bar.at[slot])
          plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])

      for_each_tile(tile)

  scratch = [
      _smem((_COMPUTE_WGS, block_q, d), dtype),  # Q
      _smem((_COMPUTE_WGS, block_q, d), dtype),  # O
      _smem((stages, block_kv, d), dtype),
      _smem((stages, block_kv, d), dtype),
      plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.float32),
  ]
  if has_seg:
    scratch.append(plgpu.SMEM((stages, block_kv), jnp.int32))
  barriers = [plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
              plgpu.Barrier(num_barriers=_COMPUTE_WGS)]
  if has_seg:
    barriers.append(plgpu.Barrier(num_barriers=stages))
  barriers += [plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages)] * 2
  barriers.append(plgpu.Barrier(num_arrivals=_COMPUTE_WGS))
  out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32))
  return plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=(*scratch, *barriers),
      grid=(num_ctas,),
      grid_names=("ctas",),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_params(),
  )(q, k, v, *((seg,) if has_seg else ()))


# ----------------------------------------------------------------------------------------------
# Backward.


def _backward_dq(q, k, v, seg, do, lse, delta, *, causal, scale):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  block_q = block_kv = BWD_BLOCK
  tile_q = _COMPUTE_WGS * block_q
  num_q_tiles, num_kv = t // tile_q, s // block_kv
  has_seg = seg is not None
  dtype = q.dtype
  c = scale * _LOG2E

  def kernel(*refs):
    if has_seg:
      q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem2, do_smem2, bar = refs
    else:
      q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem2, do_smem2, bar = refs
      seg_ref = None
    bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
    qi = num_q_tiles - 1 - lax.axis_index("q_tiles") if causal else lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    kv_head = lax.div(hi, group)
    q_base = qi * tile_q + wg * block_q
    rows = (bi, pl.ds(q_base, block_q), hi)
    q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
    ub = lax.min(num_kv, pl.cdiv((qi + 1) * tile_q, block_kv)) if causal else num_kv
    shape = (block_q, block_kv)
    accs = {}

    def compute_thread(pipeline_callback):
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, bar.at[wg])
      vec = lambda ref: plgpu.load(ref.at[bi, hi, pl.ds(q_base, block_q)], (), layout=_ROW, optimized=False)
      lse, delta = vec(lse_ref), vec(delta_ref)
      qseg = None
      if has_seg:
        qseg = plgpu.load(seg_ref.at[bi, pl.ds(q_base, block_q)], (), layout=_ROW, optimized=False)
      plgpu.barrier_wait(bar.at[wg])

      def run(dq_acc):
        accs["dq"] = dq_acc  # refs reach the pipeline body by closure, not through its loop carry.
        pipeline_callback((lse, delta, qseg))
        return dq_acc[...]

      dq = pl.run_scoped(run, plgpu.ACC((block_q, d), jnp.float32))
      q_smem[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    def body(index, k_smem, v_smem, *rest):
      if has_seg:
        kseg_smem, k_consumed, v_consumed, kseg_consumed, carry = rest
      else:
        k_consumed, v_consumed, carry = rest
      (ki,) = index
      kv_base = ki * block_kv
      dq_acc = accs["dq"]
      lse, delta, qseg = carry

      def dp_and_s(dp_acc, s_acc):
        plgpu.wgmma(dp_acc, do_smem, v_smem.T)
        plgpu.wgmma(s_acc, q_smem, k_smem.T)
        plgpu.wgmma_wait(1)
        plgpu.barrier_arrive(v_consumed)
        return dp_acc[...], s_acc[...]

      acc_type = plgpu.ACC(shape, jnp.float32)
      dp, s_ = pl.run_scoped(dp_and_s, acc_type, acc_type)
      if causal:
        s_ = lax.cond(kv_base + block_kv > q_base,
                      lambda: jnp.where(q_base + _iota(shape, 0) >= kv_base + _iota(shape, 1), s_, -jnp.inf),
                      lambda: s_)
      if has_seg:
        kseg = plgpu.load(kseg_smem, (), layout=_COL)
        plgpu.barrier_arrive(kseg_consumed)
        s_ = jnp.where(_bcast(qseg, shape, 0) == _bcast(kseg, shape, 1), s_, -jnp.inf)
      p = jnp.exp2(s_ * c - _bcast(lse, shape, 0))
      ds = p * (dp - _bcast(delta, shape, 0))
      plgpu.wgmma(dq_acc, ds.astype(dtype), k_smem)
      plgpu.wgmma_wait(0)
      plgpu.barrier_arrive(k_consumed)
      return carry

    kv_spec = plgpu.BlockSpec((block_kv, d), lambda i: (i, 0),
                              transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    specs = [kv_spec, kv_spec]
    operands = [k_ref.at[bi, :, kv_head, :], v_ref.at[bi, :, kv_head, :]]
    if has_seg:
      specs.append(plgpu.BlockSpec((block_kv,), lambda i: (i,)))
      operands.append(seg_ref.at[bi])
    plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(ub,),
        max_concurrent_steps=min(STAGES, num_kv),
        num_compute_wgs=_COMPUTE_WGS,
        memory_registers=40,
        wg_axis="wg",
        manual_consumed_barriers=True,
        compute_context=compute_thread,
        in_specs=specs,
    )(*operands)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=(_smem((_COMPUTE_WGS, block_q, d), dtype), _smem((_COMPUTE_WGS, block_q, d), dtype),
                     plgpu.Barrier(num_arrivals=2, num_barriers=_COMPUTE_WGS)),
      grid=(hq, num_q_tiles, b),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_params(),
  )(q, k, v, *((seg,) if has_seg else ()), do, lse, delta)


def _backward_kv(q, k, v, seg, do, lse, delta, *, causal, scale, config, with_dq):
  """dK/dV kernel; with_dq=True also computes dQ from the same dS (the fused backward: 5 block
  matmuls per (q, kv) block pair instead of the split backward's 7). Returns (dq or None, dk, dv).

  CTA = 2 kv blocks of one kv head (one per compute warpgroup), pipeline over (q block, query head
  of the group); dK/dV accumulate in registers. With dQ, each step both warpgroups also write dS^T
  [kv, q] (bf16) to shared memory, meet at a barrier, and one of them (alternating by step)
  computes dQ_part [q, D] = sum_w dS_w K_w and adds it to an f32 dQ accumulator in global memory with
  a TMA reduce-add (FlashAttention-3 accumulates dQ the same way; it is zeroed by XLA before and
  scaled and cast after).
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  block_q = block_kv = BWD_BLOCK
  tile_kv = _COMPUTE_WGS * block_kv
  num_q, num_kv_tiles = t // block_q, s // tile_kv
  has_seg = seg is not None
  dtype = q.dtype
  c = scale * _LOG2E

  def kernel(*refs):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    seg_ref = refs.pop(3) if has_seg else None
    do_ref, lse_ref, delta_ref = refs[3:6]
    if with_dq:
      dq_ref, dk_ref, dv_ref, k_smem2, v_smem2, ds_smem, dq_smem, bar, sync = refs[6:]
    else:
      dk_ref, dv_ref, k_smem2, v_smem2, bar = refs[6:]
    bi, hk = lax.axis_index("batch"), lax.axis_index("heads")
    ki = lax.axis_index("kv_tiles")
    wg = lax.axis_index("wg")
    kv_base = ki * tile_kv + wg * block_kv
    rows = (bi, pl.ds(kv_base, block_kv), hk)
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    # Causal: q blocks that end at or before this tile's first key see none of it.
    lb = lax.div(ki * tile_kv, block_q) if causal else 0
    # Pipeline step i -> q block: from lb up, or from the last block down (Config.q_descending).
    q_block = (lambda i: num_q - 1 - i) if config.q_descending else (lambda i: lb + i)
    shape = (block_kv, block_q)  # transposed scores: rows are keys.
    accs = {}

    def rendezvous():
      plgpu.barrier_arrive(sync)
      plgpu.barrier_wait(sync)

    def compute_thread(pipeline_callback):
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, bar.at[wg])
      kvseg = None
      if has_seg:
        kvseg = plgpu.load(seg_ref.at[bi, pl.ds(kv_base, block_kv)], (), layout=_ROW, optimized=False)
      plgpu.barrier_wait(bar.at[wg])

      def run(dk_acc, dv_acc):
        accs["dk"], accs["dv"] = dk_acc, dv_acc
        # With dQ the carry also counts steps (dS buffer parity, dQ warpgroup).
        pipeline_callback((kvseg, jnp.int32(0)) if with_dq else kvseg)
        return dk_acc[...], dv_acc[...]

      acc_type = plgpu.ACC((block_kv, d), jnp.float32)
      dk, dv = pl.run_scoped(run, acc_type, acc_type)
      if with_dq:  # the other warpgroup's last dQ matmul may still read this warpgroup's K tile.
        rendezvous()
      k_smem[...] = (dk * scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    def body(index, q_smem, do_smem, lse_smem, delta_smem, *rest):
      if has_seg:
        qseg_smem, q_consumed, do_consumed, lse_consumed, delta_consumed, qseg_consumed, carry = rest
      else:
        q_consumed, do_consumed, lse_consumed, delta_consumed, carry = rest
      i, j = index
      q_base = q_block(i) * block_q
      if with_dq:
        kvseg, step = carry
        slot = lax.rem(step, 2)  # dS double buffer; also picks the dQ warpgroup (they alternate).
      else:
        kvseg = carry
      dk_acc, dv_acc = accs["dk"], accs["dv"]

      def s_t(acc):
        plgpu.wgmma(acc, k_smem, q_smem.T)
        lse = plgpu.load(lse_smem, (), layout=_COL)
        delta = plgpu.load(delta_smem, (), layout=_COL)
        plgpu.barrier_arrive(lse_consumed)
        plgpu.barrier_arrive(delta_consumed)
        qseg = None
        if has_seg:
          qseg = plgpu.load(qseg_smem, (), layout=_COL)
          plgpu.barrier_arrive(qseg_consumed)
        return acc[...], lse, delta, qseg

      acc_type = plgpu.ACC(shape, jnp.float32)
      st, lse, delta, qseg = pl.run_scoped(s_t, acc_type)
      if causal:
        st = lax.cond(kv_base + block_kv > q_base,
                      lambda: jnp.where(kv_base + _iota(shape, 0) <= q_base + _iota(shape, 1), st, -jnp.inf),
                      lambda: st)
      if has_seg:
        st = jnp.where(_bcast(kvseg, shape, 0) == _bcast(qseg, shape, 1), st, -jnp.inf)
      pt = jnp.exp2(st * c - _bcast(lse, shape, 1))

      def dp_t(acc):
        plgpu.wgmma(acc, v_smem, do_smem.T)
        return acc[...]

      dpt = pl.run_scoped(dp_t, acc_type)
      dst = (pt * (dpt - _bcast(delta, shape, 1))).astype(dtype)
      # dV += P^T dO is issued only now, not together with dP^T: then the f32 P^T and dP^T tiles and
      # the bf16 P^T operand are never all live beside the dK, dV accumulators. Issued together (the
      # earlier order), the fused kernel spilled registers (Nsight Compute, 16k causal d128: 1.3e8
      # local-memory requests, half of the warps' stall cycles) and ran 6-8% slower on long head_dim
      # 128 rows (benchmarks/flash_attention_NOTES.md, v4).
      plgpu.wgmma(dv_acc, pt.astype(dtype), do_smem)
      plgpu.wgmma(dk_acc, dst, q_smem)
      if with_dq:
        ds_smem.at[slot, wg][...] = dst
      plgpu.wgmma_wait(1)
      plgpu.barrier_arrive(do_consumed)
      plgpu.wgmma_wait(0)
      plgpu.barrier_arrive(q_consumed)
      if not with_dq:
        return carry
      # dq_smem is free once this warpgroup's previous reduce-add has read it; the barrier below
      # then tells the other warpgroup (both wait here every step).
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      plgpu.commit_smem()  # dS^T visible to the other warpgroup's tensor-core reads.
      rendezvous()

      @pl.when(wg == slot)
      def _dq():
        def dq_part(acc):
          for w in range(_COMPUTE_WGS):
            plgpu.wgmma(acc, ds_smem.at[slot, w].T, k_smem2.at[w])
          return acc[...]

        dq_smem[...] = pl.run_scoped(dq_part, plgpu.ACC((block_q, d), jnp.float32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bi, pl.ds(q_base, block_q), hk * group + j],
                                reduction_op="add")

      return kvseg, step + 1

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    head = lambda j: hk * group + j
    row_spec = plgpu.BlockSpec((block_q, None, d), lambda i, j: (q_block(i), head(j), 0), transforms=tiled)
    vec_spec = plgpu.BlockSpec((None, block_q), lambda i, j: (head(j), q_block(i)))
    specs = [row_spec, row_spec, vec_spec, vec_spec]
    operands = [q_ref.at[bi], do_ref.at[bi], lse_ref.at[bi], delta_ref.at[bi]]
    if has_seg:
      specs.append(plgpu.BlockSpec((block_q,), lambda i, j: (q_block(i),)))
      operands.append(seg_ref.at[bi])
    plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(lax.max(num_q - lb, 0) if causal else num_q, group),
        max_concurrent_steps=min(STAGES, num_q),
        num_compute_wgs=_COMPUTE_WGS,
        memory_registers=40,
        wg_axis="wg",
        manual_consumed_barriers=True,
        compute_context=compute_thread,
        in_specs=specs,
    )(*operands)

  kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
  inputs = (q, k, v, *((seg,) if has_seg else ()), do, lse, delta)
  kv_scratch = (_smem((_COMPUTE_WGS, block_kv, d), dtype), _smem((_COMPUTE_WGS, block_kv, d), dtype))
  load_barrier = plgpu.Barrier(num_arrivals=2, num_barriers=_COMPUTE_WGS)
  if not with_dq:
    dk, dv = plgpu.kernel(
        kernel,
        out_type=(kv_type, kv_type),
        scratch_types=(*kv_scratch, load_barrier),
        grid=(hkv, num_kv_tiles, b),
        grid_names=("heads", "kv_tiles", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=_params(),
    )(*inputs)
    return None, dk, dv

  scratch = (
      *kv_scratch,
      _smem((2, _COMPUTE_WGS, block_kv, block_q), dtype),
      # f32 rows of 32 elements = 128 bytes: the same swizzle as the bf16 tiles.
      plgpu.SMEM((block_q, d), jnp.float32,
                 transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))),
      load_barrier,
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
  )

  def kernel_with_scratch(*refs):
    # plgpu.kernel cannot take the mutable dQ accumulator (a Ref), pl.kernel can; scratch is
    # allocated as plgpu.kernel does it.
    pl.run_scoped(functools.partial(kernel, *refs), *scratch, collective_axes="wg")

  dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32), memory_space=plgpu.GMEM)
  dk, dv = pl.kernel(
      kernel_with_scratch,
      out_type=(kv_type, kv_type),
      mesh=plgpu.Mesh(grid=(hkv, num_kv_tiles, b), grid_names=("heads", "kv_tiles", "batch"),
                      num_threads=_COMPUTE_WGS + 1, thread_name="wg"),
      compiler_params=_params(),
  )(*inputs, dq_acc)
  dq = (jax.freeze(dq_acc) * scale).astype(dtype)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, seg, causal, scale, config):
  return _forward(q, k, v, seg, causal=causal, scale=scale, config=config)[0]


def _attention_fwd(q, k, v, seg, causal, scale, config):
  o, lse = _forward(q, k, v, seg, causal=causal, scale=scale, config=config)
  return o, (q, k, v, seg, o, lse)


def _attention_bwd(causal, scale, config, res, do):
  q, k, v, seg, o, lse = res
  do = do.astype(q.dtype)
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  # lse is in log2 units of scale * q.k, as the kernels use it.
  kwargs = dict(causal=causal, scale=scale)
  if config.backward == "fused":
    dq, dk, dv = _backward_kv(q, k, v, seg, do, lse, delta, config=config, with_dq=True, **kwargs)
  else:
    dq = _backward_dq(q, k, v, seg, do, lse, delta, **kwargs)
    _, dk, dv = _backward_kv(q, k, v, seg, do, lse, delta, config=config, with_dq=False, **kwargs)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)

class Config(NamedTuple):
  """Kernel variant, compared by the benchmark; `default_config` picks the measured best per shape."""
  backward: str = "split"  # 'split': a dQ kernel and a dK/dV kernel; 'fused': one kernel.
  block_kv: int = BLOCK_KV  # forward key block: 128, or 256 for head_dim 64 (shared memory).
  # Forward: the compute warpgroups take turns on the tensor cores at a hardware named barrier
  # (bar.sync) instead of a shared-memory mbarrier.
  named_barriers: bool = False
  # Forward: one CTA per SM looping over the work tiles (instead of one CTA per tile), so K/V and the
  # next tile's Q load during a tile's epilogue.
  persistent: bool = False
  # dK/dV and fused backward: walk q blocks from the last one down instead of from the first one
  # this kv tile sees. Under causal masking CTAs start at different q blocks; walking down, the CTAs
  # running together read the same q/dO block at the same time (L2 reuse).
  q_descending: bool = False


def default_config(head_dim: int, kv_len: int, causal: bool, group: int) -> Config:
  """The variant measured fastest on the H200 (benchmarks/flash_attention_NOTES.md, v3 and v5):
  fused backward except for causal GQA/MQA, where the split one walking q blocks downwards wins;
  256-key forward blocks for head_dim 64; named-barrier turns for head_dim 128; a persistent
  forward when not causal (causal tiles differ in length; the static split measured -27% to +8% there)."""
  fused = not (causal and group > 1)
  return Config(backward="fused" if fused else "split",
                block_kv=256 if head_dim == 64 and kv_len % 256 == 0 else BLOCK_KV,
                named_barriers=head_dim == 128, persistent=not causal, q_descending=not fused)


def _check_config(config: Config, q, k):
  if config.backward not in ("split", "fused"):
    raise ValueError(f"config.backward must be 'split' or 'fused', got {config.backward!r}")
  allowed = (128, 256) if q.shape[-1] == 64 else (128,)
  if config.block_kv not in allowed or k.shape[1] % config.block_kv:
    raise ValueError(f"config.block_kv must be one of {allowed} for head_dim {q.shape[-1]} and divide "
                     f"S={k.shape[1]}, got {config.block_kv}")


def flash_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale=None, config=None):
  """Same contract as `api.flash_attention`; Hopper GPU only. config: a `Config`, None for the default."""
  reference.check_inputs(q, k, v, segment_ids)
  if (why := check_supported(q, k, v, segment_ids)) is not None:
    raise ValueError(f"{why}; use implementation='xla'")
  t = q.shape[1]
  multiple = SEQ_MULTIPLE if config is None else math.lcm(SEQ_MULTIPLE, config.block_kv)
  q, k, v, segment_ids = padding.pad(q, k, v, segment_ids, causal, multiple)
  if config is None:
    config = default_config(q.shape[-1], k.shape[1], causal, q.shape[2] // k.shape[2])
  _check_config(config, q, k)
  scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  return _attention(q, k, v, seg, causal, scale, config)[:, :t]
