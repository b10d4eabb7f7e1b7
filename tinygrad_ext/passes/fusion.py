"""fusion: a row's reduces (RMSNorm's sum of squares, softmax's max and sum of exps) run inside the kernel that uses them.

Stock tinygrad gives a reduce whose result is broadcast back over the row it reduced a kernel (and a buffer) of its own:
RMSNorm is the sum-of-squares kernel and the normalize kernel, softmax the max kernel, the sum-of-exps kernel and the
divide kernel. Each extra kernel costs a launch and a round trip through memory.

Schedule step (after tinygrad.schedule.rangeify's "symbolic+reduce_collapse+debuf", where tinygrad has settled which
intermediates it recomputes in their consumers, so every buffer left is a kernel's output): the buffer of a row reduce
is removed, and its reduce inlined, when the consuming kernel is elementwise (no reduce of its own) and every inlined
reduce is broadcast over one of its axes (the row) and invariant to the reduces it sits in (softmax's max inside its
sum). A consumer that reduces itself (a matmul reading the normalized row) keeps the reduce's buffer: it would recompute
the row's reduce for every output it makes. A tiny buffer (at most TINY elements, its reduces at most TINY_REDUCE long:
MoE routing's gathered expert scores and their sum) is inlined into any consumer that reads it outside its long loops,
and a small one (SMALL) even inside the loops of a consumer small enough (SMALL_WORK: the MoE top-k's expert ranks inside
its one-hot selection); such a nested kernel gets one lane per element of its outer reduce (choose_nested_opts).
Then, in a second rewrite, an intermediate with only short reduces (GLM's MoE output: the residual plus the
experts' weighted rows) is recomputed in its consumers where every one of them reads each element once (per_element_stage).
Run any earlier and the inlined reduce would make an elementwise buffer that tinygrad is about to inline (a one-hot
gather's mask) look costly, so tinygrad keeps it, a kernel more.

Legality (DESIGN.md, "Legality"): an intermediate is recomputed in a consumer only where it reads no buffer the
schedule stores to (but through that store's AFTER), where the consumer indexes all its ranges, and where every kernel
that reads it would see the same bits: it has one reading kernel, or it is reproducible (integers, or floats through
single correctly rounded operations); only the latter while another schedule computes the same value (a tensor left
unrealized, registry.shared_values: SVD's S realized before V); and where it computes no narrow-int arithmetic that may wrap and no reduce in a
dtype its device emulates. A phase that would grow the schedule's arithmetic beyond MAX_WORK_GROWTH is not applied. The
rewrite runs in rounds until nothing more is inlined, counting readers afresh each round.

Codegen heuristic (before REDUCE_LOCAL's matvec heuristic and tinygrad's): in such a kernel the row axis stays an in-kernel
loop, one workgroup per row, and every reduce of the row and the row's elementwise outputs are spread over the same lanes
(lane-strided, REDUCE_LOCAL's lane range): the lanes combine each reduce (shuffles, then shared memory across warps), and
then each lane writes its own elements. A lane's few elements (static, at most UNROLL_REST) and the warps' few partials
are unrolled: the row is then loaded once for its reduces and its outputs, and what does not wait on the reduce (the
norm's weight) is loaded before the lanes combine, one memory round trip where there were three. A row whose length
the lanes do not divide (symbolic lengths: attention over the
positions so far) is padded, with the padding gated off every load and store and counted as the reduce's identity.
"""
from __future__ import annotations
import functools, itertools
from dataclasses import dataclass, field
from typing import Iterator
from tinygrad.uop.ops import UOp, Ops, GroupOp, AxisType, PatternMatcher, UPat, graph_rewrite
from tinygrad.dtype import AddrSpace, Invalid, dtypes
from tinygrad.helpers import prod, partition, EMULATED_DTYPES
from tinygrad.device import Device
from tinygrad.schedule.indexing import BufferizeOpts
from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
from tinygrad_ext import Pass, ScheduleStep, OptHeuristic, CodegenStep, register, is_active
from tinygrad_ext.config import flag
from tinygrad_ext.registry import shared_values
from tinygrad_ext.passes.reduce_local import LANE_ID, WARP_ID, SHUFFLE_WIDTH, COMBINES, ACC_DTYPES, LANE_DTYPES, OptOpsExt, share_lanes, unroll_whole
from tinygrad_ext.passes.shared import native, stored_buffers, pow2_at_most, out_of_range_consts
from tinygrad_ext.internals import output_ranges

NAME = "fusion"
MAX_ROW = 1 << 16        # longer rows keep tinygrad's schedule: one workgroup per row would leave the GPU idle
UNROLL_REST = 8          # a lane's part of a fused row up to this many elements is unrolled, not looped
UNROLL_PARTIALS = 8      # a grouped reduce's partials (one per warp) up to this many are combined unrolled, in any kernel
# A/B: 1 keeps an intermediate with only short reduces (the MoE output) a kernel of its own (per_element_stage below)
KEEP_PER_ELEMENT = flag("TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT")
MAX_LANES = 256          # lanes per row: 8 warps, each lane holds row/256 elements of a 2048-wide row
KERNEL_BOUNDARIES = (Ops.STAGE, Ops.STORE, Ops.AFTER)  # another kernel's buffer, or a store: not part of this kernel's value

# *** scheduler: inline a row reduce into its elementwise consumer ***

def in_kernel(u:UOp) -> bool: return u.op not in KERNEL_BOUNDARIES

def removable_reduces(s:UOp) -> list[UOp]|None:
  """The reduces of a realized intermediate that tinygrad may remove (None if s is no such buffer). Not one that
  accumulates in a dtype its device emulates (half on PoCL): recomputed in another kernel its reduce becomes a loop
  whose accumulator tinygrad's emulation cannot rewrite (the program fails verification)."""
  if s.op is not Ops.STAGE or s.arg.addrspace is not AddrSpace.GLOBAL or not s.arg.removable or s.src[0].op in (Ops.CONTIGUOUS, Ops.NOOP):
    return None
  reduces = [u for u in s.src[0].toposort(gate=in_kernel) if u.op is Ops.REDUCE]
  return reduces if all(native_on(s.arg.device, r.dtype) for r in reduces) else None

