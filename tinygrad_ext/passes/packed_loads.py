"""packed_loads: adjacent byte loads of one buffer become one 2- or 4-byte load, then shifts and masks.

A Q4_0 block is 18 bytes (an fp16 scale, 16 bytes of nibbles): tinygrad reads it with 18 single-byte loads, because its
memory coalescing (tinygrad.codegen.late.coalesce) vectorizes float/half/int buffers only. This pass groups loads from a
uint8/int8 buffer whose indices are one root expression plus consecutive constants, and replaces each run of 2 (or 4)
with one ushort (uint) load where the index arithmetic proves the run's first byte is 2- (4-) aligned: the root divides
by the width (`UOp.divides`, as tinygrad's coalescing checks). The bytes are then (word >> 8*i) & 0xff: GPUs and the CPUs
tinygrad targets are little-endian. Runs whose alignment cannot be proven keep their byte loads.

Gated loads (MoE: the weight is addressed through an expert id checked against the expert count) pack with loads of the
same gate, and a word selects 0 where the gate fails, as the gated bytes gave. tinygrad gates an index by selecting it
(`gate ? idx : 0`), one select and one 64-bit address a word: 10 a Q4_0 loop step of a MoE matvec. Where every clause of
the gate bounds an integer expression, the root is computed once with those expressions clamped into their bounds
instead, and the words are read ungated at root + offset if that stays inside the buffer for every value the clamped
root can take: the same address wherever the gate holds, a valid one where it does not.

Only where the renderer is a C-style one (C, OpenCL, Metal, CUDA C), whose pointer casts read a word through a byte
buffer's index: tinygrad's PTX renderer has no load through a cast pointer (DEV=CUDA:PTX failed to render every Q4_0
matvec), and its PYTHON emulator executes the UOps themselves.

Hook: a CodegenStep after tinygrad's "add images" step, the one right after its memory coalescing.
"""
from __future__ import annotations
import itertools
from collections import defaultdict
from tinygrad.uop.ops import UOp, Ops
from tinygrad.dtype import dtypes, AddrSpace
from tinygrad.renderer import Renderer
from tinygrad.renderer.cstyle import CStyleLanguage
from tinygrad_ext import Pass, CodegenStep, register
from tinygrad_ext.passes.shared import root_and_offset, clamped_root, reads_inside, BYTE_DTYPES

WORDS = {4: dtypes.uint32, 2: dtypes.uint16}

def packed_byte_loads(sink:UOp, ren:Renderer) -> UOp:
  # a word read through a uint8 buffer's index is a pointer cast: C-style renderers only (PTX has no load through one,
  # the PYTHON emulator no pointers); elsewhere the bytes stay bytes
  if not isinstance(ren, CStyleLanguage): return sink
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
    root, off = root_and_offset(idx.get_idx())
    runs[(buf, gate, root)].setdefault(off, []).append(u)
  subs: dict[UOp, UOp] = {}
  for (buf, gate, root), by_offset in runs.items():
    # a gated run reads its words ungated at the clamped root where every such word lies inside the buffer: one index
    # a lane for the run, its offsets in the load instructions, where a gated index is a select per word
    clamped = None if gate is None else clamped_root(root, gate)
    for _, grp in itertools.groupby(enumerate(sorted(by_offset)), lambda x: x[1]-x[0]):
      offsets = [o for _, o in grp]
      while offsets:
        start = root + offsets[0]
        width = next((w for w in WORDS if w <= len(offsets) and start.divides(w) is not None), 1)
        if width > 1:
          # the clamped root keeps the root's alignment: divides() held for every value of its variables
          if gate is None: idx = start
          elif clamped is not None and reads_inside(buf, clamped + offsets[0], width): idx = clamped + offsets[0]
          else: idx = start.valid(gate)
          word = buf.index(idx).cast(WORDS[width]).load()
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
