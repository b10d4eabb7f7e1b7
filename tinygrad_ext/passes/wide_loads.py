"""wide_loads: a matvec lane reads its fp16 activations as 16-byte half8 loads where tinygrad gave two 8-byte half4.

tinygrad's memory coalescing (tinygrad.codegen.late.coalesce) groups a half buffer's loads 4 at a time (8 only under
the process-wide ALLOW_HALF8). A lane of a REDUCE_LOCAL matvec reads 8 or 16 consecutive activations per step, so it
issues two half4 loads where one half8 load would do: on an H200 each warp-wide half4 load touches 16 sectors for 256
bytes, a half8 load the same 16 for 512. This pass merges two half4 loads of one half buffer at root+o and root+o+4
into one half8 load at root+o where the index arithmetic proves root+o a multiple of 8 elements (`UOp.divides`, as
tinygrad's coalescing checks its own lengths); the users of the second half4 read elements 4..7 of the half8.

A multiple of 8 elements is 16 bytes from the buffer's start; the buffer's start is 16-byte aligned because tinygrad's
allocators and its memory planner hand out (at least) 256-byte aligned buffers, and this pass's ViewGuard copies,
instead of viewing, a contiguous slice of a realized half buffer that starts off a 16-byte boundary (tinygrad views
such slices in place at any element: `a[:, 3:].contiguous()` is a view 6 bytes in).

Where it fires, what was measured (LOG.md, 2026-12-02, "wide_loads"): CUDA C only (half8 is
CUDA's 16-byte vector load; Metal has no 8-wide half vectors, PTX and the emulator no pointer casts, and OpenCL on PoCL
reads half as ushort), in kernels that split their reduce over lanes with REDUCE_LOCAL and not over warps with a GROUP
(there half8 measured slower: attn_output 4.6 -> 5.1 us in one run).

Hooks: a CodegenStep after tinygrad's "add images" step (right after its memory coalescing), and a ViewGuard on
tinygrad.tensor._make_buffer_view.
"""
from __future__ import annotations
from collections import defaultdict
from tinygrad.uop.ops import UOp, Ops
from tinygrad.codegen.opt import OptOps
from tinygrad.dtype import dtypes, AddrSpace
from tinygrad.renderer import Renderer
from tinygrad.renderer.cstyle import CUDARenderer
from tinygrad_ext import Pass, CodegenStep, ViewGuard, register
from tinygrad_ext.passes.reduce_local import OptOpsExt
from tinygrad_ext.passes.shared import root_and_offset

NAME = "wide_loads"
NARROW, WIDE = 4, 8     # half4 (8 bytes) -> half8 (16 bytes)
ALIGN_BYTES = WIDE * dtypes.half.itemsize

def fires_in(sink:UOp) -> bool:
  """A kernel whose reduce REDUCE_LOCAL spread over lanes, and no GROUP spread over warps (half8 measured slower there)."""
  opts = sink.arg.applied_opts if sink.arg is not None else ()
  return any(o.op is OptOpsExt.REDUCE_LOCAL for o in opts) and not any(o.op in (OptOps.GROUP, OptOps.GROUPTOP) for o in opts)

def half4_load(u:UOp) -> tuple[UOp, UOp, int]|None:
  """(buffer, root, offset) of an ungated half4 load of a global half buffer, as tinygrad's coalescing builds it:
  LOAD(SHRINK(PARAM, root + offset, 4))."""
  if u.op is not Ops.LOAD or len(u.src) != 1 or (shr:=u.src[0]).op is not Ops.SHRINK: return None
  buf, start, length = shr.src
  if buf.op is not Ops.PARAM or buf.dtype != dtypes.half or buf.addrspace is not AddrSpace.GLOBAL: return None
  if length.op is not Ops.CONST or length.arg != NARROW or start.get_valid().op is not Ops.CONST or not start.get_valid().arg: return None
  return (buf, *root_and_offset(start))

def wide_half_loads(sink:UOp, ren:Renderer) -> UOp:
  if not isinstance(ren, CUDARenderer) or not fires_in(sink): return sink
  loads: defaultdict[tuple[UOp, UOp], dict[int, UOp]] = defaultdict(dict)
  elements: defaultdict[UOp, list[UOp]] = defaultdict(list)  # a load's users that take one element (INDEX by a constant)
  uses: defaultdict[UOp, int] = defaultdict(int)             # all its users
  for u in sink.toposort():
    if (found:=half4_load(u)) is not None: loads[found[:2]].setdefault(found[2], u)
    if u.op is Ops.INDEX and len(u.src) == 2 and u.src[1].op is Ops.CONST: elements[u.src[0]].append(u)
    for s in u.src: uses[s] += 1
  subs: dict[UOp, UOp] = {}
  for (buf, root), by_offset in loads.items():
    offsets = sorted(by_offset)
    i = 0
    while i < len(offsets):
      o = offsets[i]
      lo, hi = by_offset[o], by_offset.get(o + NARROW)
      # each half4 load's value is used only through its elements: anything else keeps the pair apart
      if hi is None or (root + o).divides(WIDE) is None or any(len(elements[ld]) != uses[ld] for ld in (lo, hi)):
        i += 1
        continue
      shr = lo.src[0]
      wide = lo.replace(src=(shr.replace(src=(shr.src[0], shr.src[1], shr.src[2].replace(arg=WIDE))),))
      for part, ld in ((0, lo), (NARROW, hi)):
        for ix in elements[ld]: subs[ix] = wide.index(ix.src[1].replace(arg=ix.src[1].arg + part))
      i += 2
  return sink.substitute(subs, name="wide_loads") if subs else sink

def aligned_view(src:UOp) -> bool:
  """A view of a realized buffer for a contiguous slice is allowed unless it is half and starts off a 16-byte boundary
  (DISK views are reads of files, never a kernel's buffer: always allowed)."""
  if src.dtype != dtypes.half: return True
  devices = src.device if isinstance(src.device, tuple) else (src.device,)
  if any(str(d).startswith("DISK") for d in devices) or (cv:=src.contiguous_view()) is None: return True
  buf, offset = cv
  return (offset * buf.element_size()) % ALIGN_BYTES == 0

WIDE_LOADS = register(Pass(NAME, "a REDUCE_LOCAL matvec's adjacent half4 activation loads become one half8 load (16-byte alignment proven from "
                                 "the index; half views off 16 bytes are copied)",
                           (CodegenStep("add images", wide_half_loads), ViewGuard(aligned_view))))