def native_on(device, dtype) -> bool: return _native_on(device, dtype, EMULATED_DTYPES.value)

@functools.cache  # per (device, dtype, emulation setting): looked up for every reduce of every intermediate, every round
def _native_on(device, dtype, emulated:str) -> bool:
  return all(isinstance(d, str) and native(Device[d].renderer, dtype) for d in (device if isinstance(device, tuple) else (device,)))

def row_reduce_stage(s:UOp) -> bool:
  """A realized intermediate that reduces, in a form the row heuristic spreads over lanes, and that tinygrad may remove."""
  if (reduces:=removable_reduces(s)) is None: return False
  # what the codegen heuristic spreads over lanes: one range per reduce, a float accumulator, ADD or MAX
  return bool(reduces) and all(r.arg[0] in COMBINES and r.dtype in ACC_DTYPES and len(r.src) == 2 and r.src[1].vmax < MAX_ROW for r in reduces)

def substitute_in_kernel(root:UOp, subs:dict[UOp, UOp]) -> UOp:
  """root.substitute(subs) that stops at kernel boundaries: UOp.substitute walks everything below root, every other
  kernel of the schedule included, which made scheduling a 512-token prefill several times slower per inlined reduce."""
  out: dict[UOp, UOp] = {}
  for u in root.toposort(gate=in_kernel):
    if u in subs: out[u] = subs[u]
    elif not in_kernel(u) or all(out.get(s, s) is s for s in u.src): out[u] = u
    else: out[u] = u.replace(src=tuple(out.get(s, s) for s in u.src))
  return out[root]

def inline_stage(idx:UOp) -> UOp:
  stage = idx.src[0]
  return substitute_in_kernel(stage.src[0], {k:v for k,v in zip(stage.src[1:], idx.src[1:]) if k.op is not Ops.CONST and k is not v})

def row_reduces_only(value:UOp, out_rngs:dict[UOp, None]) -> bool:
  """Every reduce in value is a row reduce of the consumer: it misses a consumer range (the row, which it is broadcast
  over) and depends on no reduce range (it is invariant to the reduces it sits in, so it runs once per row)."""
  for red in [u for u in value.toposort(gate=in_kernel) if u.op is Ops.REDUCE]:
    row = [r for r in out_rngs if r not in red.ranges]
    if not row or prod(r.vmax+1 for r in row) > MAX_ROW or any(r.arg[-1] is AxisType.REDUCE for r in red.ranges): return False
  return True

# a realized intermediate of at most TINY elements whose reduces are at most TINY_REDUCE long (MoE routing: the
# selected experts' scores, gathered by a one-hot reduce that codegen turns into a load, and their sum) is recomputed
# wherever it is read: a few loads and adds per thread instead of a kernel launch
TINY, TINY_REDUCE = 16, 64
# a normalized row this short (an RMSNorm's, GLM's 768-wide q_a norm) read by a matmul this small is recomputed in it, its
# sum of squares spread over the matvec's own lanes (matvec.py): a row kernel and its launch cost ~2.4 us on the H200, the
# recompute in q_b (3.9M elements) 0.9 us; it grows with the matmul (every lane re-reads x and the norm weight per row)
SHORT_ROW, SHORT_ROW_MATMUL = 1024, 8 << 20

def short_row_stage(s:UOp) -> bool:
  return row_reduce_stage(s) and len(reduces:=removable_reduces(s) or []) == 1 and reduces[0].arg[0] is Ops.ADD and \
    all(isinstance(r.vmax, int) for r in reduces[0].src[1:]) and ranges_size(reduces[0].src[1:]) <= SHORT_ROW

def ranges_size(srcs) -> int: return prod(r.vmax+1 for r in srcs if r.op is Ops.RANGE)

def short_reduce(red:UOp) -> bool: return ranges_size(red.src[1:]) <= TINY_REDUCE

def tiny_stage(s:UOp) -> bool:
  if (reduces:=removable_reduces(s)) is None: return False
  return ranges_size(s.src[1:]) <= TINY and all(short_reduce(red) for red in reduces) and not nested(reduces)

def nested(reduces:list[UOp]) -> bool:
  # a reduce inside another (a top-k whose ranks were recomputed in it, below) is a small kernel's work, not a few loads
  # and adds: recomputed again in its consumers it would cascade (a matmul that recomputed it lost its opts)
  return _nested(tuple(reduces))

# (asked again for every reader of an intermediate, every round; a backward slice walks the whole schedule: 8 of the
# 24 s fusion took to schedule GLM's full decode step on DEV=NULL)
@functools.lru_cache(maxsize=1 << 12)
def _nested(reduces:tuple[UOp, ...]) -> bool: return any(r in red.src[0].backward_slice for red in reduces for r in reduces)

# a small intermediate (at most SMALL elements, reduces at most TINY_REDUCE long) whose consumer is itself small (at most
# SMALL_WORK loop iterations with the intermediate recomputed in each: MoE routing's expert ranks, 64 pairwise counts,
# read by the top-k's 4 one-hot sums over the 64 experts, 16K) is recomputed inside the consumer's loops: one launch fewer
SMALL, SMALL_WORK = 64, 1 << 15

def small_stage(s:UOp) -> int|None:
  """The loop iterations of one recomputed element of a small intermediate, or None if it is not one."""
  if (reduces:=removable_reduces(s)) is None: return None
  if ranges_size(s.src[1:]) > SMALL or not all(short_reduce(red) for red in reduces) or nested(reduces): return None
  return max([ranges_size(red.src[1:]) for red in reduces], default=1)

def gather_stage(s:UOp) -> bool:
  """An intermediate whose every reduce is a one-hot sum (a gather by an index tensor: a MoE tile's expert weights,
  w[tile_expert], dequantized): codegen turns each into one load at the index, so recomputed where it is read it costs
  a load, where tinygrad realizes it whenever a consumer broadcasts it (a matmul of several rows: every gathered
  weight written to memory and read back)."""
  return bool(reduces:=removable_reduces(s)) and all(one_hot_sum(r) for r in reduces) and not nested(reduces)

