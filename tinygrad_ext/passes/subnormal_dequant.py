"""subnormal_dequant: a quant value's float is its bit field read as a subnormal; the offset and the scale move to the
activation, which every row of a lane shares.

A dequant matvec sums y * float(u + c) over a quant block: y an fp16 activation, u an unsigned quant value (a Q4_0
nibble) and c its offset (-8). int_to_float makes each float(u + c) an AND-and-OR and a subtract, and the product a
fused multiply-add: three instructions for every weight element, all of them waiting on the weight's load. This pass
rewrites the block's sum (after hoist, at tinygrad's "postopt symbolic") as
  REDUCE(ADD, y * float(u + c))  ->  (REDUCE(ADD, (y * 2^-B) * float(u)) + (c * 2^-B) * REDUCE(ADD, y)) * 2^B
and, once the words are packed (at "add images", before int_to_float), each (y * 2^-B) * float(u) with u the bits
s..s+k of a word w as
  (y * 2^(149-s-B)) * bitcast<float>(w & (m << s))
since a float32 whose exponent bits are 0 is the subnormal u * 2^(s-149). What is left per weight element is an AND and
an FMA; the activation's scaling and sum, and the offset, are computed once per element of y, which all the rows a lane
holds share (the UOp graph is deduplicated), and they do not wait on the weight's load. On the H200 a Q4_0 matvec of
2 rows a lane went 6.51 -> 6.12 us with it (benchmarks/probe_matvec.py, hand-written variants), though the instruction
count stayed the same: the work after the weight arrives is what the kernel waits on.

Exact, as the sum it replaces up to reassociation: y is an fp16 value (|y| < 2^16, a multiple of 2^-24), u < 2^13, so
y * 2^(149-s-B) with B = 38 stays in float32's normal range, and the product y * u * 2^-B has at most 24 significant bits
and is a normal float; every partial sum is a multiple of 2^(-24-B) >= 2^-62, so the scaled sum rounds exactly as the
unscaled one would, and * 2^B undoes it. Subnormals must not be flushed to zero: tinygrad compiles CUDA C without -ftz
(NVRTC's and nvcc's default), so the pass fires on the CUDA renderer only; Metal may flush, and CPUs take subnormal
operands on a slow path. TINYGRAD_EXT_SUBNORMAL_DEQUANT_EVERYWHERE=1 fires it on every renderer, for tests on a CPU
(x86 computes subnormals exactly).

Hooks: a CodegenStep after "postopt symbolic" (after hoist's: tinygrad_ext/pipeline.py) and one after "add images" (after
packed_loads', before int_to_float's).
"""
from __future__ import annotations
from tinygrad.uop.ops import UOp, Ops, PatternMatcher, UPat, graph_rewrite
from tinygrad.dtype import dtypes
from tinygrad.renderer import Renderer
from tinygrad.renderer.cstyle import CUDARenderer
from tinygrad_ext import Pass, CodegenStep, register
from tinygrad_ext.config import flag
from tinygrad_ext.passes.shared import unsigned_core, bit_field

EVERYWHERE = flag("TINYGRAD_EXT_SUBNORMAL_DEQUANT_EVERYWHERE")
# the activation's scale: the smallest B that keeps |y| * 2^(149-B) (y fp16, a field at bit 0) below float32's largest
B = 38
DOWN, UP = 2.0 ** -B, 2.0 ** B
# products y * u must be exact: 11 significant bits of y and at most 13 of u
U_MAX = 1 << 13
SUBNORMAL_EXP = 149  # a float32 with exponent bits 0 and mantissa bits v is v * 2^-149

def preserves_subnormals(ren:Renderer) -> bool: return isinstance(ren, CUDARenderer) or bool(EVERYWHERE.value)

def is_fp16_activation(a:UOp) -> bool: return a.op is Ops.CAST and a.dtype == dtypes.float32 and a.src[0].dtype == dtypes.half

