"""early_loads: a load that no loop needs, but that a kernel issues after its loop, is issued before the loop.

tinygrad's linearizer places a kernel's epilogue after its reduce loop: a matvec that adds the residual it is part of
(attn_output: h = x + o @ W) loads x only once the loop has ended, and GLM's MoE output kernel, the shared expert's down
matvec beside the weighted sum over the 4 selected experts' rows, loads the expert ids, their routing scores and the 4
rows after the loop, each load waiting on the one before it. Every such load is a round trip to memory (about a
microsecond on the H200) that follows the loop instead of overlapping it. None of them depends on the loop, so they may
be issued before it, their values held in registers through it.

Hook: Linearized (the program order tinygrad.codegen.linearize returns). A load moves, with the address arithmetic and
the loads it depends on, to before the first loop, branch or barrier, when all of it is outside every loop and branch,
and it reads a global buffer that the kernel does not store to (no write of the kernel can be reordered with it). At
most MAX_ELEMENTS loaded values a thread move, so the registers they hold through the loop stay few.
"""
from __future__ import annotations
from tinygrad.uop.ops import UOp, Ops
from tinygrad_ext import Pass, Linearized, register

MAX_ELEMENTS = 32
CONTROL = (Ops.RANGE, Ops.END, Ops.IF, Ops.ENDIF, Ops.BARRIER)
# what a load outside the loop may be computed from: the kernel's arguments and thread ids, and arithmetic on them
# (a register or shared buffer, an AFTER or a STORE depends on what the kernel did before)
NOT_MOVABLE = (*CONTROL, Ops.AFTER, Ops.STORE, Ops.BUFFER, Ops.CUSTOM, Ops.CUSTOMI)

def global_buffer(load:UOp) -> UOp|None:
  """The kernel argument a load reads, or None (a register, a shared buffer)."""
  buf = load.src[0]
  while buf.op in (Ops.INDEX, Ops.SHRINK, Ops.CAST): buf = buf.src[0]  # an element, a vector of them, a wider word's pointer
  return buf if buf.op is Ops.PARAM else None

def early_loads(lst:list[UOp]) -> list[UOp]:
  if (first:=next((i for i, u in enumerate(lst) if u.op in CONTROL), None)) is None: return lst
  stored = {global_buffer(u) for u in lst if u.op is Ops.STORE}
  placed, moved, budget, branch_depth = set(lst[:first]), {}, MAX_ELEMENTS, 0
  def movable(x:UOp) -> bool:
    return x.op not in NOT_MOVABLE and not x.ranges and (x.op is not Ops.LOAD or (b:=global_buffer(x)) is not None and b not in stored)
  for u in lst[first:]:
    branch_depth += (u.op is Ops.IF) - (u.op is Ops.ENDIF)
    if u.op is not Ops.LOAD or u in moved or branch_depth or not movable(u): continue
    deps = [x for x in u.toposort() if x not in placed and x not in moved]
    if not all(movable(x) for x in deps): continue
    if (need:=sum(x.max_numel() for x in deps if x.op is Ops.LOAD)) > budget: continue
    budget -= need
    moved.update(dict.fromkeys(deps))
  if not moved: return lst
  # toposort lists sources first, and each dependency is moved before the load that needs it: the moved run stays ordered
  return lst[:first] + list(moved) + [u for u in lst[first:] if u not in moved]

EARLY_LOADS = register(Pass("early_loads", "a load no loop needs, issued after the loop (a matvec's residual, a side reduce's inputs), is issued before it",
                            (Linearized(early_loads),)))