# an intermediate whose reduces are all short (at most TINY_REDUCE: GLM's MoE output, each row the experts' rows weighted
# by their normalized scores, plus the residual) is recomputed in a consumer that reads each of its elements once (the
# next block's RMSNorm row, the residual in attn_output's epilogue), as an elementwise intermediate is: each element is
# computed where it is read instead of in a kernel of its own and a round trip through memory
def per_element_stage(s:UOp) -> bool:
  return (reduces:=removable_reduces(s)) is not None and bool(reduces) and all(short_reduce(red) for red in reduces)

def read_once(idx:UOp, value:UOp) -> bool:
  """The consumer reads each element of idx's buffer once: every range it iterates around the read (a reduce's own ranges
  and the ranges that reduce's value varies with, or the output ranges outside any reduce) is in the index."""
  around = [red for red in value.toposort(gate=in_kernel) if red.op is Ops.REDUCE and idx in red.src[0].toposort(gate=in_kernel)]
  enclosing = {r for red in around for r in (*red.src[1:], *red.ranges) if r.op is Ops.RANGE} if around else set(value.ranges)
  return enclosing <= set(UOp.sink(*idx.src[1:]).ranges)

def kernel_iterations(value:UOp, out_rngs:dict[UOp, None]) -> int:
  """How many times the innermost body of a kernel runs: its output ranges times every range its reduces loop over."""
  return ranges_size(out_rngs) * ranges_size({r for u in value.toposort(gate=in_kernel) if u.op is Ops.REDUCE for r in u.src[1:]})

def in_long_reduces(value:UOp) -> set[UOp]:
  """What the kernel computes inside reduces over more than TINY elements: per iteration of a long loop (a matmul's
  body, where a MoE matmul reads the selected expert ids)."""
  return {a for u in value.toposort(gate=in_kernel) if u.op is Ops.REDUCE and ranges_size(u.src[1:]) > TINY for a in u.src[0].toposort(gate=in_kernel)}

def reads_before_a_store(s:UOp, stored:set[UOp]) -> bool:
  """The intermediate reads a buffer that the schedule also stores to, as it was before that store (not through the
  store's AFTER). tinygrad orders that store after the intermediate's kernel; recomputed in another kernel, the read
  would be ordered after nothing and could see the stored values (an assign that reads its own target through a
  reduce, a factorization's iterations)."""
  return any(u.op is Ops.INDEX and u.src[0] in stored for u in s.src[0].toposort(gate=in_kernel))

# what a value may compute and still give the same bits in every kernel that computes it: loads, selections, compares,
# conversions, and single correctly rounded operations (an add of two values, a product, a max). What a compiler or a
# kernel's opts may round differently is left out: a product feeding a sum (contracted to a multiply-add or not), a sum
# reduce (its order), transcendentals (polynomials of multiply-adds)
REPRODUCIBLE = {Ops.INDEX, Ops.LOAD, Ops.CONST, Ops.RANGE, Ops.WHERE, Ops.CMPLT, Ops.CMPNE, Ops.CMPEQ, Ops.MAX, Ops.CAST, Ops.BITCAST,
                Ops.ADD, Ops.MUL, Ops.NEG, Ops.STAGE, Ops.PARAM, Ops.AFTER, Ops.NOOP}

def one_hot_sum(r:UOp) -> bool:
  """sum over i of (i != e ? 0 : x[i]) with e independent of i: one term at most is not zero, so any order gives x[e]
  (a gather written as a one-hot reduce: MoE routing's selected scores)."""
  if r.arg[0] is not Ops.ADD or len(r.src) != 2 or (w:=r.src[0]).op is not Ops.WHERE or w.src[0].op is not Ops.CMPNE: return False
  if not (w.src[1].op is Ops.CONST and w.src[1].arg == 0): return False
  rng = r.src[1]
  def is_rng(u:UOp) -> bool: return u is rng or (u.op is Ops.CAST and u.src[0] is rng)
  a, b = w.src[0].src
  return (is_rng(a) and rng not in b.toposort(gate=in_kernel)) or (is_rng(b) and rng not in a.toposort(gate=in_kernel))

def reproducible(s:UOp) -> bool:
  """Every kernel that recomputes the intermediate gets the same bits: it computes in integers and bools, or in floats
  with operations each rounded once and alone (a masked row's max, a one-hot pick)."""
  def float_ok(u:UOp) -> bool:
    if u.op is Ops.REDUCE: return u.arg[0] is Ops.MAX or one_hot_sum(u)
    if u.op is Ops.ADD and any(x.op is Ops.MUL and dtypes.is_float(x.dtype) for x in u.src): return False  # a multiply-add
    return u.op in REPRODUCIBLE
  return all(not dtypes.is_float(u.dtype) or float_ok(u) for u in s.src[0].toposort(gate=in_kernel))

# integer arithmetic that can wrap: tinygrad's C-style renderers compute a narrow int's ADD/MUL/SHL in C's int, and
# truncate it only where it is stored; recomputed in a consumer that widens it (a cumsum of int8 x - max(x)), the value
# no longer wraps as the stored one did
WRAPPING = (Ops.ADD, Ops.SUB, Ops.MUL, Ops.NEG, Ops.SHL)

def int_bounds(x:UOp) -> tuple[int, int]:
  # tinygrad's range analysis, but a bitcast of an unsigned value that the signed type holds is that value (a Q4_0
  # nibble's byte read as int8)
  if x.op is Ops.BITCAST and dtypes.is_unsigned(x.src[0].dtype) and x.src[0].vmax <= x.dtype.max: return x.src[0].vmin, x.src[0].vmax
  return x.vmin, x.vmax

