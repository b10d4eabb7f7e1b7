"""matvec: opts for decode matvecs whose weight is a GGML dequant chain (or a plain fp16/bf16/fp32 matrix).

Stock tinygrad's matvec heuristic fires only on MUL(INDEX, INDEX); a fused dequant on the weight side defeats it, so a
Q4_0 GEMV gets GROUPTOP(16) through shared memory and a MoE expert matmul no reduce split at all (18-1150 us on an H200
where hand-written kernels take 6-11 us). This heuristic recognizes, with a PatternMatcher,
  REDUCE(ADD, MUL(weight, activation)) (a cast allowed around the MUL),
where the weight side reads GGUF bytes (a uint8 buffer) or is itself a float matrix and the activation (a buffer, or an
expression such as a fused RMSNorm) reads no GGUF bytes and no output axis (a GEMV, or MoE mul_mat_id with the expert id inside the weight address). It then
  - unrolls the reduce axes inside a quant block (a fused dequant splits the reduce into block, and element within the
    block: Q4_0 is 32 = 2 nibble halves x 16 bytes), so each lane reads a whole block;
  - spreads the blocks over REDUCE_LOCAL lanes (adjacent lanes read adjacent blocks);
  - puts several rows in a thread block (LOCAL), and two rows per lane (UPCAST) on large matrices.
Kernels it does not recognize, or where an opt is illegal, are left to tinygrad's heuristic. The choices per backend are
POLICIES below; LOG.md has the measurements behind them. A second heuristic (choose_stage_opts) takes the dequant of a
staged weight, written out whole for a prefill chunk's tensor cores: one thread a 32-element block.

Hook: an OptHeuristic (tinygrad.codegen.apply_opts, before hand_coded_optimizations).
"""
from __future__ import annotations
from dataclasses import dataclass, fields, replace
from tinygrad.uop.ops import UOp, Ops, AxisType, PatternMatcher, UPat
from tinygrad.dtype import dtypes
from tinygrad.helpers import prod
from tinygrad.renderer import Renderer
from tinygrad.renderer.cstyle import CUDARenderer, MetalRenderer
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad_ext import Pass, OptHeuristic, register
from tinygrad_ext.config import text_setting
from tinygrad_ext.errors import SettingError
from tinygrad_ext.passes.reduce_local import OptOpsExt, LANE_ID, share_lanes, unroll_whole
from tinygrad_ext.passes.shared import BYTE_DTYPES, store_targets

@dataclass(frozen=True)
class MatvecPolicy:
  lanes: int              # REDUCE_LOCAL amount: the largest power of two up to this that divides the blocks
  rows_per_block: int     # LOCAL on the output axis
  upcast_rows: int        # UPCAST on the output axis (rows per lane) for matrices of at least upcast_min_elements
  upcast_min_elements: int
  quant_upcast_min_elements: int  # the same threshold for quantized weights (a dequant chain)
  float_unroll: int       # elements per lane per step for plain float weights (8 halves = one 16-byte load)
  # lanes sharing one quant block, each reading a contiguous run of its bytes (twice this where the blocks would not fill
  # all the lanes otherwise), for matrices with at least as many rows as inputs (1: a whole block per lane)
  lanes_per_block: int = 1
  # the same where the matrix has fewer rows than inputs and its rows are split over warps (reduce_warps below; 1: a whole
  # block per lane there): the warps make up for the longer walk of each lane
  lanes_per_block_wide: int = 1
  # more rows per lane on the largest matrices (an output head), where the row parallelism is plenty
  wide_upcast_rows: int = 0
  wide_upcast_min_elements: int = 0
  # warps sharing one row's reduce (GROUP on what is left of the block axis after the lanes; the warps combine through
  # shared memory): the smallest amount from 2 up to this that divides those blocks, on quantized matrices of fewer than
  # reduce_warps_max_elements weights (0: any size). A small matrix fills few warps, each walking many blocks
  reduce_warps: int = 1
  reduce_warps_max_elements: int = 0
  # blocks per lane per loop step (UNROLL of what is left of the block axis after the lanes): more loads in flight, on
  # matrices of at least block_unroll_min_elements weights (0: any size)
  block_unroll: int = 1
  block_unroll_min_elements: int = 0
  # the whole block loop unrolled where at most this many steps are left to it, on a matvec whose rows are split over
  # warps (each warp walks few blocks); 0: never
  short_loop_unroll: int = 0
  # rows per lane where the activation costs a transcendental per element (a MoE down matvec reading silu(gate) * up),
  # on matrices of at least costly_act_min_elements: each lane computes it once for all its rows, so more rows per lane
  # divide that work (smaller matrices lose more to fewer threads than they save)
  costly_act_upcast_rows: int = 0
  costly_act_min_elements: int = 0
  # rows per lane where the activation is read as 4-byte floats (a MoE block's float32 norm, which the router reads too),
  # on matrices of at least wide_act_min_elements: each lane's activation loads then serve more rows
  wide_act_upcast_rows: int = 0
  wide_act_min_elements: int = 0
  # tall dense matrices (rows >= inputs, no expert axis, from tall_min_elements weights up to wide_upcast_min_elements):
  # tall_upcast_rows rows a lane, their blocks split over tall_reduce_warps warps, a thread block per lane's rows. More
  # rows a lane share each activation's conversion and sum; the warps keep as many in flight as 2 rows a lane had
  tall_upcast_rows: int = 0
  tall_reduce_warps: int = 1
  tall_min_elements: int = 0
  # fewer rows per block (down to 1) while the blocks would number fewer than this (a 64-row router: 16 blocks of 4 rows)
  min_row_blocks: int = 0
  # more rows per block (LOCAL) until a block has at least this many threads: a short reduce (attn_k_b's 192 inputs, 6
  # Q4_0 blocks) fills only 4 lanes a row, and 4 rows of those left every warp half empty
  min_block_threads: int = 0
  # where a row's blocks do not fill the lanes (a K-quant row of 2-3 super-blocks), the lanes also take the axes inside a
  # block along which each lane reads other bytes (a super-block's 32-byte groups), and the block's bytes go a 32-bit word
  # a lane: up to `lanes` lanes a row however few its blocks (0: off)
  spread_in_block: int = 0
  # bytes of a block a lane reads at once where spread_in_block fires (4: a 32-bit word; 8: half the lanes on a block's
  # bytes, the other half on the next block, half the loop steps)
  spread_word_bytes: int = 4

