"""What several passes ask of a kernel, in one place: bit fields of packed words (int_to_float, subnormal_dequant), an
index as root plus offset and a root clamped to what its gate bounds (packed_loads, wide_loads, hoist), the buffers a
schedule or kernel stores to (fusion, hoist, reduce_local, long_reduce), lane counts (fusion, long_reduce), and whether a
device computes a dtype natively (fusion, reduce_local), and constants a dtype cannot hold (fusion, the opt heuristics). No
pass of its own."""
from __future__ import annotations
from tinygrad.uop.ops import UOp, Ops, GroupOp
from tinygrad.dtype import dtypes
from tinygrad.helpers import EMULATED_DTYPES
from tinygrad.uop.symbolic import parse_valid
from tinygrad.renderer import Renderer

# GGUF weights and their quant fields are read through byte buffers (packed_loads, matvec)
BYTE_DTYPES = (dtypes.uint8, dtypes.int8)

# *** constants a dtype cannot hold ***

def out_of_range_consts(root:UOp, gate=lambda u: True) -> bool:
  """root computes in an integer or bool dtype with a constant that dtype cannot hold (a uint or bool pad of -1 is the
  weak int -1; a bool pad summed as an int is where(valid, int(x), -1)). Range analysis and tinygrad's rewrites (which
  move a cast out of a where, turning the -1 into the bool True) treat it differently in different places, so what
  such a value computes depends on the rewrites a kernel goes through: recomputed elsewhere (fusion) or given other opts
  (an unrolled reduce folds its where per element, a loop keeps it), it computes something else than stock tinygrad's."""
  # what a where selects, through nested wheres: once per where (a chain of wheres sharing branches, as a hash's rounds
  # have, would otherwise be walked once per path)
  selected: dict[UOp, tuple[UOp, ...]] = {}
  def values(u:UOp) -> tuple[UOp, ...]:
    if u.op is not Ops.WHERE: return (u,)
    if u not in selected: selected[u] = tuple(dict.fromkeys(values(u.src[1]) + values(u.src[2])))
    return selected[u]
  def narrow(x:UOp) -> bool: return x.op is Ops.CAST and x.src[0].dtype != dtypes.weakint and (dtypes.is_int(x.src[0].dtype) or x.src[0].dtype == dtypes.bool)
  def ambiguous(u:UOp) -> bool:
    vals = values(u) if u.op is Ops.WHERE else list(u.src)
    # the dtypes u's value must fit: its own, and for a where each one a value it selects was widened from (codegen
    # moves that cast out of the where, narrowing the constant); arithmetic on a widened value (a nibble minus 8) is not
    holds = [d for d in [u.dtype, *(x.src[0].dtype for x in vals if u.op is Ops.WHERE and narrow(x))] if d != dtypes.weakint]
    return any(c.op is Ops.CONST and isinstance(c.arg, int) and not d.min <= c.arg <= d.max for d in holds for c in vals)
  return any(u.op in GroupOp.ALU and u.op not in GroupOp.Comparison and (dtypes.is_int(u.dtype) or u.dtype == dtypes.bool) and ambiguous(u)
             for u in root.toposort(gate=gate))

# *** integer expressions: an unsigned value plus a constant, and bit fields of packed words ***

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

# *** indexes ***

def root_and_offset(idx:UOp) -> tuple[UOp, int]:
  """idx as a root expression plus a constant, as tinygrad's memory coalescing splits an index."""
  if idx.op is Ops.ADD and idx.src[1].op is Ops.CONST and isinstance(idx.src[1].arg, int): return idx.src[0], idx.src[1].arg
  if idx.op is Ops.ADD and idx.src[0].op is Ops.CONST and isinstance(idx.src[0].arg, int): return idx.src[1], idx.src[0].arg
  return idx, 0