def may_wrap(u:UOp) -> bool:
  if u.op is Ops.ADD: lo, hi = (a + b for a, b in zip(int_bounds(u.src[0]), int_bounds(u.src[1])))
  elif u.op is Ops.MUL: lo, hi = min(ps:=[a * b for a in int_bounds(u.src[0]) for b in int_bounds(u.src[1])]), max(ps)
  else: lo, hi = u.vmin, u.vmax  # tinygrad's range analysis bounds the exact result, not the wrapped one
  return not (isinstance(lo, int) and isinstance(hi, int) and u.dtype.min <= lo and hi <= u.dtype.max)

def narrow_int_arithmetic(s:UOp) -> bool:
  """The intermediate computes arithmetic that may wrap in an integer narrower than 32 bits."""
  return any(u.op in WRAPPING and dtypes.is_int(u.dtype) and u.dtype.itemsize < 4 and may_wrap(u) for u in s.src[0].toposort(gate=in_kernel))

def value_key(s:UOp) -> tuple:
  """What an intermediate computes, coarsely: the buffers it reads and the operations it applies. tinygrad makes an
  intermediate of one value for each way it is read (a sort's input, read as rows and as columns), alike but for its
  ranges and index order; such intermediates get one key (and so may others that only look alike)."""
  value = s.src[0].toposort(gate=in_kernel)
  ops = sorted((u.op.value, str(u.dtype), str(u.arg) if u.op is Ops.REDUCE else "") for u in value if u.op in GroupOp.ALU or u.op in (Ops.REDUCE, Ops.CAST, Ops.BITCAST))
  return (frozenset(u.src[0] for u in value if u.op is Ops.INDEX), tuple(ops))

def outer_reduces(v:UOp) -> list[UOp]:
  """The reduces of a kernel's value that no other reduce of it contains."""
  return [u for u in v.toposort(gate=lambda u: in_kernel(u) and u.op is not Ops.REDUCE or u is v) if u.op is Ops.REDUCE]

def stable_key(s:UOp) -> tuple:
  """An intermediate by what survives the rewrites that rebuild it (inlining into it, or into what it reads): its
  ranges; for a scalar, the ranges of its own reduces, or what it reads and computes. Keys that collide are counted
  together (conservative)."""
  if any(r.op is Ops.RANGE for r in s.src[1:]): return ("ranges", *s.src[1:])
  if red := frozenset(r for red in outer_reduces(s.src[0]) for r in red.src[1:]): return ("reduces", red)
  value = s.src[0].toposort(gate=in_kernel)
  def source(b:UOp): return stable_key(b) if b.op is Ops.STAGE else b.src[0] if b.op is Ops.AFTER else b  # a buffer, as it was stored
  return ("scalar", frozenset(source(u.src[0]) for u in value if u.op is Ops.INDEX), tuple(sorted(str(u.op) for u in value)))

def root_key(root:UOp) -> tuple:
  """A kernel root by what survives the rewrites that rebuild it: an intermediate's stable_key, a store's target."""
  return ("stage", *stable_key(root)) if root.op is Ops.STAGE else ("store", root.src[0])

def kernel_roots(sink:UOp) -> list[UOp]:
  return [u for u in sink.toposort() if (u.op is Ops.STAGE and u.arg.addrspace is AddrSpace.GLOBAL) or u.op is Ops.STORE]

def root_value(root:UOp) -> UOp: return root.src[0] if root.op is Ops.STAGE else root.src[1]

def reading_kernels(sink:UOp) -> dict[tuple, frozenset]:
  """The kernels (root_key) that read each realized intermediate (stable_key), with those that read an intermediate
  computing the same value (value_key)."""
  by_value: dict[tuple, set] = {}
  value_of: dict[tuple, set] = {}
  for root in kernel_roots(sink):
    for st in {u.src[0] for u in root_value(root).toposort(gate=in_kernel) if u.op is Ops.INDEX and u.src[0].op is Ops.STAGE}:
      by_value.setdefault(vk:=value_key(st), set()).add(root_key(root))
      value_of.setdefault(stable_key(st), set()).add(vk)
  return {k: frozenset().union(*(by_value[vk] for vk in vks)) for k, vks in value_of.items()}

def reducing_kernels(sink:UOp) -> frozenset:
  """The kernels that reduce as tinygrad scheduled them, before anything was inlined into them."""
  return frozenset(root_key(r) for r in kernel_roots(sink) if any(u.op is Ops.REDUCE for u in root_value(r).toposort(gate=in_kernel)))

@dataclass(frozen=True)
class FusionContext:
  per_element: frozenset   # the per-element intermediates every consumer reads once (per_element_everywhere)
  stored: frozenset        # the buffers the schedule stores to (stored_buffers)
  reducing: frozenset      # the kernels that reduce of their own (reducing_kernels), as the schedule came
  readers: dict            # the kernels that read each intermediate's value (reading_kernels), as the round began
  facts: dict = field(default_factory=dict)
  def fact(self, f, *args):
    """f(*args) of an intermediate, once a round: asked again for each of its reads, in every kernel and every pass over
    one, it is the same for all (UOps are immutable, the round's stores fixed); keccak's rounds scheduled 30x slower."""
    if (key := (f, *args)) not in self.facts: self.facts[key] = f(*args)
    return self.facts[key]

def recomputed_alike(s:UOp, ctx:FusionContext, reader:tuple) -> bool:
  """Every kernel that reads an intermediate must see the same bits (a sort compares its values with the values it
  sorted, in another kernel): it is recomputed only where it is reproducible, or in the one kernel that read it as
  the round began (one reached through another inlined intermediate waits for the next round, when it is counted
  where that one went) unless another schedule computes it too (a reader this schedule cannot count)."""
  return ctx.fact(reproducible, s) or (not shared_values.get() and ctx.readers.get(stable_key(s)) == frozenset({reader}))