POLICIES = {
  # H200 (benchmarks/results/h200-2026-11-22-q4-reduce-local-variants.txt): 32 lanes and 4 rows per block were best or
  # within 3% on every GLM row; 2 rows per lane won from 6.3M elements (shexp gate+up 6.1 -> 5.4 us, ffn up 16.2 -> 11.8,
  # output head 214 -> 139, MoE gate+up 21.2 -> 15.9) and lost below 4M (attn_q_b 4.3 -> 5.0, shexp down 4.4 -> 5.0)
  # 2 lanes per block (h200-2026-11-23-kernels-lanes-per-block.txt): ffn up 9.9 -> 7.0 us, output head 113 -> 74,
  # MoE gate+up 14.2 -> 12.0, MoE down 8.4 -> 7.1, shexp down 3.9 -> 3.1; 4 lanes where 2 leave lanes idle (attn_q_b,
  # 24 blocks a row: 3.6 -> 2.6); it lost where rows < inputs (attn_output 6.2 -> 7.8, attn_q_a 2.9 -> 3.3)
  # 4 rows per lane (same file, last row): output head 74.3 -> 68.7 us, but ffn up 7.0 -> 9.2, so only from 64M elements
  # In the model (examples/glm/results/h200-2026-11-23-full-q4_0-upcast-all.txt, each kernel timed in a CUDA graph), 2 rows per
  # lane at every size won on every quantized matvec, whose activation is often a fused RMSNorm that each row would
  # recompute (shexp gate/up 6.6 -> 6.0 us, attn_q_a 4.8 -> 4.6, attn_q_b 4.0 -> 3.5, attn_k_b 3.4 -> 2.9, attn_v_b 2.5 ->
  # 2.1), and lost on the float32 router (2.8 -> 3.7): the size threshold stays for float weights only
  # the float32 router (64 rows) in 64 blocks of one row, not 16 of four (h200-2026-11-23-full-q4_0-min-row-blocks.txt,
  # in the model): 2.3 -> 1.7 us
  # 4 rows per lane where the activation is silu(gate) * up (examples/glm/results/h200-2026-11-23-full-q4_0-costly-act.txt,
  # in the model): MoE down 9.4 -> 7.3 us, dense ffn down 19.2 -> 17.8, but the shared expert's down (3.1M elements)
  # 4.1 -> 5.4, so from 8M elements
  # a row's blocks over up to 8 warps below 11M elements (benchmarks/results/h200-2026-12-02-kernels-reduce-warps.txt, the
  # fixed kernels: attn_q_a 3.7 -> 2.5 us, attn_q_b 3.0 -> 2.5, attn_output 6.1 -> 5.5, shexp gate+up 4.0 -> 3.5, shexp
  # down 3.1 -> 2.5; from 11.8M it lost: ffn up 7.0 -> 8.0, MoE gate+up 8.6 -> 9.4); in the model it lost where the
  # matvec has company in its kernel (examples/glm/results/h200-2026-12-02-full-q4_0-reduce-warps-ab.txt: q_b with the
  # q_a norm's sum of squares 3.38 -> 4.54 us, attn_output with the MoE output's epilogue 5.96 -> 6.52), so only a
  # matvec alone in its kernel gets it (attn_k_b 2.63 -> 2.30, attn_q_a+kv_a 3.49 -> 3.34)
  # 2 blocks a loop step on the output head only (benchmarks/results/h200-2026-12-02d-kernels-block-unroll-upcast.txt:
  # 58.4 -> 56.3 us; ffn up 6.6 -> 6.9, MoE gate+up 8.3 -> 8.4, so from 64M elements; in the model on 2026-11-23 the head
  # went 68.2 -> 64.0 with it)
  # where rows < inputs and warps split the rows, blocks split in two over lanes (a whole block a lane before), and the
  # steps left to each warp unrolled whole (benchmarks/results/h200-2026-12-02e-kernels.txt, one run: attn_output 5.4 ->
  # 4.6 us, attn_q_a 2.3 -> 2.1, shexp gate+up 3.4 -> 3.2; the split alone: attn_output 5.0, the -sweep-attn file); in the
  # model (examples/glm/results/h200-2026-12-02e-full-q4_0-policy-ab.txt) q_a+kv_a 3.02 -> 2.54 us a call. Unrolling
  # the short loops of MoE matvecs too (no warps) won alone (MoE gate+up 8.3 -> 7.9) and lost in the model (8.95 ->
  # 10.78, down 6.78 -> 7.49), so only where warps split the rows
  # tall dense matrices from 11M weights: 4 rows a lane over 2 warps, a thread block each
  # (benchmarks/results/h200-2026-12-03-kernels.txt, with subnormal_dequant: ffn up 6.3 -> 6.0 us; the same policy on
  # every row lost on the small ones and the head, and MoE gate+up tied: 7.6 / 7.6)
  # 4 rows a lane where the activation is a float32 row, from 8M elements (H100, in the model, one process: decode 369.6 ->
  # 392.6 tok/s, the same logits; benchmarks/results/h100-2026-12-07d-wideact.json): MoE gate+up, attn_output, dense down
  # a spread K-quant super-block 8 bytes a lane where the lanes stay full (H100, the Q4_K_M mix in the model, one machine:
  # 316.0 -> 327.4 tok/s, the same tokens, attn_v_b 3.3 -> 2.2 us a call; alone MoE down Q4_K 9.6 -> 7.9, shexp down
  # 3.1 -> 2.7; benchmarks/results/h100-2026-12-08-q4km-decode-w8.json, benchmarks/results/h100-2026-12-08-kq-sweep.json).
  # Lifting the 11M bound on warps for wide matrices won alone (dense ffn down Q6_K 22.6 -> 15.6) and lost in the model,
  # whose down reads silu(gate) * up (34.7 -> 172.8 us; benchmarks/results/h100-2026-12-08-q4km-decode-wide.json)
  "CUDA": MatvecPolicy(lanes=32, rows_per_block=4, upcast_rows=2, upcast_min_elements=5 << 20, quant_upcast_min_elements=0,
                       float_unroll=8, lanes_per_block=2, wide_upcast_rows=4, wide_upcast_min_elements=64 << 20,
                       costly_act_upcast_rows=4, costly_act_min_elements=8 << 20, min_row_blocks=64, min_block_threads=32,
                       reduce_warps=8, reduce_warps_max_elements=11 << 20, block_unroll=2, block_unroll_min_elements=64 << 20,
                       lanes_per_block_wide=2, short_loop_unroll=8, tall_upcast_rows=4, tall_reduce_warps=2, tall_min_elements=11 << 20,
                       spread_in_block=1, spread_word_bytes=8, wide_act_upcast_rows=4, wide_act_min_elements=8 << 20),
  # a simdgroup is 32 wide; not measured (no Apple hardware here), so no row upcast until it is
  "METAL": MatvecPolicy(lanes=32, rows_per_block=4, upcast_rows=1, upcast_min_elements=0, quant_upcast_min_elements=0, float_unroll=8,
                        spread_in_block=1),
  "generic": MatvecPolicy(lanes=16, rows_per_block=4, upcast_rows=1, upcast_min_elements=0, quant_upcast_min_elements=0, float_unroll=4,
                          spread_in_block=1),
}
# "field=value,...": overrides fields of the backend's policy, for A/B runs of the table (part of the cache id)
def parse_override(spec:str) -> dict[str, int]:
  names, out = {f.name for f in fields(MatvecPolicy)}, {}
  for item in filter(None, spec.split(",")):
    key, _, val = item.partition("=")
    if key not in names or not val.isdigit():
      raise SettingError(f"TINYGRAD_EXT_MATVEC_POLICY={spec!r}: bad item {item!r}, not FIELD=INTEGER,... (fields: {', '.join(sorted(names))})")
    out[key] = int(val)
  return out
