"""reduce_local: one reduce spread over the lanes of a warp, combined with register shuffles.

Opt(OptOpsExt.REDUCE_LOCAL, axis, amount) splits reduce axis `axis` (counted among the REDUCE axes, as GROUP counts)
into `amount` lanes, lane innermost: lane l accumulates elements l, l+amount, l+2*amount, ... in a register, so adjacent
lanes read adjacent addresses. An axis the lanes do not divide (a symbolic length, or 605) is padded to a multiple of
them: the padding is gated off every load and counted as the reduce's identity (ADD: 0, MAX: -inf). The lanes then combine:
  - CUDA, HIP: a __shfl_xor_sync / __shfl_xor butterfly; Metal: simd_sum / simd_max over 32 lanes, else a
    simd_shuffle_xor butterfly.
  - more than 32 lanes: 32-lane butterflies, then the warps combine through shared memory with one barrier
    (tinygrad's own GROUP_REDUCE machinery, fed one value per warp). A GROUP/GROUPTOP on what the lanes leave of the
    axis (BEAM's, or the matvec policy's reduce_warps) combines its warps the same way, after the lanes.
  - any other backend with local memory: the same butterfly through shared memory (a tree: log2(lanes) steps, each a
    store, a barrier and a load of lane^offset's value).
Why: stock tinygrad splits a reduce only through GROUP/GROUPTOP, which always goes through shared memory, a barrier and
one thread looping over the partials; hand-written matvec kernels combine a warp's lanes in registers.

The lanes are a GROUP_REDUCE range with a reserved id that sorts before every other local dim, so they become the
fastest thread index (threadIdx.x / lid.x) and consecutive lanes share a warp. The shuffle epilogue fires only where the
kernel's local dims map one to one onto hardware dims (nothing merged or split) and the renderer has a shuffle;
otherwise the butterfly goes through shared memory, which is indexed by range and so legal for any thread mapping.

Hooks: Scheduler.apply_opt (the opt and its legality checks), BEAM's action list, and a codegen step right after
tinygrad's "expander", where REDUCEs still name their ranges.
"""
from __future__ import annotations
import math
from enum import Enum
from typing import Callable
from tinygrad.uop.ops import UOp, Ops, AxisType, PatternMatcher, UPat, graph_rewrite, identity_element
from tinygrad.dtype import dtypes, AddrSpace, Invalid
from tinygrad.schedule.indexing import BufferizeOpts
from tinygrad.helpers import prod, merge_dicts
from tinygrad.codegen.opt import Opt, OptOps, KernelOptError, check
from tinygrad.renderer import Renderer
from tinygrad.codegen import maybe_load
from tinygrad.renderer.cstyle import CUDARenderer, HIPRenderer, MetalRenderer
from tinygrad_ext import Pass, CodegenStep, SchedulerOpt, MatcherRules, register
from tinygrad_ext.passes.shared import native, store_targets
from tinygrad_ext.internals import shape_or_none, LANE_RANGE_ID, WARP_RANGE_ID

class OptOpsExt(Enum):
  REDUCE_LOCAL = 1001
  def __lt__(self, x): return self.value < x.value  # Opts sort by op, and tinygrad's OptOps compare by value

# the lanes' and warps' ranges: ids tinygrad never hands out (TC and REDUCE_LOCAL never share a kernel)
LANE_ID, WARP_ID = LANE_RANGE_ID, WARP_RANGE_ID
SHUFFLE_WIDTH = 32      # lanes combined in registers; wider reduces combine 32-lane warps through shared memory
MAX_LOCAL_THREADS = 1024
COMBINES = {Ops.ADD, Ops.MAX}
ACC_DTYPES = {dtypes.float32, dtypes.float16, dtypes.bfloat16}
LANE_DTYPES = ACC_DTYPES | {dtypes.int32}  # accumulators the lanes combine (an argmax's index is an int MAX)
NATIVE_SHUFFLE = (dtypes.float32, dtypes.int32)  # shuffled as they are; narrower floats go through float32
LOCAL_AXES = (AxisType.WARP, AxisType.LOCAL, AxisType.GROUP_REDUCE)

