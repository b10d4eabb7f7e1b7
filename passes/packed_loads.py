"""packed_loads: adjacent byte loads of one buffer become one 2- or 4-byte load, then shifts and masks.

A Q4_0 block is 18 bytes (an fp16 scale, 16 bytes of nibbles): tinygrad reads it with 18 single-byte loads, because its
memory coalescing (tinygrad.codegen.late.coalesce) vectorizes float/half/int buffers only. This pass groups loads from a
uint8/int8 buffer whose indices are one root expression plus consecutive constants, and replaces each run of 2 (or 4)
with one ushort (uint) load where the index arithmetic proves the run's first byte is 2- (4-) aligned: the root divides
by the width (`UOp.divides`, as tinygrad's coalescing checks). The bytes are then (word >> 8*i) & 0xff: GPUs and the CPUs
tinygrad targets are little-endian. Runs whose alignment cannot be proven keep their byte loads.

Hook: a CodegenStep after tinygrad's "add images" step, the one right after its memory coalescing.
"""
from __future__ import annotations
import itertools
from collections import defaultdict
from tinygrad.uop.ops import UOp, Ops
from tinygrad.dtype import dtypes, AddrSpace
from tinygrad.renderer import Renderer
from tinygrad_ext import Pass, CodegenStep, register

BYTE_DTYPES = (dtypes.uint8, dtypes.int8)
WORDS = {4: dtypes.uint32, 2: dtypes.uint16}

def _root_and_offset(idx:UOp) -> tuple[UOp, int]:
  # as tinygrad's memory coalescing splits an index: a root expression plus a constant
  if idx.op is Ops.ADD and idx.src[1].op is Ops.CONST and isinstance(idx.src[1].arg, int): return idx.src[0], idx.src[1].arg
  if idx.op is Ops.ADD and idx.src[0].op is Ops.CONST and isinstance(idx.src[0].arg, int): return idx.src[1], idx.src[0].arg
  return idx, 0

def packed_byte_loads(sink:UOp, ren:Renderer) -> UOp:
  # (buffer, gate, root) -> offset -> loads; a gated load (MoE: the expert id is checked against the expert count) joins
  # runs of the same gate only, and its word is loaded under that gate
  runs: defaultdict[tuple[UOp, UOp|None, UOp], dict[int, list[UOp]]] = defaultdict(dict)
  for u in sink.toposort():
    if u.op is not Ops.LOAD or len(u.src) != 1 or u.src[0].op is not Ops.INDEX or len(u.src[0].src) != 2: continue
    buf, idx = u.src[0].src
    if buf.op is not Ops.PARAM or buf.dtype not in BYTE_DTYPES or buf.addrspace is not AddrSpace.GLOBAL or u.shape != (): continue
    gate = idx.get_valid()
    if (gate.op is Ops.CONST and not gate.arg) or idx.get_idx().op is Ops.CONST: continue  # never valid, or a constant index
    if gate.op is Ops.CONST: gate = None
    root, off = _root_and_offset(idx.get_idx())
    runs[(buf, gate, root)].setdefault(off, []).append(u)
  subs: dict[UOp, UOp] = {}
  for (buf, gate, root), by_offset in runs.items():
    for _, grp in itertools.groupby(enumerate(sorted(by_offset)), lambda x: x[1]-x[0]):
      offsets = [o for _, o in grp]
      while offsets:
        start = root + offsets[0]
        width = next((w for w in WORDS if w <= len(offsets) and start.divides(w) is not None), 1)
        if width > 1:
          word = buf.index(start if gate is None else start.valid(gate)).cast(WORDS[width]).load()
          # tinygrad gates a load through its INDEX, a pointer cast hides that: the invalid index is clamped to a valid
          # address and the gate selects 0 here, as a gated byte load yields
          if gate is not None: word = gate.where(word, word.const_like(0))
          for i, off in enumerate(offsets[:width]):
            byte = ((word >> (8*i)) & 0xff).cast(dtypes.uint8)
            for ld in by_offset[off]: subs[ld] = byte if buf.dtype == dtypes.uint8 else byte.bitcast(buf.dtype)
        offsets = offsets[width:]
  return sink.substitute(subs, name="packed_loads") if subs else sink

PACKED_LOADS = register(Pass("packed_loads", "adjacent byte loads become one 2/4-byte load (alignment proven from the index) plus shifts and masks",
                             (CodegenStep("add images", packed_byte_loads),)))