POLICY_OVERRIDE = text_setting("TINYGRAD_EXT_MATVEC_POLICY", parse_override)

def policy_for(ren:Renderer) -> MatvecPolicy:
  """The table's row for what the renderer emits (CUDA C on a CUDA or NULL device alike), with the override applied."""
  kind = "CUDA" if isinstance(ren, CUDARenderer) else "METAL" if isinstance(ren, MetalRenderer) else ren.target.device.split(":")[0]
  return replace(POLICIES.get(kind, POLICIES["generic"]), **parse_override(POLICY_OVERRIDE.value))

@dataclass(frozen=True)
class Matvec:
  weight: UOp
  activation: UOp
  act_ranges: frozenset  # the ranges the activation varies with element by element (not those it reads per block of rows)

def per_block_of_rows(act:UOp, rng:UOp) -> bool:
  """act reads rng only as rng // c (c > 1): one activation for each run of c rows. A batch of matvecs, one per attention
  head (MLA's attn_v_b), whose head and row axes tinygrad merged into one output axis."""
  users = [u for u in act.toposort() if rng in u.src]
  return bool(users) and all(u.op in (Ops.FLOORDIV, Ops.CDIV) and u.src[0] is rng and u.src[1].op is Ops.CONST and u.src[1].arg > 1 for u in users)

