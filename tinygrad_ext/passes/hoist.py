"""hoist: loop-invariant factors and gates leave the reduce ranges they do not depend on.

A fused dequant matvec sums x[b,j] * (q[b,j] - 8) * d[b] over the blocks b and the elements j of each block: the scale
d[b] is the same for every j, yet it is converted and multiplied once per element. This pass rewrites
  REDUCE(ADD, f * g, R)  ->  REDUCE(ADD, f * REDUCE(ADD, g, I), R \\ I)
where I are the reduce ranges (loops or unrolled axes inside one thread) that the factor f does not read, so a per-block
scale is applied once per block. Loads need no moving: tinygrad's linearizer already places a load by the ranges it
reads (a Q4_0 scale is read once per block); what stayed in the inner range was the ALU of the factor. A factor that
reads a buffer the kernel also stores to is never moved (the store could change it between iterations).

A half-precision matmul hides the factor behind casts, float(x_h * half(q * d)), and keeps it: evaluating those half
products in float32 (and dropping the weight's rounding to half) would change what overflows (a product or a
conversion past 65504 is inf in half, finite in float32), so the pass would compute something else than the program
where values are large (the fuzzer's int64 extremes cast to half). A model that wants the scale hoisted multiplies in
float32: float(x_h) * (q * d), as GLM's mixed numerics policy does.

A gate leaves the sum the same way. A MoE matvec's weight is addressed through an expert id checked against the expert
count, and that check selects every dequantized element against 0 and every weight word it loads (packed_loads): 44
selects a Q4_0 loop step of two rows. Where the summand has a factor `where(c, t, 0)` whose c reads none of the sum's
ranges, REDUCE(ADD, s) is where(c, REDUCE(ADD, s'), 0), with s' the summand where c holds: its selects on c take their
true side, and its gated loads read at their index with the gated expressions clamped into the bounds the gate puts on
them (shared.clamped_root) where that stays inside the buffer: the same address wherever c holds, a valid one
where it does not, whose value the outer select then drops. A load whose clamped index cannot be bounded keeps its gate.

Hook: a CodegenStep after tinygrad's "postopt symbolic", the step before the expander (ranges still carry their types).
"""
from __future__ import annotations
import functools
from tinygrad.uop.ops import UOp, Ops, AxisType, PatternMatcher, UPat, graph_rewrite
from tinygrad.dtype import dtypes, Invalid
from tinygrad.helpers import prod
from tinygrad.renderer import Renderer
from tinygrad_ext import Pass, CodegenStep, register
from tinygrad_ext.passes.shared import clamped_root, reads_inside, stored_buffers

# ranges a single thread iterates (a loop) or holds unrolled; lanes and warps (GROUP_REDUCE) are other threads' work
INNER_AXES = (AxisType.REDUCE, AxisType.UNROLL)

def factors(v:UOp) -> list[UOp]:
  """v as a product of factors. A select of a product against 0 is the product of the selected factors (both are 0
  where the condition fails, and 0*0 is 0)."""
  if v.op is Ops.MUL: return [*factors(v.src[0]), *factors(v.src[1])]
  if v.op is Ops.WHERE and v.src[1].op is Ops.MUL and v.src[2].op is Ops.CONST and v.src[2].arg == 0:
    c = v.src[0]
    return [*factors(c.where(v.src[1].src[0], v.src[2])), *factors(c.where(v.src[1].src[1], v.src[2]))]
  return [v]

def reads(u:UOp) -> set[UOp]: return {x.src[0] for x in u.toposort() if x.op is Ops.INDEX and x.src[0].op is Ops.PARAM}

def split_invariant(fs:list[UOp], inner_candidates:set[UOp], stored:set[UOp]) -> tuple[list[UOp], list[UOp], set[UOp]]|None:
  """(invariant factors, the rest, inner ranges I) for the I that saves the most per-element work, or None."""
  dep = [set(f.ranges) & inner_candidates for f in fs]
  movable = [not (reads(f) & stored) for f in fs]
  best = None
  for f_dep in {frozenset(d) for d, m in zip(dep, movable) if m}:
    if not (inner:=set().union(*dep) - f_dep): continue
    inv = [i for i, (d, m) in enumerate(zip(dep, movable)) if m and not d & inner]
    score = (prod(r.vmax+1 for r in inner), len(inv))
    if best is None or score > best[0]: best = (score, inv, inner)
  if best is None: return None
  _, inv, inner = best
  return [fs[i] for i in inv], [f for i, f in enumerate(fs) if i not in inv], inner