# *** the opt ***

def apply_reduce_local(k, opt:Opt) -> tuple[UOp, UOp]:
  check(k.ren.has_local and not k.dont_use_locals, "REDUCE_LOCAL needs local threads: the renderer has no local memory, or NOLOCALS")
  check(not any(o.op is OptOps.TC for o in k.applied_opts), "REDUCE_LOCAL does not combine with tensor cores")
  amount = opt.arg
  check(isinstance(amount, int) and amount >= 2 and amount & (amount-1) == 0, f"REDUCE_LOCAL amount must be a power of two >= 2, not {amount}")
  try: rng = k.rngs[k.axes_of(AxisType.REDUCE)[opt.axis]]
  except (IndexError, TypeError): raise KernelOptError(f"REDUCE_LOCAL: no reduce axis {opt.axis}") from None
  if (prior:=[r for r in k.rngs if r.arg[0] in (LANE_ID, WARP_ID)]):
    # a second REDUCE_LOCAL composes: its lanes are the slower bits of one lane range, so adjacent lanes still read
    # adjacent elements of the first split (a quant block split over 2 lanes, 16 blocks per warp)
    check(len(prior) == 1 and prior[0].arg[0] == LANE_ID and (width:=prior[0].vmax+1) * amount <= SHUFFLE_WIDTH,
          f"a second REDUCE_LOCAL composes lanes within one warp ({SHUFFLE_WIDTH} lanes), without warps")
    # the butterfly combines every lane of a reduce: lanes that split another reduce (softmax's sum beside its max)
    # would each add the same partial once per lane of the first split
    check(reduces_over(k, rng) == reduces_over(k, prior[0]), "a second REDUCE_LOCAL composes lanes of the same reduces only")
    # padding under composed lanes gates on lane // width and the rest together, which an UNROLL of the rest then
    # computed wrong (found by random walks over BEAM's actions): composed lanes must divide what they split
    check(rng.src[0].divides(amount) is not None, f"a second REDUCE_LOCAL must divide its axis ({rng.src[0].render()}), it does not pad")
  check_reduce_local_legal(k, rng)
  # an axis the lanes do not divide (a symbolic length: attention over the positions so far) is padded; ADD and MAX
  # have an identity for the padding to stand in as
  check(rng.src[0].op is not Ops.CONST or amount <= rng.src[0].arg, f"REDUCE_LOCAL: {amount} lanes is more lanes than the axis has elements ({rng.src[0].render()})")
  if rng.src[0].divides(amount) is None: rng = pad_to_lanes(k, rng, amount)
  local_sizes = [k.full_shape[a] for a in k.axes_of(*LOCAL_AXES)]
  check(all(isinstance(s, int) for s in local_sizes), "REDUCE_LOCAL needs static local sizes")
  threads = prod(local_sizes) * amount
  check(threads <= MAX_LOCAL_THREADS, f"REDUCE_LOCAL: {threads} threads exceed the local size limit {MAX_LOCAL_THREADS}")
  if prior:
    lane = UOp.range(width * amount, LANE_ID, AxisType.GROUP_REDUCE, dtype=rng.dtype)
    k.ast = k.ast.substitute({prior[0]: lane % width}, name="reduce_local: compose lanes")
    return k.shift_to(rng, amount, AxisType.GROUP_REDUCE, top=False, input_new_rng=lane // width)
  return split_over_lanes(k, rng, amount)

def reduces_over(k, rng:UOp) -> set[UOp]:
  return {u for u in k.ast.backward_slice if u.op is Ops.REDUCE and rng in merge_dicts([r.ranges for r in u.src[1:]])}

def guard_lanes(k, opt:Opt) -> None:
  """tinygrad's UNROLL may take any GROUP_REDUCE axis: on the lanes it would turn hardware threads into a loop that the
  lane epilogue still combines as lanes."""
  if opt.op is OptOps.UNROLL and (i:=k.real_axis(opt.op, opt.axis)) >= 0 and k.rngs[i].arg[0] in (LANE_ID, WARP_ID):
    raise KernelOptError(f"{opt}: REDUCE_LOCAL's lanes are threads, not a loop to unroll")

def check_reduce_local_legal(k, rng:UOp) -> None:
  for red in reduces_over(k, rng):
    check(red.arg[0] in COMBINES, f"REDUCE_LOCAL combines ADD and MAX reduces, not {red.arg[0]}")
    check(red.dtype in LANE_DTYPES, f"REDUCE_LOCAL needs a float32/float16/bfloat16/int32 accumulator, not {red.dtype}")
    check(native(k.ren, red.dtype), f"REDUCE_LOCAL: the lanes combine through local memory, where {red.dtype}, emulated on this device, cannot go")
    check(not any(u.arg[-1] in (AxisType.REDUCE, AxisType.UNROLL, AxisType.GROUP_REDUCE) for u in red.ranges),
          "REDUCE_LOCAL cannot split a reduce nested inside another reduce")

def unroll_whole(k, reduces:list[UOp]) -> None:
  """Each reduce range of these reduces unrolled whole, each once however many of them share it (found by id in the
  current AST: an opt rewrites the AST): small reduces beside a kernel's main one, computed in every lane that needs them."""
  for key in dict.fromkeys(x.arg[:-1] for r in reduces for x in r.src[1:] if x.op is Ops.RANGE and x.vmax > 0):
    if (rng:=next((x for x in k.rngs if x.arg[:-1] == key and x.arg[-1] is AxisType.REDUCE), None)) is not None:
      k.apply_opt(Opt(OptOps.UNROLL, k.unrollable_dims.index(k.rngs.index(rng)), rng.vmax+1))

def share_lanes(k, rng:UOp, lanes:UOp, pad:bool=True) -> bool:
  """rng goes over lanes the kernel already has (lanes: a lane range, or warp * width + lane), lane innermost as
  REDUCE_LOCAL splits, so several reduces of one kernel combine over the same lanes (a fused row's reduces, a norm's sum
  of squares inside a matvec). An axis the lanes do not divide is padded, or refused (False) without pad."""
  if rng.src[0].divides(amount:=int(lanes.vmax+1)) is None:
    if not pad: return False
    rng = pad_to_lanes(k, rng, amount)
  k.shift_to(rng, amount, AxisType.GROUP_REDUCE, top=False, input_new_rng=lanes)
  return True

def pad_to_lanes(k, rng:UOp, lanes:int) -> UOp:
  """rng padded to a multiple of `lanes`; the padding is gated off every load and store and is the identity of a reduce."""
  n = rng.src[0]
  # simplified: a static axis pads to a constant, which later opts can split (a fused row's share of each lane unrolls)
  # a length the lanes cover in one pass however long it is (a symbolic one at most `lanes`) is padded to exactly the
  # lanes: its loop, 0 or 1 iterations, has an index that is always 0, and codegen then placed the accumulator's
  # initialisation inside the loop (a sum over 0 elements read it uninitialized)
  count = ((n + (lanes-1)) // lanes).simplify()
  padded = rng.replace(src=((count * lanes).simplify() if count.vmax > 1 else n.const_like(lanes),))
  valid = padded < n
  # a float reduce's infinite identity (MAX: -inf) over a value cast from an integer load: tinygrad moves the identity
  # into the load's alternative value, in the load's dtype, which cannot hold it
  check(not any(not dtypes.is_float(b.dtype) and math.isinf(identity_element(red.arg[0], red.dtype)) for red in k.reduceops if rng in red.src[1:]
                for b in k.bufs if b in red.src[0].backward_slice and rng in b.src[1].get_idx().backward_slice_with_self),
        "padding a float reduce over integer loads: its identity does not fit the loads")
  k.ast = k.ast.substitute({rng: padded}, name=f"pad {rng.arg[:-1]} to {lanes} lanes")
  stores = store_targets(k.ast)
  # a padded load that another load's index reads (a gather: scores at the selected ids) is refused: tinygrad simplifies
  # an index under its gate, which drops the inner load's own gate, and the padding would read past that buffer
  padded_loads = [b for b in k.bufs if b not in stores and padded in b.src[1].get_idx().backward_slice_with_self]
  check(not any(b in o.src[1].backward_slice for b in padded_loads for o in k.bufs if o is not b),
        "padding a gather's index (a load that addresses another load) would read past its buffer")
  subs = {}
  for b in k.bufs:
    if padded in (i:=b.src[1].get_idx()).backward_slice_with_self:
      nb = b.replace(src=(b.src[0], i.valid(valid & b.src[1].get_valid())))
      subs[b] = nb if b in stores else valid.where(nb, UOp.const(Invalid, b.dtype))
  k.ast = k.ast.substitute(subs, name="gate the padding")
  k.ast = k.ast.substitute({red: red.replace(src=(valid.where(red.src[0], red.src[0].const_like(identity_element(red.arg[0], red.dtype))),)+red.src[1:])
                            for red in k.reduceops if padded in red.src[1:]}, name="the padding is the reduce's identity")
  return padded

def split_over_lanes(k, rng:UOp, amount:int) -> tuple[UOp, UOp]:
  width = min(amount, SHUFFLE_WIDTH)
  warps = amount // width
  if warps > 1:
    smem = warps * prod(k.full_shape[a] for a in k.axes_of(AxisType.UPCAST, AxisType.LOCAL)) * k.reduceop.dtype.itemsize
    check(smem <= k.ren.shared_max, f"REDUCE_LOCAL: combining {warps} warps needs {smem} bytes of shared memory, max {k.ren.shared_max}")
  lane = UOp.range(width, LANE_ID, AxisType.GROUP_REDUCE, dtype=rng.dtype)
  lanes = lane if warps == 1 else UOp.range(warps, WARP_ID, AxisType.GROUP_REDUCE, dtype=rng.dtype) * width + lane
  return k.shift_to(rng, amount, AxisType.GROUP_REDUCE, top=False, input_new_rng=lanes)

# *** the epilogue ***

# The intrinsics are CUSTOM UOps (rendered as their own statement, so a collective never moves into the lane-0 store's
# `if`); INTRINSICS are their spellings, which the pm_add_loads rule below recognizes.
INTRINSICS = ("__shfl_xor_sync(", "__shfl_xor(", "simd_shuffle_xor(", "simd_sum(", "simd_max(")
def intrinsic(fmt:str, x:UOp) -> UOp: return UOp(Ops.CUSTOM, x.dtype, (x,), fmt)

def _xor_shuffle(fmt:str, via_float:bool) -> Callable[[UOp, int], UOp]:
  def shuffle(v:UOp, offset:int) -> UOp:
    if not via_float: return intrinsic(fmt.replace("OFFSET", str(offset)), v)
    return intrinsic(fmt.replace("OFFSET", str(offset)), v.cast(dtypes.float32)).cast(v.dtype)
  return shuffle

def warp_epilogue(ren:Renderer, dtype, threads:int) -> tuple[Callable[[UOp, int], UOp], dict]|None:
  """(xor shuffle, {reduce op: whole-warp intrinsic}) for renderers with register shuffles, else None. An xor partner
  always exists (a workgroup is a whole number of lane groups), but CUDA's mask must name only threads that exist and
  take part: a workgroup smaller than a warp (a 2x2 QR's 2 lanes) gets a mask of exactly its threads, and one whose
  last warp is partial goes through local memory instead (None). 0xffffffff over 2 threads gave a wrong Q on an H100."""
  if isinstance(ren, MetalRenderer):
    # Metal's simd functions take float, half and int; bfloat goes through float, which holds it exactly
    via_float = dtype not in (dtypes.float32, dtypes.float16, dtypes.int32)
    whole = {} if via_float else {Ops.ADD: "simd_sum({0})", Ops.MAX: "simd_max({0})"}
    return _xor_shuffle("simd_shuffle_xor({0}, (ushort)OFFSET)", via_float), whole
  if isinstance(ren, HIPRenderer): return _xor_shuffle("__shfl_xor({0}, OFFSET)", dtype not in NATIVE_SHUFFLE), {}
  if isinstance(ren, CUDARenderer):
    if threads % SHUFFLE_WIDTH and threads > SHUFFLE_WIDTH: return None
    mask = 0xffffffff if threads % SHUFFLE_WIDTH == 0 else (1 << threads) - 1
    return _xor_shuffle(f"__shfl_xor_sync({mask:#x}u, {{0}}, OFFSET)", dtype not in NATIVE_SHUFFLE), {}
  return None

def _elementwise(v:UOp, f:Callable[[UOp], UOp]) -> UOp:
  # after the expander an UPCAST value is a shaped vector: intrinsics work on scalars
  if v.shape == (): return f(v)
  return UOp.stack(*[f(v.index(i)) for i in range(v.shape[0])]) if len(v.shape) == 1 else \
         UOp.stack(*[_elementwise(v.index(i), f) for i in range(v.shape[0])])

def xor_partner(lane:UOp, offset:int) -> UOp:
  """lane ^ offset (offset a power of two) written so tinygrad's range analysis bounds it by the lanes: it bounds no XOR,
  so an index through one got a modulo with a negative-index fixup, whose select LLVM 15 (PoCL 3.1) miscompiles once
  PoCL keeps it per work-item across a barrier (it read the bits of a packed <N x i1> as bytes: wrong sums on CL)."""
  return (lane // (2*offset)) * (2*offset) + (lane % (2*offset) + offset) % (2*offset)

def smem_shuffle(lane:UOp, others:tuple[UOp, ...]) -> Callable[[UOp, int], UOp]:
  """An xor shuffle through local memory: every lane stores its value, then reads lane^offset's. Each step gets its own
  buffer (tinygrad's STAGE/bufferize, as its GROUP_REDUCE uses), so tinygrad's implicit barriers order store and load
  and no step overwrites a value another lane has yet to read."""
  def shuffle(v:UOp, offset:int) -> UOp:
    return v.bufferize(*others, lane, arg=BufferizeOpts(LANE_ID, AddrSpace.LOCAL)).index(*others, xor_partner(lane, offset))
  return shuffle

def lanes_map_to_hardware(sink:UOp, ren:Renderer) -> bool:
  """True when the local dims will not be merged or split by tinygrad's gpudims, so the lane range is the fastest dim."""
  dims = sorted([(r.arg[0:-1], r.vmax+1) for r in sink.toposort() if r.op is Ops.RANGE and r.arg[-1] in LOCAL_AXES])
  if not dims or dims[0][0][0] != LANE_ID or ren.local_max is None: return False
  return len(dims) <= len(ren.local_max) and all(isinstance(s, int) and s <= m for (_, s), m in zip(dims, ren.local_max))

def reduce_range(r:UOp, range_id:int) -> UOp|None:
  """The range of REDUCE r with this id (the lanes' or the warps'), if r reduces over it."""
  return next((x for x in r.src[1:] if x.op is Ops.RANGE and x.arg[0] == range_id), None)

def combine_lanes(ctx:tuple[Callable, dict]|None, r:UOp) -> UOp|None:
  if (lane:=reduce_range(r, LANE_ID)) is None: return None
  # the warps (REDUCE_LOCAL's past 32 lanes, or a GROUP's splitting the lanes' steps) combine after the lanes: tinygrad's
  # shared-memory reduce indexes its buffer by the ranges it reduces and the output's, not by lanes left in its source
  warps = tuple(x for x in r.src[1:] if x.op is Ops.RANGE and x.arg[-1] is AxisType.GROUP_REDUCE and x is not lane)
  rest = tuple(x for x in r.src[1:] if x is not lane and x not in warps)
  v = r.src[0] if not rest and r.arg[1] == 0 else r.replace(src=(r.src[0],)+rest)
  if ctx is None:
    # no register shuffles: a butterfly through local memory, indexed by the other local dims too; a whole (upcast)
    # vector goes through one buffer per step
    others = tuple(sorted([u for u in v.toposort() if u.op is Ops.RANGE and u.arg[-1] in LOCAL_AXES and u is not lane], key=lambda u: u.arg))
    shuffle, whole_warp, per_element = smem_shuffle(lane, warps + tuple(u for u in others if u not in warps)), {}, False
  else: (shuffle, whole_warp), per_element = ctx, True
  op, width = r.arg[0], lane.vmax+1
  if width == SHUFFLE_WIDTH and op in whole_warp:
    v = _elementwise(v, lambda x: intrinsic(whole_warp[op], x))
  else:
    offset = width // 2
    while offset:
      v = v.alu(op, _elementwise(v, lambda x, o=offset: shuffle(x, o)) if per_element else shuffle(v, offset))
      offset //= 2
  return UOp(Ops.REDUCE, r.dtype, (v,)+warps, (op, 0)) if warps else v

def workgroup_threads(sink:UOp) -> int: return prod(r.vmax+1 for r in sink.toposort() if r.op is Ops.RANGE and r.arg[-1] in LOCAL_AXES)

def smem_tree_bytes(sink:UOp, reduces:list[UOp]) -> int:
  """Local memory the butterfly through memory takes: a buffer per step, each a value per thread."""
  threads = workgroup_threads(sink)
  return sum(prod(r.shape) * r.dtype.itemsize * threads * (reduce_range(r, LANE_ID).vmax+1).bit_length() for r in reduces)

def reads_memory(u:UOp) -> bool: return any(x.op is Ops.INDEX for x in u.toposort())

def reduce_local_epilogue(sink:UOp, ren:Renderer) -> UOp:
  reduces = [u for u in sink.toposort() if u.op is Ops.REDUCE and reduce_range(u, LANE_ID) is not None]
  if not reduces: return sink
  # register shuffles need the lanes to be consecutive hardware threads; local memory works whatever the mapping. And
  # every shuffled value must read memory: tinygrad folds a condition to True inside the branch of a `where` it gates
  # (symbolic.fold_where_closure) unless the branch has an INDEX, and a shuffle's operand is the value of another lane,
  # where the condition (lane == 0) is false: a batch of 2x2 QRs, computed from constants, then summed lane 0's value
  # twice on an H100. Through local memory the operand is stored, and the load's INDEX keeps the fold out
  shufflable = all(reads_memory(r.src[0]) for r in reduces)
  epilogue = warp_epilogue(ren, reduces[0].dtype, workgroup_threads(sink)) if shufflable and lanes_map_to_hardware(sink, ren) else None
  # the tree through memory needs a buffer per step: where that does not fit (opts after REDUCE_LOCAL add rows and
  # threads), the lanes stay a GROUP_REDUCE and tinygrad's one-buffer shared-memory reduce combines them
  if epilogue is None and smem_tree_bytes(sink, reduces) > ren.shared_max: return sink
  return graph_rewrite(sink, PatternMatcher([(UPat(Ops.REDUCE, name="r"), combine_lanes)]), ctx=epilogue, name="reduce_local: lane epilogue")

def _is_intrinsic(x:UOp) -> bool: return isinstance(x.arg, str) and x.arg.startswith(INTRINSICS)
def _scalar_operand(u:UOp) -> UOp:
  # tinygrad loads an accumulator for ALU consumers only, and a one-element register accumulator has shape (1,):
  # a shuffle must read the value, as a scalar
  u = maybe_load(u)
  return u.reshape(()) if shape_or_none(u) not in ((), None) and prod(u.shape) == 1 else u
pm_load_intrinsic_operands = PatternMatcher([
  (UPat(Ops.CUSTOM, name="x"), lambda x: x.replace(src=srcs) if _is_intrinsic(x) and (srcs:=tuple(map(_scalar_operand, x.src))) != x.src else None),
])

BEAM_ACTIONS = tuple(Opt(OptOpsExt.REDUCE_LOCAL, axis, amt) for amt in (4, 8, 16, 32, 64, 128, 256) for axis in range(3))

REDUCE_LOCAL = register(Pass("reduce_local", "splits a reduce over warp lanes (lane innermost) and combines them with register shuffles",
  (SchedulerOpt(OptOpsExt.REDUCE_LOCAL, apply_reduce_local, BEAM_ACTIONS, guard_lanes), CodegenStep("expander", reduce_local_epilogue),
   MatcherRules("pm_add_loads", pm_load_intrinsic_operands))))