def inlinable(idx:UOp, value:UOp, out_rngs:dict[UOp, None], elementwise:bool, looped:set[UOp], iterations:int,
              ctx:FusionContext, reader:tuple) -> UOp|None:
  if idx.op is not Ops.INDEX or any(v.op is Ops.CONST and v.arg is Invalid for v in idx.src[1:]): return None
  if (s:=idx.src[0]).op is not Ops.STAGE or len(idx.src) != len(s.src) or ctx.fact(reads_before_a_store, s, ctx.stored) or \
     not recomputed_alike(s, ctx, reader) or ctx.fact(narrow_int_arithmetic, s) or ctx.fact(out_of_range_consts, s.src[0], in_kernel): return None
  if (cost:=ctx.fact(small_stage, s)) is not None and iterations * cost <= SMALL_WORK: return inline_stage(idx)
  if ctx.fact(gather_stage, s): return inline_stage(idx)
  # a tiny one is inlined where it is read outside the consumer's long loops (inside them it would be recomputed every
  # iteration, and a MoE matmul's expert ids must stay a load for its weight address)
  if ctx.fact(tiny_stage, s) and idx not in looped: return inline_stage(idx)
  if stage_key(s) in ctx.per_element and ctx.fact(per_element_stage, s) and read_once(idx, value): return inline_stage(idx)
  if not ((elementwise and ctx.fact(row_reduce_stage, s)) or ctx.fact(short_row_stage, s)): return None
  return inl if row_reduces_only(inl:=inline_stage(idx), out_rngs) else None

def fuse_row_reduces(ctx:FusionContext, root:UOp) -> UOp|None:
  if root.op is Ops.STAGE:
    if root.arg.addrspace is not AddrSpace.GLOBAL: return None
    value, out = root.src[0], root.src[1:]
  else: value, out = root.src[1], root.src[:1]
  out_rngs = UOp.sink(*out).ranges
  # a row reduce goes only into an elementwise consumer: reduces of its own would each recompute the row's reduce
  # (a scalar intermediate is known by its reduces, which inlining changes: what it holds now decides, which at worst
  # takes an inlined reduce for its own and inlines less)
  reader = root_key(root)
  elementwise = reader not in ctx.reducing if root.op is Ops.STORE or len(root.src) > 1 else not any(u.op is Ops.REDUCE for u in value.toposort(gate=in_kernel))
  new = value
  while True:
    looped, iterations = in_long_reduces(new), kernel_iterations(new, out_rngs)
    if not (found := {u:inl for u in new.toposort(gate=in_kernel) if (inl:=inlinable(u, new, out_rngs, elementwise, looped, iterations, ctx, reader)) is not None}): break
    new = substitute_in_kernel(new, found)
  if new is value: return None
  return root.replace(src=(new,)+root.src[1:]) if root.op is Ops.STAGE else root.replace(src=(root.src[0], new)+root.src[2:])

pm_fuse_row_reduces = PatternMatcher([
  (UPat(Ops.STAGE, name="root"), fuse_row_reduces),
  (UPat(Ops.STORE, name="root"), fuse_row_reduces),
])

def kernel_values(sink:UOp) -> list[UOp]:
  """The value of every kernel root (a realized intermediate, or a store) of the schedule."""
  return [root_value(r) for r in kernel_roots(sink)]

# an intermediate by its ranges (its own, in the schedule): inlining into what it reads rebuilds it, these stay
def stage_key(s:UOp) -> tuple[UOp, ...]: return s.src[1:]

def per_element_everywhere(sink:UOp) -> set[tuple[UOp, ...]]:
  """The per-element intermediates every consumer reads once: recomputed in all of them, their kernel is gone; read in a
  loop by one (a matvec reading the row as its activation), the kernel stays and recomputing it elsewhere saves nothing."""
  read_once_by: dict[UOp, list[bool]] = {}
  for value in kernel_values(sink):
    for idx in value.toposort(gate=in_kernel):
      if idx.op is Ops.INDEX and per_element_stage(idx.src[0]): read_once_by.setdefault(idx.src[0], []).append(read_once(idx, value))
  return {stage_key(s) for s, once in read_once_by.items() if all(once) and stage_key(s)}  # (a scalar has no ranges to tell it by)

def until_settled(sink:UOp, per_element:frozenset, reducing:frozenset, name:str) -> UOp:
  """Rewrites until nothing more is inlined: each round counts every intermediate's readers afresh, and inlines only
  intermediates as they were counted (one that a round rebuilt waits for the next)."""
  stored = frozenset(stored_buffers(sink))
  while (new:=graph_rewrite(sink, pm_fuse_row_reduces, ctx=FusionContext(per_element, stored, reducing, reading_kernels(sink)), name=name)) is not sink:
    sink = new
  return sink

# recomputing an intermediate in its consumers multiplies its work by how often they read it: a phase of this pass
# whose schedule would compute more than this factor times what it did is not applied (a Winograd convolution's
# transforms recomputed per output: 10x its forward ops, 30x its backward's; keccak's rounds inlined into each other,
# 9.5x, until codegen's rewrite stack overflowed). An RMSNorm that reads a recomputed MoE output twice (its sum of
# squares and its output) costs 1.6x; the tiny GLM's decode step 1.00x (its MoE output has two reading kernels).
MAX_WORK_GROWTH = 2.0

def work(sink:UOp) -> int:
  """The schedule's arithmetic: every ALU op of every kernel, times the iterations of the ranges it varies with."""
  return sum(prod(int(r.vmax) + 1 for r in u.ranges) for value in kernel_values(sink) for u in value.toposort(gate=in_kernel) if u.op in GroupOp.ALU)

def bounded(before:UOp, after:UOp) -> UOp:
  """after, unless it computes more than MAX_WORK_GROWTH times what before does."""
  return after if work(after) <= MAX_WORK_GROWTH * work(before) else before

def fuse_kernels(sink:UOp) -> UOp:
  if not is_active(NAME): return sink
  reducing = reducing_kernels(sink)
  sink = bounded(sink, until_settled(sink, frozenset(), reducing, "fusion: row reduces into their consumer"))
  # then, with every other intermediate settled (a rewrite rebuilds the ones it inlines into), the per-element ones
  if KEEP_PER_ELEMENT.value or not (per_element:=per_element_everywhere(sink)): return sink
  return bounded(sink, until_settled(sink, frozenset(per_element), reducing, "fusion: per-element intermediates into their consumers"))

# *** scheduler: a normalized row that a matmul reads is realized once ***