def hoist_factors(ctx:set[UOp], r:UOp) -> UOp|None:
  # ctx: the buffers the kernel stores to
  if r.arg != (Ops.ADD, 0) or r.dtype != dtypes.float32: return None
  rngs = [x for x in r.src[1:] if x.op is Ops.RANGE]
  if len(rngs) != len(r.src) - 1: return None
  candidates = {x for x in rngs if x.arg[-1] in INNER_AXES}
  if (split:=split_invariant(factors(r.src[0]), candidates, ctx)) is None: return None
  inv, rest, inner = split
  # rest is never empty: some factor reads the inner ranges (that is how they were chosen)
  inner_sum = functools.reduce(UOp.__mul__, rest).reduce(*[x for x in rngs if x in inner], arg=(Ops.ADD, 0))
  hoisted = functools.reduce(UOp.__mul__, inv, inner_sum)
  outer = [x for x in rngs if x not in inner]
  return hoisted.reduce(*outer, arg=(Ops.ADD, 0)) if outer else hoisted

# *** a loop-invariant gate leaves the sum ***

def is_zero(u:UOp) -> bool: return u.op is Ops.CONST and u.arg == 0

def invariant_gate(r:UOp, stored:set[UOp]) -> UOp|None:
  """c of a factor where(c, t, 0) of r's summand that reads none of r's ranges and no buffer the kernel stores to."""
  rngs = set(r.src[1:])
  return next((f.src[0] for f in factors(r.src[0]) if f.op is Ops.WHERE and is_zero(f.src[2]) and f.src[0].op is not Ops.CONST
               and not set(f.src[0].ranges) & rngs and not reads(f.src[0]) & stored), None)

def index_where_gate_holds(buf:UOp, idx:UOp, gate:UOp) -> UOp|None:
  """idx with what the gate bounds clamped into those bounds, where every value it then takes is inside buf; else None."""
  if buf.op is not Ops.PARAM or (clamped:=clamped_root(idx, gate)) is None: return None
  return clamped if reads_inside(buf, clamped) else None

# the summand where the gate (ctx) holds: its selects on the gate take their true side, its gated loads read ungated
pm_gate_holds = PatternMatcher([
  (UPat(Ops.INDEX, src=(UPat.var("buf"), UPat(Ops.WHERE, src=(UPat.var("g"), UPat.var("idx"), UPat(Ops.CONST, arg=Invalid))))),
   lambda ctx, buf, g, idx: buf.index(i) if g is ctx and (i:=index_where_gate_holds(buf, idx, g)) is not None else None),
  (UPat(Ops.WHERE, src=(UPat.var("g"), UPat.var("t"), UPat.var("f"))),
   lambda ctx, g, t, f: t if g is ctx and not (f.op is Ops.CONST and f.arg is Invalid) else None),
])

def hoist_gate(ctx:set[UOp], r:UOp) -> UOp|None:
  # ctx: the buffers the kernel stores to
  if r.arg[0] is not Ops.ADD or not dtypes.is_float(r.dtype) or (gate:=invariant_gate(r, ctx)) is None: return None
  body = graph_rewrite(r.src[0], pm_gate_holds, ctx=gate, name="hoist: the summand where its gate holds")
  return gate.where(r.replace(src=(body, *r.src[1:])), r.const_like(0))

def hoist_invariant_factors(sink:UOp, ren:Renderer) -> UOp:
  if not any(u.op is Ops.REDUCE for u in sink.toposort()): return sink
  stored = stored_buffers(sink)
  sink = graph_rewrite(sink, PatternMatcher([(UPat(Ops.REDUCE, name="r"), hoist_factors)]), ctx=stored, name="hoist: invariant factors")
  return graph_rewrite(sink, PatternMatcher([(UPat(Ops.REDUCE, name="r"), hoist_gate)]), ctx=stored, name="hoist: invariant gates")

HOIST = register(Pass("hoist", "loop-invariant factors (a quant block's scale) and gates (a MoE expert id's check) leave the reduce ranges they do not read",
                      (CodegenStep("postopt symbolic", hoist_invariant_factors),)))