def clamped_root(root:UOp, gate:UOp) -> UOp|None:
  """root with every expression the gate bounds clamped into those bounds: the same index wherever the gate holds, and
  one whose range the index arithmetic can bound where it does not (a MoE expert id is checked against the expert
  count). None where a clause of the gate is no bound on an integer expression."""
  bounds: dict[UOp, tuple[int, int]] = {}
  for clause in gate.split_uop(Ops.AND):
    if (parsed:=parse_valid(clause)) is None: return None
    expr, is_upper, c = parsed
    lo, hi = bounds.get(expr, (expr.vmin, expr.vmax))
    bounds[expr] = (lo, min(hi, c)) if is_upper else (max(lo, c), hi)
  if any(lo < dtypes.int32.min or hi > dtypes.int32.max for lo, hi in bounds.values()): return None  # a one-sided bound
  # through stand-ins: a clamp holds the expression it replaces
  stand_in = {e: UOp.variable(f"clamped{i}", lo, hi, e.dtype) for i, (e, (lo, hi)) in enumerate(bounds.items())}
  # clamped in int32 (a value outside it is outside the gate too), min as -max(-x): the range of a MAX is exact, and the
  # index arithmetic's width is chosen from the ranges
  def clamp(e:UOp, lo:int, hi:int) -> UOp: return (-((-e.cast(dtypes.int32).maximum(lo)).maximum(-hi))).cast(e.dtype)
  return root.substitute(stand_in).substitute({v: clamp(e, v.vmin, v.vmax) for e, v in stand_in.items()})

def reads_inside(buf:UOp, idx:UOp, width:int=1) -> bool:
  """Every value idx can take, and the width-1 elements after it, lie inside buf (a static-size buffer)."""
  return isinstance(n:=buf.shape[0], int) and isinstance(idx.vmin, int) and isinstance(idx.vmax, int) and idx.vmin >= 0 and idx.vmax + width <= n

# *** stores ***

def stored_buffers(sink:UOp) -> set[UOp]:
  """Every buffer a store of this graph (a schedule's kernels, or one kernel) writes to (an assign's target)."""
  return {u.src[0].src[0] for u in sink.toposort() if u.op is Ops.STORE and u.src[0].op is Ops.INDEX}

def store_targets(ast:UOp) -> set[UOp]:
  """What a kernel's stores write through (their INDEX): the loads of a kernel are its other buffer accesses."""
  return {s.src[0] for s in ast.toposort() if s.op is Ops.STORE}

# *** lanes and dtypes ***

def pow2_at_most(n:int, most:int) -> int:
  """The largest power of two at most min(n, most): a lane count."""
  return 1 << (min(n, most).bit_length() - 1)

def native(ren:Renderer, dtype) -> bool:
  """dtype is the renderer's own, not emulated by tinygrad (half on PoCL without cl_khr_fp16): tinygrad's emulation
  rewrites a buffer of it but not the AFTER that orders its reads (a local buffer, a loop's accumulator), so such a
  program fails verification."""
  return dtype not in EMULATED_DTYPES.tolist(dtypes) and dtype in ren.supported_dtypes()

def with_tensor_cores(k, choices:int, tc_opt:int):
  """(a copy of k with tinygrad's TC opt applied, the opt's ranges) for the first of its (N, M, K) axis choices below
  `choices` that takes; None where none does."""
  from tinygrad.codegen.opt import Opt, OptOps, KernelOptError
  from tinygrad.helpers import USE_TC, TC_SELECT
  for axis in range(choices):
    tk = k.copy()
    try: return tk, tk.apply_opt(Opt(OptOps.TC, axis, (TC_SELECT.value, tc_opt, USE_TC.value)))
    except KernelOptError: continue
  return None

def tensor_cores_take(k) -> bool:
  """tinygrad's own heuristic would run this kernel on tensor cores (a half x half product summed in float: a prefill
  chunk's attention): a heuristic that claims it first would keep them off. The same test as hand_coded_optimizations."""
  from tinygrad.uop.ops import AxisType
  from tinygrad.helpers import USE_TC, TC_OPT
  if USE_TC.value <= 0 or not (len(k.axes_of(AxisType.GROUP_REDUCE, AxisType.REDUCE)) == 1 or TC_OPT.value >= 1): return False
  return with_tensor_cores(k, 3, TC_OPT.value) is not None