# Stock tinygrad inlines an elementwise expression into every kernel that reads it. A row normalized by a reduce
# (RMSNorm's x * rsqrt(mean(x^2)) * w, softmax's exp(x - max) / sum) read by a matmul is then recomputed for every output
# row: each of a matvec's lanes reloads x, the float32 norm weight and the row's reduce for each of its rows, which
# triples what the matvec reads through L1 (a decode matvec is bound by that, not by DRAM). Realized, the row is one
# kernel (the reduce fused in, above) writing the fp16 row that every matmul then reads as a plain vector.
MOVEMENT = (Ops.RESHAPE, Ops.EXPAND, Ops.PERMUTE)
OUTSIDE = (Ops.REDUCE, Ops.CONTIGUOUS, Ops.PARAM, Ops.AFTER, Ops.STORE, Ops.COPY)  # what is computed, or stored, elsewhere

def numel(u:UOp) -> int: return prod(s.vmax if isinstance(s, UOp) else s for s in u.shape)

def skip(u:UOp, ops, parent:UOp) -> tuple[UOp, UOp]:
  """(the first node under u that is not one of ops, its consumer)"""
  while u.op in ops: parent, u = u, u.src[0]
  return u, parent

def normalized_row(n:UOp) -> bool:
  """n is elementwise, and a reduce inside it is broadcast back over what it reduced (a row's norm or softmax sums)."""
  if n.op not in GroupOp.ALU and n.op is not Ops.CAST: return False
  # the ops of n's own kernel, and the boundaries where it stops (toposort's gate would leave those out)
  inside = n.toposort(gate=lambda u: u is n or u.op not in OUTSIDE)
  edge = {s for u in inside for s in u.src if s.op is Ops.REDUCE}
  return any(2 * numel(r) <= numel(n) for r in edge)

def widened_straight_back(n:UOp, parent:UOp) -> bool:
  """n is half and its reader casts it straight to float32."""
  return n.dtype == dtypes.half and parent.op is Ops.CAST and parent.dtype == dtypes.float32

def folded_round_trip(n:UOp, parent:UOp) -> bool:
  """n rounds a float32 row to half and its reader widens it straight back: tinygrad's codegen folds that round trip
  (codegen/late/coalesce.py, pm_simplify_add_image: float.cast(half).cast(float) -> the float), so the program never
  rounds. Realizing the half row would store the rounded values: the float32 row is realized instead."""
  return widened_straight_back(n, parent) and n.src[0].dtype == dtypes.float32

def pad_region(p:UOp) -> list[tuple[int, int]]|None:
  """Where a PAD's source lands in its output, [start, end) an axis, for constant pads and a static shape."""
  if p.op is not Ops.PAD or not all(isinstance(n, int) for n in p.shape) or \
     any(s.op is not Ops.STACK or any(c.op is not Ops.CONST for c in s.src) for s in p.src[1:]): return None
  return [(b.arg, n - a.arg) for b, a, n in zip(p.src[1].src, p.src[2].src, p.shape)]

def unrounded(u:UOp) -> UOp|None:
  """A half value built only of float32 rows rounded to half and concatenated (pads added where they do not overlap:
  each element one rounding), as float32 without those roundings; None for anything else. Widened straight back (the
  absorbed q of GLM's attention), tinygrad's codegen folds each rounding away, so the program never rounds."""
  if u.op is Ops.CAST and u.dtype == dtypes.half and u.src[0].dtype == dtypes.float32: return u.src[0]
  if u.op in (*MOVEMENT, Ops.PAD) and (s:=unrounded(u.src[0])) is not None: return u.replace(dtype=dtypes.float32, src=(s, *u.src[1:]))
  if u.op is Ops.ADD and len(regions:=[pad_region(s) for s in u.src]) == 2 and None not in regions and \
     any(hi0 <= lo1 or hi1 <= lo0 for (lo0, hi0), (lo1, hi1) in zip(*regions)) and None not in (srcs:=[unrounded(s) for s in u.src]):
    return u.replace(dtype=dtypes.float32, src=tuple(srcs))
  return None

def realize_normalized_rows(sink:UOp) -> UOp:
  if not is_active(NAME): return sink
  realized: dict[UOp, UOp] = {}
  subs: dict[UOp, UOp] = {}
  is_row: dict[UOp, bool] = {}  # normalized_row walks n's kernel: once per node, however many matmuls read it
  def row(n:UOp) -> bool:
    if n not in is_row: is_row[n] = normalized_row(n)
    return is_row[n]
  def rows_read(wider:frozenset[UOp]):
    """(row, its consumer) for each normalized row a matmul reads: through widening casts, and through a narrowing cast
    where the wider row is read too (`wider`)."""
    for r in sink.toposort():
      if r.op is not Ops.REDUCE or r.arg[0] is not Ops.ADD: continue
      if (mul:=skip(r.src[0], (Ops.PERMUTE, Ops.CAST), r)[0]).op is not Ops.MUL: continue
      for operand in mul.src:  # a matmul's operand that it reads broadcast over its other axis: recomputed per output
        n, parent = skip(operand, MOVEMENT, mul)
        # a widening cast of a normalized row (the float32 router reading the fp16 row) reads the realized row, cast;
        # so does a narrowing one of a row another matmul reads wide (the mixed policy's experts reading the float32 norm
        # rounded to fp16, beside the float32 router): one row realized, rounded in the consumer to the same bits
        while n.op is Ops.CAST and row((under:=skip(n.src[0], MOVEMENT, n))[0]) and \
              (n.src[0].dtype.itemsize <= n.dtype.itemsize or under[0] in wider or folded_round_trip(n, parent)):
          n, parent = under
        # a tiny row (the selected experts' weights) is recomputed where it is read, as tiny buffers are (TINY above),
        # and a short one in a small matmul (SHORT_ROW above)
        if numel(mul) < 2 * numel(n) or numel(n) <= TINY or (numel(n) <= SHORT_ROW and numel(mul) <= SHORT_ROW_MATMUL) or not row(n): continue
        # a half row of rounded float32 parts widened straight back: the float32 row is realized (the program never rounds)
        yield n, parent, (unrounded(n) if widened_straight_back(n, parent) else None)
  for n, parent, wide in rows_read(frozenset(n for n, _, _ in rows_read(frozenset()))):
    if wide is not None:
      subs[parent] = realized.setdefault(wide, wide.contiguous())
      continue
    realized.setdefault(n, n.contiguous())
    # the consumer reads the realized row (substituting n itself would rewrite it inside its own CONTIGUOUS too)
    p = subs.get(parent, parent)
    subs[parent] = p.replace(src=tuple(realized[n] if s is n else s for s in p.src))
  return sink.substitute(subs, name="fusion: realize normalized rows read by matmuls") if subs else sink