def classify(r:UOp, w:UOp, act:UOp) -> Matvec|None:
  # The activation reads a strict subset of the weight's ranges: no output row axis. That is what makes it a matvec
  # (with several tokens the activation reads a token axis the weight does not: a GEMM, left to tinygrad), and it tells
  # the two operands apart. Either side may be an expression: a dequant chain over GGUF bytes, a bitcast F32 weight,
  # a norm fused into the activation, an activation that is itself a dequantized embedding row.
  if r.arg[0] is not Ops.ADD or not dtypes.is_float(w.dtype) or not dtypes.is_float(act.dtype): return None
  if not any(u.op is Ops.INDEX for u in act.toposort()): return None  # a vector read from memory, not a constant
  if not set(act.ranges) <= set(w.ranges): return None
  reduced = set(r.src[1:])
  reads = frozenset(x for x in act.ranges if x in reduced or not per_block_of_rows(act, x))
  return Matvec(w, act, reads) if reads < set(w.ranges) else None

# REDUCE(ADD, MUL(weight, activation)), the MUL possibly cast
pm_matvec = PatternMatcher([
  (UPat(Ops.REDUCE, src=(UPat(Ops.MUL, src=[UPat(name="w"), UPat(name="act")]).or_casted(),), allow_any_len=True, name="r"), classify),
])

def _pow2_divisor(n:int, most:int) -> int:
  return next((a for a in (256, 128, 64, 32, 16, 8, 4, 2) if a <= most and n % a == 0), 1)

