"""hoist: loop-invariant factors leave the reduce ranges they do not depend on.

A fused dequant matvec sums x[b,j] * (q[b,j] - 8) * d[b] over the blocks b and the elements j of each block: the scale
d[b] is the same for every j, yet it is converted and multiplied once per element. This pass rewrites
  REDUCE(ADD, f * g, R)  ->  REDUCE(ADD, f * REDUCE(ADD, g, I), R \\ I)
where I are the reduce ranges (loops or unrolled axes inside one thread) that the factor f does not read, so a per-block
scale is applied once per block. Loads need no moving: tinygrad's linearizer already places a load by the ranges it
reads (a Q4_0 scale is read once per block); what stayed in the inner range was the ALU of the factor. A factor that
reads a buffer the kernel also stores to is never moved (the store could change it between iterations).

A half-precision matmul hides the factor behind casts: float(x_h * half(q * d)) rounds every product to half. Where a
factor can be hoisted, those half products of the float32 sum are evaluated in float32 (float(a_h * b_h) ->
float(a_h) * float(b_h), float(half(y)) -> y): one rounding to half fewer per element, so the result moves closer to
the exact sum (tested against float64), as C allows evaluating half expressions at a higher precision
(FLT_EVAL_METHOD). Sums whose value has no hoistable factor keep their casts exactly.

Hook: a CodegenStep after tinygrad's "postopt symbolic", the step before the expander (ranges still carry their types).
"""
from __future__ import annotations
import functools
from tinygrad.uop.ops import UOp, Ops, AxisType, PatternMatcher, UPat, graph_rewrite
from tinygrad.dtype import dtypes
from tinygrad.helpers import prod
from tinygrad.renderer import Renderer
from tinygrad_ext import Pass, CodegenStep, register

# ranges a single thread iterates (a loop) or holds unrolled; lanes and warps (GROUP_REDUCE) are other threads' work
INNER_AXES = (AxisType.REDUCE, AxisType.UNROLL)
NARROW_FLOATS = (dtypes.half, dtypes.bfloat16)

pm_widen = PatternMatcher([
  (UPat(Ops.CAST, dtypes.float32, src=(UPat(Ops.MUL, NARROW_FLOATS, src=(UPat.var("a"), UPat.var("b"))),)),
   lambda a, b: a.cast(dtypes.float32) * b.cast(dtypes.float32)),
  (UPat(Ops.CAST, dtypes.float32, src=(UPat(Ops.CAST, NARROW_FLOATS, src=(UPat.var("y", dtypes.float32),)),)), lambda y: y),
  # a gated weight (MoE: the expert id is checked against the expert count): the cast moves inside the select
  (UPat(Ops.CAST, dtypes.float32, src=(UPat(Ops.WHERE, src=(UPat.var("c"), UPat.var("t"), UPat.var("f"))),)),
   lambda c, t, f: c.where(t.cast(dtypes.float32), f.cast(dtypes.float32))),
  (UPat(Ops.CAST, dtypes.float32, src=(UPat(Ops.CONST, name="k"),)), lambda k: UOp.const(k.arg, dtypes.float32)),
])

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
  # the value as it is, else with its half products widened (only when that exposes a factor)
  if (split:=split_invariant(factors(r.src[0]), candidates, ctx)) is None and \
     (split:=split_invariant(factors(graph_rewrite(r.src[0], pm_widen, name="hoist: widen half products")), candidates, ctx)) is None: return None
  inv, rest, inner = split
  # rest is never empty: some factor reads the inner ranges (that is how they were chosen)
  inner_sum = functools.reduce(UOp.__mul__, rest).reduce(*[x for x in rngs if x in inner], arg=(Ops.ADD, 0))
  hoisted = functools.reduce(UOp.__mul__, inv, inner_sum)
  outer = [x for x in rngs if x not in inner]
  return hoisted.reduce(*outer, arg=(Ops.ADD, 0)) if outer else hoisted

def hoist_invariant_factors(sink:UOp, ren:Renderer) -> UOp:
  if not any(u.op is Ops.REDUCE for u in sink.toposort()): return sink
  stored = {x.src[0].src[0] for x in sink.toposort() if x.op is Ops.STORE and x.src[0].op is Ops.INDEX}
  return graph_rewrite(sink, PatternMatcher([(UPat(Ops.REDUCE, name="r"), hoist_factors)]), ctx=stored, name="hoist: invariant factors")

HOIST = register(Pass("hoist", "loop-invariant factors (a quant block's scale) leave the reduce ranges they do not read",
                      (CodegenStep("postopt symbolic", hoist_invariant_factors),)))
