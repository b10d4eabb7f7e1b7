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

Hook: a CodegenStep after tinygrad's "add images" step (devectorized: every conversion is a scalar CAST).
"""
from __future__ import annotations
from tinygrad.uop.ops import UOp, Ops, PatternMatcher, UPat, graph_rewrite
from tinygrad.dtype import dtypes
from tinygrad.renderer import Renderer
from tinygrad_ext import Pass, CodegenStep, register

MAGIC_BITS, MAGIC = 0x4B000000, float(1 << 23)  # the float32 bits of 2^23, and 2^23

def fits(u:UOp) -> bool: return isinstance(u.vmin, int) and isinstance(u.vmax, int) and 0 <= u.vmin and u.vmax < (1 << 23)

def unsigned_core(e:UOp) -> tuple[UOp, int]|None:
  """(u, c): an unsigned integer expression u in [0, 2^23) and a constant c with e == u + c, or None."""
  if e.op is Ops.ADD and e.src[1].op is Ops.CONST and (inner:=unsigned_core(e.src[0])) is not None: return inner[0], inner[1] + e.src[1].arg
  if e.op is Ops.BITCAST and e.dtype == dtypes.int8 and e.src[0].dtype == dtypes.uint8:
    b = e.src[0]
    return (b, 0) if fits(b) and b.vmax < 128 else (b ^ 0x80, -128)
  if e.op is Ops.CAST and dtypes.is_int(e.src[0].dtype) and not e.src[0].overflows(e.dtype): return unsigned_core(e.src[0])
  if dtypes.is_unsigned(e.dtype) and fits(e): return e, 0
  return None

def exponent_trick(x:UOp, e:UOp) -> UOp|None:
  if (core:=unsigned_core(e)) is None: return None
  u, c = core
  if abs(c) >= (1 << 23): return None  # 2^23 - c must be exact
  return (u.cast(dtypes.uint32) | MAGIC_BITS).bitcast(dtypes.float32) - (MAGIC - c)

pm_int_to_float = PatternMatcher([
  (UPat(Ops.CAST, dtypes.float32, src=(UPat(dtype=dtypes.ints, name="e"),), name="x"), exponent_trick),
])

def cheap_int_to_float(sink:UOp, ren:Renderer) -> UOp: return graph_rewrite(sink, pm_int_to_float, name="int_to_float")

INT_TO_FLOAT = register(Pass("int_to_float", "small-range int -> float32 conversions become an OR into the exponent bits and a subtract",
                             (CodegenStep("add images", cheap_int_to_float),)))