def lanes_per_block(pol:MatvecPolicy, blocks:int, block_bytes:int, rows:int, inputs:int, warps_split_rows:bool) -> int:
  if (split:=pol.lanes_per_block if rows >= inputs else pol.lanes_per_block_wide if warps_split_rows else 1) == 1: return 1
  # each lane reads at least one 2-byte word of the block; where warps split the rows, up to 4x the split (a K-quant's
  # 32-byte groups over 8 lanes, its super-blocks over the rest and the warps, no spread in the block below)
  fits = [n for n in (split, 2 * split, *((4 * split,) if rows < inputs else ())) if block_bytes % n == 0 and block_bytes >= 2 * n]
  # the smallest split whose blocks fill every lane, else the smallest legal one
  return next((n for n in fits if _pow2_divisor(blocks, pol.lanes // n) * n == pol.lanes), fits[0] if fits else 1)

def distinct_byte_axes(k, weight:UOp, red:list[int]) -> list[int]:
  """The axes inside a quant block (red[1:-1]) along which every load of the weight that reads the block's bytes (the
  last axis) reads other bytes: a K-quant super-block's 32-byte groups, not a nibble half (the same bytes again)."""
  last = k.rngs[red[-1]]
  reads = [set(u.src[1].ranges) for u in weight.toposort()
           if u.op is Ops.INDEX and getattr(u.dtype, "base", u.dtype) in BYTE_DTYPES and last in u.src[1].ranges]
  return [i for i in red[1:-1] if reads and all(k.rngs[i] in r for r in reads)]

def spread_in_block(k, weight:UOp, red:list[int], lanes:int, word_bytes:int=4) -> tuple[list[int], int]:
  """(in-block axes over lanes, lanes on the block's bytes) for a row whose blocks do not fill its lanes: the bytes
  word_bytes a lane, the distinct-byte axes inside the block over the rest, innermost first, as many as fit."""
  axes, width = [], 1
  for i in reversed(distinct_byte_axes(k, weight, red)):
    if width * k.full_shape[i] > lanes: break
    axes.insert(0, i)
    width *= k.full_shape[i]
  block_bytes = k.full_shape[red[-1]]
  byte_lanes = max((n for n in (1, 2, 4, 8, 16, 32) if block_bytes % n == 0 and block_bytes // n >= word_bytes and n * width <= lanes), default=1)
  return axes, byte_lanes

def warps_may_split_rows(pol:MatvecPolicy, weight_elements:int) -> bool:
  return pol.reduce_warps > 1 and not (pol.reduce_warps_max_elements and weight_elements >= pol.reduce_warps_max_elements)

def reduce_warps(pol:MatvecPolicy, lane_steps:int) -> int:
  return next((d for d in range(2, pol.reduce_warps + 1) if lane_steps % d == 0), 1)

# a reduce this small beside the matvec in its kernel (GLM's MoE output: the sum over the selected experts' rows, added
# to the shared expert's down matvec) is unrolled, each lane computing it whole
SIDE_REDUCE_MAX = 16

def reduce_size(r:UOp) -> int|None:
  sizes = [x.vmax+1 if x.op is Ops.RANGE and isinstance(x.vmax, int) else None for x in r.src[1:]]
  return None if None in sizes else prod(sizes)

# a row reduce inside the activation (a short RMSNorm's sum of squares that fusion recomputes in the matvec: SHORT_ROW in
# fusion.py) goes over the matvec's own lanes: each lane sums its share, the lanes combine, every lane has the row's scale
ROW_REDUCE_MAX = 1024

def matvec_and_side_reduces(reds:list[UOp]) -> tuple[Matvec, list[UOp], list[UOp]]|None:
  """The kernel's matvec (its largest matching reduce), the small reduces beside it (not nested in it or it in them) and
  the row reduces inside its activation."""
  matches = [(r, m, size) for r in reds if (m:=pm_matvec.rewrite(r)) is not None and (size:=reduce_size(r)) is not None]
  if not matches: return None
  main, m, size = max(matches, key=lambda x: x[2])
  side, rows = [], []
  for r in [r for r in reds if r is not main]:
    if (n:=reduce_size(r)) is None or set(r.src[1:]) & set(main.src[1:]) or main in r.backward_slice: return None
    if r in m.activation.backward_slice and r.arg[0] is Ops.ADD and dtypes.is_float(r.dtype) and n <= ROW_REDUCE_MAX and \
       len(r.src) == 2 and not any(x.op is Ops.REDUCE for x in r.src[0].backward_slice): rows.append(r)
    elif n <= SIDE_REDUCE_MAX and n < size and r not in main.backward_slice: side.append(r)
    else: return None
  return m, side, rows

def spread_rows_over_lanes(k, row_reduces:list[UOp]) -> bool:
  """Each row reduce's range goes over the lane range REDUCE_LOCAL made (lane innermost, as fusion's row kernels)."""
  lane = next((r for r in k.rngs if r.arg[0] == LANE_ID), None)
  if lane is None or lane.arg[-1] is not AxisType.GROUP_REDUCE: return False
  for key in [x.arg[:-1] for red in row_reduces for x in red.src[1:]]:
    if (rng:=next((x for x in k.rngs if x.arg[:-1] == key), None)) is None or not share_lanes(k, rng, lane, pad=False): return False
  return True

TRANSCENDENTAL = (Ops.EXP2, Ops.LOG2, Ops.SIN, Ops.SQRT, Ops.RECIPROCAL)

def costly_per_element(act:UOp, reduce_ranges:set[UOp]) -> bool:
  """The activation evaluates a transcendental for every element it reduces over (silu), not once per row (a norm's rsqrt)."""
  return any(u.op in TRANSCENDENTAL and set(u.ranges) & reduce_ranges for u in act.toposort())

def wide_per_element(act:UOp, reduce_ranges:set[UOp]) -> bool:
  """The activation loads a float of 4 bytes or more for every element it reduces over (a float32 row)."""
  return any(u.op is Ops.INDEX and dtypes.is_float(b:=getattr(u.dtype, "base", u.dtype)) and b.itemsize >= 4 and set(u.ranges) & reduce_ranges
             for u in act.toposort())

def choose_matvec_opts(k):
  if (found:=matvec_and_side_reduces(k.reduceops)) is None: return None
  m, side, row_reduces = found
  row_keys = {x.arg[:-1] for r in row_reduces for x in r.src[1:]}
  # the matvec's reduce axes (indices into k.rngs): the row reduces' are spread over the lanes last, separately
  def main_red() -> list[int]: return [i for i in k.axes_of(AxisType.REDUCE) if k.rngs[i].arg[:-1] not in row_keys]
  def unroll(i:int, amt:int): k.apply_opt(Opt(OptOps.UNROLL, k.unrollable_dims.index(i), amt))
  def reduce_local(i:int, amt:int): k.apply_opt(Opt(OptOpsExt.REDUCE_LOCAL, k.axes_of(AxisType.REDUCE).index(i), amt))
  # out of the reduce axes: what follows counts the matvec's axes only (a range two side reduces share, the experts'
  # weights and their sum, is unrolled once)
  unroll_whole(k, side)
  act_ranges, w_ranges = m.act_ranges, set(m.weight.ranges)
  # the weight's rows: global axes the activation does not read (MoE: the expert slot axis is read by both)
  outs = [i for i in k.axes_of(AxisType.GLOBAL) if k.rngs[i] in w_ranges and k.rngs[i] not in act_ranges]
  if not outs or any(not isinstance(s, int) for s in k.full_shape): return None
  out = max(outs, key=lambda i: k.full_shape[i])
  pol, red = policy_for(k.ren), main_red()
  if not red: return None  # reduce axes of size 1 are no opt axes: nothing to spread over lanes
  costly = costly_per_element(m.activation, {k.rngs[i] for i in red})  # before the opts below split those ranges
  wide_act = wide_per_element(m.activation, {k.rngs[i] for i in red})
  inputs, rows = prod(k.full_shape[i] for i in red), k.full_shape[out]
  weight_elements = prod(k.full_shape[i] for i in k.axes_of(AxisType.GLOBAL)) * inputs
  block_lanes, spread, spread_width = 1, [], 1
  # a row's blocks may go over warps where the matvec is alone in its kernel (each warp would repeat a row reduce of the
  # activation, and load a side reduce's operands: the epilogue)
  dense = sum(k.full_shape[i] > 1 for i in outs) == 1  # one output axis: no expert slots (MoE) or batch beside the rows
  tall = pol.tall_upcast_rows > 1 and len(red) >= 2 and not side and not row_reduces and dense and rows >= inputs and \
         pol.tall_min_elements <= weight_elements < (pol.wide_upcast_min_elements or weight_elements + 1)
  warps_split = tall or (len(red) >= 2 and not side and not row_reduces and warps_may_split_rows(pol, weight_elements))
  if len(red) >= 2:
    # a dequant chain splits the reduce: the axes after the first are inside a quant block. They are unrolled, but for
    # the last (the block's contiguous bytes), which is split over lanes_per_block lanes, each reading a contiguous run
    block_lanes = lanes_per_block(pol, blocks=k.full_shape[red[0]], block_bytes=k.full_shape[red[-1]], rows=weight_elements // inputs,
                                  inputs=inputs, warps_split_rows=warps_split)
    # (not where warps split a wide matrix's rows: they walk its blocks instead. H100, attn_output Q4_K 2048x5120 alone:
    # 11.3 us spread, 5.5 with 8 lanes a 32-byte group and 5 warps; benchmarks/results/h100-2026-12-07d-batch.txt)
    if pol.spread_in_block and not (warps_split and weight_elements // inputs < inputs) and \
       _pow2_divisor(k.full_shape[red[0]], pol.lanes // block_lanes) * block_lanes < pol.lanes:
      # spread_word_bytes a lane where those lanes and the row's blocks still fill the lanes, else a 32-bit word
      for word in (pol.spread_word_bytes, 4):
        spread, bytes_lanes = spread_in_block(k, m.weight, red, pol.lanes, word)
        width = bytes_lanes * prod(k.full_shape[i] for i in spread)
        if _pow2_divisor(k.full_shape[red[0]], pol.lanes // width) * width == pol.lanes: break
      if spread: block_lanes, spread_width = bytes_lanes, prod(k.full_shape[i] for i in spread)
    for i in reversed(range(1, len(red))):
      if red[i] in spread: continue  # goes over lanes whole, below
      if (amt:=k.full_shape[red[i]] // (block_lanes if i == len(red) - 1 else 1)) > 1: unroll(main_red()[i], amt)
  elif k.full_shape[red[0]] % (pol.float_unroll * 2) == 0:
    unroll(red[0], pol.float_unroll)
  bytes_lanes, block_lanes = block_lanes, block_lanes * spread_width  # lanes on the block's bytes; lanes a block
  if (lanes:=_pow2_divisor(k.full_shape[main_red()[0]], pol.lanes // block_lanes)) * block_lanes < 4: return None
  # the block's lanes first: they are the fastest, adjacent lanes read adjacent bytes of a block (its bytes, then its
  # distinct-byte axes, innermost first), then adjacent blocks
  for _ in range((bytes_lanes > 1) + len(spread)): reduce_local(main_red()[-1], k.full_shape[main_red()[-1]])
  if lanes > 1: reduce_local(main_red()[0], lanes)
  if row_reduces and not spread_rows_over_lanes(k, row_reduces): return None
  # what is left of the block axis: loop steps of each lane, split over warps where the matvec is alone in its kernel
  warps = 1
  if warps_split and (left:=main_red()) and \
     (warps:=reduce_warps(replace(pol, reduce_warps=pol.tall_reduce_warps) if tall else pol, k.full_shape[left[0]])) > 1:
    k.apply_opt(Opt(OptOps.GROUP, k.axes_of(AxisType.REDUCE).index(left[0]), warps))
  if warps > 1 and (left:=main_red()) and 1 < (steps:=k.full_shape[left[0]]) <= pol.short_loop_unroll:
    unroll(left[0], steps)
  elif pol.block_unroll > 1 and weight_elements >= pol.block_unroll_min_elements and (left:=main_red()) and \
     (amt:=max(d for d in range(1, pol.block_unroll+1) if k.full_shape[left[0]] % d == 0)) > 1:
    unroll(left[0], amt)
  upcast = pol.wide_upcast_rows if pol.wide_upcast_rows > 1 and weight_elements >= pol.wide_upcast_min_elements else pol.upcast_rows
  if pol.costly_act_upcast_rows > upcast and costly and weight_elements >= pol.costly_act_min_elements: upcast = pol.costly_act_upcast_rows
  if pol.wide_act_upcast_rows > upcast and wide_act and weight_elements >= pol.wide_act_min_elements: upcast = pol.wide_act_upcast_rows
  if tall: upcast = pol.tall_upcast_rows
  min_elements = pol.quant_upcast_min_elements if len(red) >= 2 else pol.upcast_min_elements
  if upcast > 1 and weight_elements >= min_elements and rows % (upcast * pol.rows_per_block) == 0:
    k.apply_opt(Opt(OptOps.UPCAST, out, upcast))
  rows_per_block, blocks = 1 if tall else pol.rows_per_block, prod(k.full_shape[i] for i in k.axes_of(AxisType.GLOBAL))
  while rows_per_block > 1 and blocks // rows_per_block < pol.min_row_blocks: rows_per_block //= 2
  while lanes * block_lanes * rows_per_block < pol.min_block_threads and k.full_shape[out] % (2 * rows_per_block) == 0 and \
        blocks // (2 * rows_per_block) >= pol.min_row_blocks: rows_per_block *= 2
  if rows_per_block > 1 and k.full_shape[out] % rows_per_block == 0: k.apply_opt(Opt(OptOps.LOCAL, out, rows_per_block))
  return k

# *** a staged weight: the dequant alone, written out (a prefill chunk's weights in fp16 for the tensor cores) ***

STAGE_BLOCK = 32   # elements of a block's innermost axes (a Q4_0/Q8_0 block, a K-quant's sub-block: every GGUF row a multiple)
STAGE_VECTOR = 4   # halves a thread stores at once: one half4, side by side with its neighbours' (whole 32-byte sectors)
SECTOR_HALVES = 16          # a 32-byte sector of fp16
STAGE_THREAD_ELEMENTS = 16  # at most, where a block's next axes out are small (a K-quant's sub-blocks)
STAGE_THREADS = 128

def choose_stage_opts(k):
  """An elementwise kernel that reads GGUF bytes and writes floats: each thread dequantizes STAGE_VECTOR adjacent
  elements of a block's innermost axis (its bytes loaded packed, one vector store) for each position on the block's
  other axes, adjacent threads the next ones: every warp-wide store writes whole 32-byte sectors. tinygrad's heuristic
  gives a thread 2 elements (2-byte stores, the block's scale reloaded by 16 threads: 1.09 TB/s for a prefill chunk's
  expert weights on the H100); a whole 32-element block a thread, half4 stores 64 bytes apart, measured slower (0.86)."""
  if k.reduceops or not k.ren.has_local or k.dont_use_locals: return None
  stores = store_targets(k.ast)
  def elem(b:UOp): return getattr(b.dtype, "base", b.dtype)
  if not stores or not all(dtypes.is_float(elem(b)) for b in stores) or not any(elem(b) in BYTE_DTYPES for b in k.bufs if b not in stores):
    return None
  # the output axes inside a block: the innermost, STAGE_BLOCK elements at most (tinygrad's range split leaves a Q4_0
  # row as blocks x 2 nibbles x 16 bytes, a K-quant's as super-blocks x ... x 32)
  outs, inner, per = k.axes_of(AxisType.GLOBAL), [], 1
  for i in reversed(outs):
    if not isinstance(size:=k.full_shape[i], int) or per * size > STAGE_BLOCK: break
    inner.append(i)
    per *= size
  if per < STAGE_BLOCK or len(inner) == len(outs) or k.full_shape[inner[0]] % STAGE_VECTOR: return None
  # a vector of the innermost axis a thread; the block's other axes whole in each thread too (a nibble's shift stays a
  # constant: over threads it would be a division by a selected power of 16), but where the innermost axis is shorter
  # than a sector (Q5_0's 8) the next one goes over threads as well, so that adjacent threads fill whole sectors
  side_by_side, elements = k.full_shape[inner[0]], STAGE_VECTOR
  k.apply_opt(Opt(OptOps.UPCAST, inner[0], STAGE_VECTOR))
  for i in inner[1:]:  # each whole, at most 16 a step (tinygrad's limit; a whole axis keeps its index, retyped)
    if side_by_side < SECTOR_HALVES:
      side_by_side *= k.full_shape[i]
      continue
    if k.full_shape[i] > 16: k.apply_opt(Opt(OptOps.UPCAST, i, 16))
    k.apply_opt(Opt(OptOps.UPCAST, i, k.full_shape[i]))
    elements *= k.full_shape[i]
  # a K-quant's 32-element sub-blocks lie in 2 x 2 x 2 axes of its super-block: the next ones out whole in the thread
  # too, up to STAGE_THREAD_ELEMENTS, so that its threads reach past them to the super-blocks (with only 3 thread axes,
  # a block was 32 threads of 4 elements each: 273 GB/s staging a chunk's Q4_K experts on the H100)
  for i in reversed(outs[:len(outs) - len(inner)]):  # outward; retyping axis i leaves the indices below it
    if not isinstance(size:=k.full_shape[i], int) or elements * size > STAGE_THREAD_ELEMENTS: break
    k.apply_opt(Opt(OptOps.UPCAST, i, size))
    elements *= size
  # then the threads, innermost axis first: the rest of the innermost axis, then the next axes out, adjacent threads
  # writing adjacent vectors. At most 3 such axes: tinygrad folds more into threadIdx.x with the last one fastest, out
  # of order (hence a K-quant's sub-block axes in the thread above: its third thread axis is its super-blocks)
  threads, axes = 1, 0
  for i in reversed(k.axes_of(AxisType.GLOBAL)):
    if axes == 3 or not isinstance(size:=k.full_shape[i], int) or (t:=_pow2_divisor(size, STAGE_THREADS // threads)) == 1: break
    k.apply_opt(Opt(OptOps.LOCAL, i, t))
    threads, axes = threads * t, axes + 1
    if t < size: break  # the rest of this axis lies between its threads and the next axis's
  return k

MATVEC = register(Pass("matvec", "picks REDUCE_LOCAL/UNROLL/UPCAST/LOCAL for GEMV and MoE matvecs over GGML dequant chains, "
                       "and adjacent vectors over adjacent threads for a staged weight's dequant",
                       (OptHeuristic(choose_matvec_opts), OptHeuristic(choose_stage_opts)), settings=(POLICY_OVERRIDE,)))
