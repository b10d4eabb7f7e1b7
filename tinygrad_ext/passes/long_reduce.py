"""long_reduce: a reduce that each thread would walk serially, in a kernel of few threads, is spread over warp lanes.

tinygrad splits a reduce across threads only where the split divides its length (GROUP/GROUPTOP); a reduce over a
symbolic length (decode attention's sum over the positions so far) or over a length with no warp-sized divisor (the
argmax over a 154880-entry vocab, which tinygrad's split_reduceop cuts into 256 x 605) then runs as one serial loop per
output. With few outputs the GPU sits idle on that loop: on an H200 the attention's probs @ latent cache took 7.2 us at
70 positions on 640 threads, each argmax stage 38 us on 256 threads.

This heuristic takes kernels with one ADD or MAX reduce over one axis that is symbolic, or static, at least LONG long
and not divisible by a warp; or divisible, with more outputs than tinygrad's GROUPTOP takes (2048) but too few to fill
the GPU with serial sums (MAX_OUTPUTS): a prefill chunk's float32 router, 512 tokens x 64 experts over 2048, ran in 16
blocks at 207 us a call on the H100. It applies
  - REDUCE_LOCAL over a warp's lanes (the axis padded to a multiple of the lanes where they do not divide it: the
    padding is gated off the loads and counted as the reduce's identity), and
  - UPCAST 4 on output axes that make loads wider (the output is the fastest index of a read buffer) or reuse them
    (a buffer does not read the output: attention's latent cache is shared by every head), up to 16 outputs per lane.
It takes the same way a kernel whose outputs are symbolic in number and whose static reduce the lanes divide (attention's
q.k, 20 heads x the positions so far): tinygrad's heuristic gives each output 16 threads through shared memory, here a
warp shuffles it for 4 heads at once, so each cached row is loaded once for 4 heads.
Kernels it does not take go on to tinygrad's heuristic, and so do kernels tinygrad would run on tensor cores (a prefill
chunk's q.k over KV_BLOCK-aligned positions: the lanes would keep the tensor cores off).

Hook: an OptHeuristic (tinygrad.codegen.apply_opts), after the matvec heuristic.
"""
from __future__ import annotations
from tinygrad.uop.ops import UOp, Ops, AxisType
from tinygrad.helpers import prod
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad_ext import Pass, OptHeuristic, register
from tinygrad_ext.passes.reduce_local import OptOpsExt, COMBINES, LANE_DTYPES, SHUFFLE_WIDTH, warp_epilogue
from tinygrad_ext.passes.shared import store_targets, tensor_cores_take

NAME = "long_reduce"
LONG = 256            # a static reduce at least this long that no warp divides is split
MAX_OUTPUTS = 1 << 16 # kernels with more outputs than this have threads enough to hide a serial reduce
GROUPED_OUTPUTS = 2048  # tinygrad's heuristic splits a reduce over threads (GROUPTOP) only for this many outputs or fewer
UPCAST = 4
MAX_UPCAST = 16       # accumulators per lane: each is a value in the shuffle epilogue

def lanes_for(ren, dtype) -> int:
  # a warp where the renderer shuffles registers; elsewhere the lanes combine through shared memory, a barrier a step
  return SHUFFLE_WIDTH if warp_epilogue(ren, dtype, SHUFFLE_WIDTH) is not None else 16

def stride_one(idx:UOp, rng:UOp) -> bool:
  """idx advances by exactly one element when rng does: the range is the fastest index of the buffer."""
  at = UOp.variable("long_reduce_probe", 0, rng.vmax, rng.dtype)  # a fresh name: rng+1 in place of rng would recurse
  step = (idx.substitute({rng: at + 1}) - idx.substitute({rng: at})).simplify()
  return step.op is Ops.CONST and step.arg == 1

def upcast_axes(k, out_axes:list[int]) -> list[int]:
  """The output axes worth an UPCAST: reads get wider along them, or some read is shared by all their outputs."""
  stores, red = store_targets(k.ast), k.rngs[k.axes_of(AxisType.REDUCE)[0]]
  # the reads inside the reduce loop (a value read once per output, such as the max an argmax compares with, is no reuse)
  loads = [idx for b in k.bufs if b not in stores and red in (idx:=b.src[1].get_idx()).backward_slice_with_self]
  picked = []
  for i in out_axes:
    rng = k.rngs[i]
    if any(stride_one(idx, rng) for idx in loads): picked.insert(0, i)       # wider loads first
    elif any(rng not in idx.backward_slice_with_self for idx in loads): picked.append(i)
  return picked

def choose_long_reduce_opts(k):
  if len(reds:=k.reduceops) != 1 or reds[0].arg[0] not in COMBINES or reds[0].dtype not in LANE_DTYPES: return None
  if len(red_axes:=k.axes_of(AxisType.REDUCE)) != 1 or not k.ren.has_local or k.dont_use_locals: return None
  size, outs, lanes = k.full_shape[red_axes[0]], k.axes_of(AxisType.GLOBAL), lanes_for(k.ren, reds[0].dtype)
  static_outs = [i for i in outs if isinstance(k.full_shape[i], int)]
  if len(static_outs) == len(outs):
    if (n_outs:=prod(k.full_shape[i] for i in outs)) > MAX_OUTPUTS: return None
    # a reduce the lanes divide is tinygrad's GROUP's where it has few outputs; with more (a prefill chunk's float32
    # router, 512 tokens x 64 experts over 2048) tinygrad walks it serially: 16 blocks, 207 us a call on the H100
    if isinstance(size, int) and (size < LONG or (size % lanes == 0 and n_outs <= GROUPED_OUTPUTS)): return None
  # symbolic outputs (attention's q.k over the positions so far): tinygrad's heuristic groups each output's reduce over
  # 16 threads through shared memory; a warp's lanes shuffle it, and an output axis the positions' row does not read
  # (the heads) is upcast, so each row is read once for several heads
  elif not isinstance(size, int) or size % lanes != 0: return None
  if tensor_cores_take(k): return None  # a prefill chunk's q.k: TC tiles, not lanes (asked last: it tries an opt)
  # the upcasts first: REDUCE_LOCAL counts them in the shared memory that combining warps would take
  upcast = 1
  for i in upcast_axes(k, static_outs):
    if k.full_shape[i] % UPCAST == 0 and upcast * UPCAST <= MAX_UPCAST:
      k.apply_opt(Opt(OptOps.UPCAST, i, UPCAST))
      upcast *= UPCAST
  k.apply_opt(Opt(OptOpsExt.REDUCE_LOCAL, 0, lanes))
  return k

LONG_REDUCE = register(Pass(NAME, "spreads a long serial reduce (a symbolic length, or one no warp divides) over padded warp lanes",
                            (OptHeuristic(choose_long_reduce_opts),)))
