"""Integer expressions as the dequant passes see them: an unsigned value plus a constant, and bit fields of packed words.
Shared by int_to_float and subnormal_dequant (no pass of its own)."""
from __future__ import annotations
from tinygrad.uop.ops import UOp, Ops
from tinygrad.dtype import dtypes

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

def bit_field(e:UOp) -> tuple[UOp, int, int]:
  """(w, s, m) with e == (w >> s) & m: the word w a chain of constant shifts, masks and unsigned casts starts from."""
  a = e.src[1].arg if len(e.src) == 2 and e.src[1].op is Ops.CONST and isinstance(e.src[1].arg, int) and e.src[1].arg >= 0 else None
  if a is not None and dtypes.is_unsigned(e.dtype) and e.src[0].vmin >= 0:
    if e.op is Ops.AND: return (w:=bit_field(e.src[0]))[:2] + (w[2] & a,)
    shift = a if e.op is Ops.SHR else a.bit_length() - 1 if e.op in (Ops.CDIV, Ops.FLOORDIV) and a & (a - 1) == 0 and a else None
    if shift is not None: return (w:=bit_field(e.src[0]))[0], w[1] + shift, w[2] >> shift
  if e.op is Ops.CAST and dtypes.is_unsigned(e.dtype) and dtypes.is_unsigned(e.src[0].dtype):
    return (w:=bit_field(e.src[0]))[:2] + (w[2] & ((1 << 8 * e.dtype.itemsize) - 1),)  # a narrowing cast keeps the low bits
  return e, 0, (1 << e.vmax.bit_length()) - 1 if isinstance(e.vmax, int) and e.vmin >= 0 else (1 << 8 * e.dtype.itemsize) - 1