def split_offset(r:UOp) -> UOp|None:
  """REDUCE(ADD, y * float(u + c)) -> (REDUCE(ADD, (y * 2^-B) * float(u)) + c * 2^-B * REDUCE(ADD, y)) * 2^B."""
  if r.arg != (Ops.ADD, 0) or r.dtype != dtypes.float32 or (m:=r.src[0]).op is not Ops.MUL: return None
  y, conv = m.src if is_fp16_activation(m.src[0]) else m.src[::-1]
  if not is_fp16_activation(y) or conv.op is not Ops.CAST or conv.dtype != dtypes.float32 or not dtypes.is_int(conv.src[0].dtype): return None
  if (core:=unsigned_core(conv.src[0])) is None: return None
  u, c = core
  if not isinstance(u.vmax, int) or u.vmin < 0 or u.vmax >= U_MAX or abs(c) >= U_MAX: return None
  scaled = r.replace(src=((y * DOWN) * u.cast(dtypes.float32), *r.src[1:]))
  if c: scaled = scaled + r.replace(src=(y, *r.src[1:])) * (c * DOWN)
  return scaled * UP

def as_subnormal(y:UOp, k:UOp, conv:UOp) -> UOp|None:
  """(y * 2^-B) * float(u) -> (y * 2^(149-s-B)) * bitcast<float>(w & (m << s)), u the field (w >> s) & m."""
  if k.arg != DOWN or not is_fp16_activation(y) or not dtypes.is_unsigned((u:=conv.src[0]).dtype) or u.vmin < 0 or u.vmax >= U_MAX: return None
  w, s, mask = bit_field(u)
  # a field of a word, kept where it is; else the value itself (its float bits are its subnormal)
  if w is u or w.dtype.itemsize > 4 or s + mask.bit_length() > 23 or mask & (mask + 1): w, s, mask = u, 0, (1 << 23) - 1
  bits = w.cast(dtypes.uint32) if s == 0 and w is u else w.cast(dtypes.uint32) & (mask << s)
  return exact_scale(y, 2.0 ** (SUBNORMAL_EXP - s - B)) * bits.bitcast(dtypes.float32)

def exact_scale(y:UOp, k:float) -> UOp:
  """y * k, rendered as written: tinygrad's symbolic would move a constant factor out of (y * k) * v, and y * v of a
  subnormal v rounds in the subnormal range. An expression (CUSTOMI) is opaque to it; C multiplies in the order written."""
  return UOp(Ops.CUSTOMI, dtypes.float32, (y,), f"({{0}}*{k.hex()}f)")

CONVERSION = UPat(Ops.CAST, dtypes.float32, src=(UPat(dtype=dtypes.ints),), name="conv")
# tinygrad's symbolic moves the constant out of the product: (y * c) * v is (y * v) * c when it gets here
pm_as_subnormal = PatternMatcher([
  (UPat(Ops.MUL, dtypes.float32, src=[UPat(Ops.MUL, src=[UPat.var("y"), UPat.cvar("k")]), CONVERSION]), as_subnormal),
  (UPat(Ops.MUL, dtypes.float32, src=[UPat(Ops.MUL, src=[UPat.var("y"), CONVERSION]), UPat.cvar("k")]), as_subnormal),
])

def split_offsets(sink:UOp, ren:Renderer) -> UOp:
  if not preserves_subnormals(ren) or not any(u.op is Ops.REDUCE for u in sink.toposort()): return sink
  return graph_rewrite(sink, PatternMatcher([(UPat(Ops.REDUCE, name="r"), split_offset)]), name="subnormal_dequant: offset out of the sum")

def convert_subnormal(sink:UOp, ren:Renderer) -> UOp:
  if not preserves_subnormals(ren): return sink
  return graph_rewrite(sink, pm_as_subnormal, name="subnormal_dequant: fields as subnormals")

SUBNORMAL_DEQUANT = register(Pass("subnormal_dequant",
  "a quant value's float is its bit field read as a subnormal, its scale and offset moved to the fp16 activation the lane's rows share (CUDA)",
  (CodegenStep("postopt symbolic", split_offsets), CodegenStep("add images", convert_subnormal)), settings=(EVERYWHERE,)))