# *** codegen: one workgroup per row, reduces and outputs over the same lanes ***

# a reduce this short in a kernel with a longer one is an element's own work (the MoE output recomputed in the next
# RMSNorm: the experts' rows of one element, weighted, and the normalization of their weights): unrolled in each lane
# that needs it, not spread over the lanes with a combine and a barrier of its own
ELEMENT_REDUCE_MAX = 16

def element_reduces(k) -> list[UOp]:
  short = [red for red in k.reduceops if all(isinstance(r.vmax, int) for r in red.src[1:]) and ranges_size(red.src[1:]) <= ELEMENT_REDUCE_MAX]
  return short if len(short) < len(k.reduceops) else []

def row_ranges(k) -> list[UOp]:
  """The output ranges no reduce depends on (but an element's own short reduces): the rows of a fused row kernel. A row
  reduce inside another is invariant to it (softmax's max in its sum: the schedule step inlines only such reduces); a
  stock kernel can look alike with a reduce that varies with the one it sits in (a convolution's backward), and its
  rows are not taken (the lanes split both reduces' ranges, and its gradient came out wrong on CL)."""
  if not (reduces := k.reduceops): return []
  per_element = element_reduces(k)
  row_reds = [red for red in reduces if red not in per_element]
  # (a reduce inside a row reduce that it varies with, other than an element's own short reduce that each lane unrolls
  # for its elements: a GQA attention's value gradient, whose softmax statistics over the keys vary with the query the
  # row reduce sums over, or a convolution's backward. The MoE output recomputed in the final norm is such an element's
  # reduce: refused, each of 2048 workgroups summed the whole row, 102 us a token on the H100)
  if any(a in b.src[0].backward_slice_with_self and set(b.src[1:]) & set(a.ranges) for a in reduces if a not in per_element for b in row_reds if a is not b): return []
  depends = {r for red in reduces if red not in per_element for r in red.ranges}
  return [r for r in output_ranges(k) if r not in depends and r.vmax > 0]

