"""int_to_float: conversions of small-range integers to float32 through the exponent bits.

A dequant converts every weight element from an integer: a Q4_0 nibble minus 8, a Q8_0 signed byte, a K-quant's 6-bit
value. GPUs convert int to float on a slow path (H100/H200: 16 conversions per SM per clock, against 128 FMAs per clock),
which limits a fused dequant matvec long before memory does. For an integer u in [0, 2^23) the float32 with the bits
0x4B000000 | u is exactly 2^23 + u, so
  float(u + c) = bitcast<float>(0x4B000000 | u) - (2^23 - c)
exactly (every value involved is an integer below 2^24): an OR and a subtract on the fast pipes. The pass peels a
converted integer down to such a u plus a constant c: constant additions, value-preserving integer casts, and signed
bytes (bitcast<int8>(b) = (b ^ 0x80) - 128; a byte known to be below 128 is its own value). A conversion whose range
it cannot bound below 2^23 is left as it is.

A quant value is usually a bit field of a packed word (packed_loads reads a Q4_0 block's nibbles as ushorts): the nibble
at bits s..s+3 of w was shifted down and masked, byte by byte. The field is converted in place instead: with w's field
kept where it is and the exponent of 2^(23-s) above it, the float's bits (w & (0xF << s)) | ((150-s) << 23) are
exactly 2^(23-s) + n, so each value is one AND-and-OR and a subtract, with no shift and no byte split. On CUDA the
AND-and-OR is one lop3 (inline PTX with both constants in registers): ptxas splits it into an AND and an OR, a LOP3 each,
since one LOP3 holds one immediate. On the H200 the Q4_0 matvecs were bound by that integer pipe (nsight compute: the
output head's ALU pipe 60% busy, 4.9 instructions a weight element, 2 of them integer ops); the lop3 removes one
instruction an element.

Legality: the subtract of the exponent's constant is exact only as it stands. tinygrad's symbolic folds float constant
additions ((x + c1) + c2 -> x + (c1 + c2)) and moves them past other addends ((x + c) + y -> (x + y) + c), which would
round the converted value (or y) at 2^23's scale: (uint8 x).float() - 1.5707964 became x - 8388609.57, rounded. So the
pass runs after tinygrad's last symbolic rewrite ("final symbolic"), and writes the subtract as a SUB where the renderer
has one: tinygrad's C-style renderers print an ADD of an ADD without its parentheses, so y + (bits - 2^23) came out as
`y+bits+-8388608.0f`, which C evaluates as (y + bits) - 2^23, rounding y at 2^23's scale (a uint8's log plus the uint8:
20.0 where 19.86 is right).

Hook: a CodegenStep after tinygrad's "final symbolic" step (devectorized: every conversion is a scalar CAST).
"""
from __future__ import annotations
from tinygrad.uop.ops import UOp, Ops, PatternMatcher, UPat, graph_rewrite
from tinygrad.dtype import dtypes
from tinygrad.renderer import Renderer
from tinygrad.renderer.cstyle import CUDARenderer
from tinygrad_ext import Pass, CodegenStep, register
from tinygrad_ext.passes.shared import unsigned_core, bit_field

MAGIC_BITS, MAGIC = 0x4B000000, float(1 << 23)  # the float32 bits of 2^23, and 2^23

def has_lop3(arch:str) -> bool:
  """PTX's lop3.b32 needs sm_50 or later."""
  return arch.startswith("sm_") and arch[3:].rstrip("af").isdigit() and int(arch[3:].rstrip("af")) >= 50

def and_or(w:UOp, mask:int, bits:int, ren:Renderer) -> UOp:
  """(w & mask) | bits in uint32: on CUDA one lop3 with both constants in registers (ptxas would emit two LOP3s)."""
  w = w.cast(dtypes.uint32)
  if not isinstance(ren, CUDARenderer) or not has_lop3(ren.target.arch): return (w & mask) | bits
  # lop3's truth table 0xEA is (a & b) | c; a lambda keeps the asm an expression, as a CUSTOMI renders inline
  asm = 'lop3.b32 %0, %1, %2, %3, 0xEA;'
  return UOp(Ops.CUSTOMI, dtypes.uint32, (w,), f'([](uint a){{{{ uint d; asm("{asm}" : "=r"(d) : "r"(a), "r"({mask}u), "r"({bits}u)); return d; }}}})({{0}})')

def minus(x:UOp, c:float, ren:Renderer) -> UOp:
  """x - c, kept whole where the renderer prints it: a SUB (C-style renderers), else an ADD (PTX: an instruction an op)."""
  return UOp(Ops.SUB, x.dtype, (x, x.const_like(c))) if Ops.SUB in ren.code_for_op else x - c

def exponent_trick(ctx:Renderer, x:UOp, e:UOp) -> UOp|None:
  if (core:=unsigned_core(e)) is None: return None
  u, c = core
  if abs(c) >= (1 << 23): return None  # 2^23 - c must be exact
  w, s, m = bit_field(u)
  # no field (the value itself: a K-quant's bits joined from two fields), or not one a float holds in place
  if w is u or m & (m + 1) or not m or s + m.bit_length() > 23 or w.dtype.itemsize > 4:
    return minus((u.cast(dtypes.uint32) | MAGIC_BITS).bitcast(dtypes.float32), MAGIC - c, ctx)
  # the field stays at bit s; the exponent of 2^(23-s) makes its float 2^(23-s) + the field's value, exactly
  return minus(and_or(w, m << s, (150 - s) << 23, ctx).bitcast(dtypes.float32), float(1 << (23 - s)) - c, ctx)

pm_int_to_float = PatternMatcher([
  (UPat(Ops.CAST, dtypes.float32, src=(UPat(dtype=dtypes.ints, name="e"),), name="x"), exponent_trick),
])

def cheap_int_to_float(sink:UOp, ren:Renderer) -> UOp: return graph_rewrite(sink, pm_int_to_float, ctx=ren, name="int_to_float")

INT_TO_FLOAT = register(Pass("int_to_float", "small-range int -> float32 conversions become an OR into the exponent bits and a subtract, a packed field in place",
                             (CodegenStep("final symbolic", cheap_int_to_float),)))