def choose_row_opts(k):
  if not (rows := row_ranges(k)) or not k.ren.has_local or k.dont_use_locals: return None
  # a row this long in one workgroup leaves the GPU idle (a softmax over a 154880-token vocab: 100 us on the H100, one
  # workgroup looping 605 times); tinygrad's heuristic spreads its elements over workgroups, each recomputing the reduce
  if prod(r.vmax+1 for r in rows) > MAX_ROW: return None
  # a reduce in a dtype the device emulates (half on PoCL) must not become a loop's accumulator: tinygrad's emulation
  # fails verification on it, and its own heuristic unrolls such a short reduce
  if any(not native(k.ren, red.dtype) for red in k.reduceops): return None
  # the rows stay a loop inside the kernel, so a row's reduces run once per workgroup, not once per output element
  k.ast = k.ast.substitute({r: r.replace(arg=r.arg[:-1]+(AxisType.LOOP,)) for r in rows}, name="fusion: rows loop in the kernel")
  unroll_whole(k, element_reduces(k))  # an element's own short reduces first
  reduces = [red for red in k.reduceops if any(x.op is Ops.RANGE and x.arg[-1] is AxisType.REDUCE for x in red.src[1:])]
  if any(red.dtype not in ACC_DTYPES for red in reduces) or any(o.op is not Ops.RANGE for red in reduces for o in red.src[1:]):
    return k  # each thread walks its rows serially: correct, one launch (the schedule step fuses only what the lanes take)
  # a reduce fused as one range may reach codegen split (a row read through a quant block's index: blocks x elements):
  # its longest range goes over the lanes, the rest stay loops in each lane
  red_rngs = [max(red.src[1:], key=lambda r: r.vmax) for red in reduces]
  # the longest row axis goes over the lanes; any other (rope's pairs of a normed, roped row) stays a loop in each lane
  row = max(rows, key=lambda r: r.vmax)
  # as many lanes as the longest reduce has elements: a row longer than its reduces keeps its extra elements in each
  # lane, and no reduce is padded past its length (sized by the row instead, a batched QR's five nested sums of 2,
  # padded to the 8 lanes of its 8-element row, gave a wrong Q on CL)
  lanes = pow2_at_most(max(int(r.vmax+1) for r in red_rngs), MAX_LANES)
  if lanes < 2: return k
  width, warps = min(lanes, SHUFFLE_WIDTH), max(1, lanes // SHUFFLE_WIDTH)
  smem = warps * len(reduces) * max(red.dtype.itemsize for red in reduces)
  if smem > k.ren.shared_max or lanes > (k.ren.local_max or (lanes,))[0]: return k
  lane = UOp.range(width, LANE_ID, AxisType.GROUP_REDUCE, dtype=row.dtype)
  lane_idx = lane if warps == 1 else UOp.range(warps, WARP_ID, AxisType.GROUP_REDUCE, dtype=row.dtype) * width + lane
  # a range of the AST as the kernel's opts have left it (what shift_to kept of it under the same id), or None
  def now(r:UOp) -> UOp|None: return next((x for x in k.rngs if x.arg[:-1] == r.arg[:-1]), None)
  for r in dict.fromkeys([row, *red_rngs]):  # reduces over one range share it once
    # a range an earlier split took whole is gone: a kernel this heuristic does not know, left to tinygrad's
    if (cur:=now(r)) is None: return None
    try: share_lanes(k, cur, lane_idx)
    except KernelOptError: return None
  # what each lane keeps of the rows and of their reduces, when short and static, is unrolled: the row's elements are then
  # loaded once for the reduce and the output (one index), and loads that do not wait on the reduce can be issued before
  # the lanes combine
  for r in [*rows, *red_rngs]:
    rest = now(r)  # none left where the lanes took it all
    if rest is not None and rest.src[0].op is Ops.CONST and 1 < rest.src[0].arg <= UNROLL_REST:  # a padded row keeps its loop
      k.shift_to(rest, rest.src[0].arg, AxisType.UPCAST if rest.arg[-1] is AxisType.LOOP else AxisType.UNROLL)
  return k

# *** codegen: a small intermediate recomputed inside a small consumer's reduce ***

def choose_nested_opts(k):
  """A kernel whose reduce recomputes a small intermediate's reduce per element (the top-k: each expert's rank inside
  the k one-hot sums over the experts): one lane per element of the outer reduce, so each lane computes its element's
  inner reduce once, all outputs upcast in every lane (they share those elements), the lanes combining each output.
  tinygrad's heuristic gave 16 lanes that each ran 4 x 64 inner loops: 3.0 us on the H200 for GLM's top-k."""
  if len(reds:=k.reduceops) != 2 or not k.ren.has_local or k.dont_use_locals: return None
  outer, inner = (reds[0], reds[1]) if reds[1] in reds[0].src[0].backward_slice else (reds[1], reds[0])
  if inner not in outer.src[0].backward_slice or outer.arg[0] not in COMBINES or outer.dtype not in LANE_DTYPES: return None
  # the inner reduce becomes each lane's loop, whose accumulator tinygrad's emulation of a dtype (half on PoCL) cannot
  # rewrite: an fp16 argmax (its max inside the index's max) failed verification on CL
  if not native(k.ren, inner.dtype): return None
  outs = k.axes_of(AxisType.GLOBAL)
  if any(not isinstance(k.full_shape[i], int) for i in outs) or prod(k.full_shape[i] for i in outs) > TINY: return None
  if len(outer_rngs:=[r for r in outer.src[1:] if r.op is Ops.RANGE]) != 1: return None
  size = outer_rngs[0].vmax + 1
  if (lanes:=pow2_at_most(size, MAX_LANES)) < 2 or size % lanes: return None
  for _ in outs:  # each UPCAST moves its axis out of the global axes: the first one left is the next
    if (left:=k.axes_of(AxisType.GLOBAL)) and k.full_shape[left[0]] > 1: k.apply_opt(Opt(OptOps.UPCAST, left[0], k.full_shape[left[0]]))
  if (axis:=next((i for i, a in enumerate(k.axes_of(AxisType.REDUCE)) if k.rngs[a].arg[:-1] == outer_rngs[0].arg[:-1]), None)) is None: return None
  k.apply_opt(Opt(OptOpsExt.REDUCE_LOCAL, axis, lanes))
  return k

# *** codegen: each grouped reduce combines its partials on its own, few of them unrolled ***

def own_group_loop(ctx:Iterator[int], r:UOp) -> UOp|None:
  """REDUCE over GROUP_REDUCE ranges -> the partials in shared memory, read back and reduced by every thread: tinygrad's
  fix_group_for_reduce, except that the loop range is the REDUCE's own (tinygrad derives its id from the group range's,
  so a fused row's max and sum, grouped over the same lanes, would share one loop), and that up to UNROLL_PARTIALS
  partials are read without a loop (a loop's END is placed before loads that do not wait on it, so a row kernel's
  weight loads followed the barrier; without it tinygrad's linearizer issues them first)."""
  group, rest = partition(r.src[1:], lambda u: u.op is Ops.RANGE and u.arg[-1] is AxisType.GROUP_REDUCE)
  if not group: return None
  others = sorted([u for u in r.toposort() if u.op is Ops.RANGE and u.arg[-1] is AxisType.LOCAL], key=lambda u: u.arg)
  # what the lanes combine: the reduce over its other ranges and its unrolled (horizontal) axes
  partial = r.replace(src=(r.src[0], *rest)) if rest or r.arg[1] else r.src[0]
  buf = partial.bufferize(*others, *group, arg=BufferizeOpts(group[0].arg[0], AddrSpace.LOCAL))
  if prod(g.vmax+1 for g in group) <= UNROLL_PARTIALS:
    # few partials are read unrolled: no loop, so loads that do not wait on the barrier can be placed before it
    return functools.reduce(lambda a, b: a.alu(r.arg[0], b), [buf.index(*others, *(g.const_like(i) for g, i in zip(group, idx)))
                                                               for idx in itertools.product(*[range(g.vmax+1) for g in group])])
  loops = [UOp.range(g.vmax+1, next(ctx), AxisType.REDUCE, dtype=g.dtype) for g in group]
  return buf.index(*others, *loops).reduce(*loops, arg=(r.arg[0], 0))

def separate_group_loops(sink:UOp, ren) -> UOp:
  grouped = [u for u in sink.toposort() if u.op is Ops.REDUCE and any(x.op is Ops.RANGE and x.arg[-1] is AxisType.GROUP_REDUCE for x in u.src[1:])]
  if not grouped: return sink
  ids = itertools.count(max(u.arg[0] for u in sink.toposort() if u.op is Ops.RANGE) + 1)
  return graph_rewrite(sink, PatternMatcher([(UPat(Ops.REDUCE, name="r"), own_group_loop)]), ctx=ids, name="fusion: a loop per grouped reduce")

FUSION = register(Pass(NAME, "runs a row's reduces (RMSNorm, softmax) inside their elementwise consumer: one kernel, rows over shared lanes",
  (ScheduleStep("convert copy to store", realize_normalized_rows), ScheduleStep("symbolic+reduce_collapse+debuf", fuse_kernels),
   OptHeuristic(choose_row_opts), OptHeuristic(choose_nested_opts),
   CodegenStep("expander", separate_group_loops)), settings=(KEEP_PER_ELEMENT,)))
