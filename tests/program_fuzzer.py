"""Random tinygrad programs for the differential fuzzer (tests/test_fuzz_programs.py): each is drawn as data (inputs and
steps), so hypothesis shrinks it and prints it as the Python that reproduces it; `run()` builds and realizes it under the
pass configuration in force and returns numpy arrays.

Programs mix elementwise and transcendental ops over every dtype the device runs, casts and bitcasts, reductions of
every kind (sum, max, min, prod, argmax, cumsum, cummax, nested ones, one reduce feeding several consumers, assigns),
movement ops (pad, shrink, permute, expand, flip, strided slices, reshape), one-hot gathers, matmuls, convolutions,
attention and linear algebra, symbolic shapes (a shrink by a bound Variable), the JIT and backward passes.

A float converted to an integer type is clamped to its range first: out of range, the conversion is undefined in C
and tinygrad's own result changes with the codegen. Float inputs are small multiples of 1/8, so sums in any order are exact and a reduce reordered by a pass (lanes, warps)
gives the same bits; only transcendentals and divisions round, and the comparison allows for that."""
from __future__ import annotations
import functools
from dataclasses import dataclass
import numpy as np
from hypothesis import strategies as st
from tinygrad import Tensor, TinyJit, Variable, dtypes, Device
from tinygrad.dtype import DType

FLOATS = ("float32", "float16", "bfloat16")
INTS = ("int8", "uint8", "int16", "int32", "uint32", "int64")
DTYPES = FLOATS + INTS + ("bool",)

@functools.cache
def runs(device:str, dtype:str) -> bool:
  """The device computes this dtype (clang 14 has no bfloat16 for tinygrad's CPU target; PoCL has no float16 on some CPUs)."""
  try:
    t = Tensor([1.5, 2.0], device=device).cast(getattr(dtypes, dtype)).contiguous().realize()
    return bool(np.isfinite((t * t).cast(dtypes.float32).numpy()).all())
  except Exception: return False

def input_values(shape:tuple[int, ...], dtype:str, seed:int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if dtype in FLOATS: return (rng.integers(-16, 17, shape) / 8).astype(np.float32)
  if dtype == "bool": return rng.integers(0, 2, shape).astype(np.bool_)
  info = np.iinfo(dtype)
  # mostly small values (quant-like), sometimes the type's extremes (overflow and sign paths)
  small = rng.integers(max(info.min, -20), min(info.max, 20) + 1, shape)
  wide = rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
  return np.where(rng.random(shape) < 0.2, wide, small).astype(dtype)

@dataclass(frozen=True)
class Step:
  op: str
  src: tuple[int, ...]   # indices of earlier values
  arg: tuple = ()
  def source(self, out:int) -> str:
    a = ", ".join(f"t{i}" for i in self.src)
    return f"t{out} = {self.op}({a}{', ' if a and self.arg else ''}{', '.join(map(repr, self.arg))})"

def convert(x:Tensor, to) -> Tensor:
  """x cast to `to`. A float outside the integer's range (or NaN) converts to a value C and every backend leave
  undefined: tinygrad's own result then depends on the codegen (a vectorized conversion or not; int_to_float's exact
  reading of the converted bits), so such programs compare nothing: the float is clamped into the range first (a binary
  op's float operand cast to the other's uint8 included)."""
  if x.dtype == to: return x
  if dtypes.is_float(x.dtype) and dtypes.is_int(to): x = (x != x).where(0, x).clip(max(to.min, -2**24), min(to.max, 2**24))
  return x.cast(to)

def _float(x:Tensor) -> Tensor: return x if dtypes.is_float(x.dtype) else x.cast(dtypes.float32)
def _axis(x:Tensor, a:int) -> int: return a % max(x.ndim, 1)
def _int(x:Tensor) -> Tensor: return x if dtypes.is_int(x.dtype) else x.cast(dtypes.int32)
def _same_shape(x:Tensor, y:Tensor) -> Tensor:
  """y made to x's shape: its elements flattened, cycled or cut to fit (so every pair of values can meet)."""
  if y.shape == x.shape: return y
  flat = y.flatten()
  n = x.numel()
  if flat.shape[0] < n: flat = flat.repeat((n + flat.shape[0] - 1) // flat.shape[0])
  return flat[:n].reshape(x.shape)

# sin and cos of an argument bounded to +-256 (every uint8 value): past that, the float rounding a sum's order may
# legitimately change (a wide int32 row summed in float32: +-64 at 1e9) decides the result (found on CL: 0.16 vs 0.97)
UNARY = {
  "exp": lambda x: (_float(x) * 0.5).exp(), "log": lambda x: (_float(x).abs() + 0.5).log(), "sin": lambda x: _float(x).clip(-256, 256).sin(),
  "cos": lambda x: _float(x).clip(-256, 256).cos(), "sqrt": lambda x: _float(x).abs().sqrt(), "recip": lambda x: (_float(x).abs() + 1).reciprocal(),
  "sigmoid": lambda x: _float(x).sigmoid(), "tanh": lambda x: _float(x).tanh(), "relu": lambda x: x.relu() if x.dtype != dtypes.bool else x,
  "neg": lambda x: -x if x.dtype != dtypes.bool else x.logical_not(), "abs": lambda x: x.abs() if x.dtype != dtypes.bool else x,
  "square": lambda x: x * x, "not": lambda x: ~x if dtypes.is_int(x.dtype) or x.dtype == dtypes.bool else x,
  "shl": lambda x: _int(x) << 1, "shr": lambda x: _int(x) >> 2, "minus_c": lambda x: _float(x) - 1.5707964, "plus_int": lambda x: x + 3,
}
BINARY = {
  "add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y, "max": lambda x, y: x.maximum(y),
  "min": lambda x, y: x.minimum(y), "lt": lambda x, y: x < y, "eq": lambda x, y: x == y,
  "where": lambda x, y: (x < y).where(x, y), "xor": lambda x, y: _int(x) ^ _int(y), "and": lambda x, y: _int(x) & _int(y),
  "idiv": lambda x, y: _int(x) // (_int(y).abs() + 1), "mod": lambda x, y: _int(x) % (_int(y).abs() + 1),
  "div": lambda x, y: _float(x) / (_float(y).abs() + 1),
}
REDUCE = {
  "sum": lambda x, a, k: x.sum(a, keepdim=k), "max": lambda x, a, k: x.max(a, keepdim=k), "min": lambda x, a, k: x.min(a, keepdim=k),
  "mean": lambda x, a, k: _float(x).mean(a, keepdim=k), "prod": lambda x, a, k: _float(x).clip(-1.5, 1.5).prod(a, keepdim=k),
  "argmax": lambda x, a, k: x.argmax(a, keepdim=k), "argmin": lambda x, a, k: x.argmin(a, keepdim=k),
  "any": lambda x, a, k: x.cast(dtypes.bool).any(a, keepdim=k), "cumsum": lambda x, a, k: x.cumsum(a),
  "cummax": lambda x, a, k: _float(x).cummax(a)[0],
}
# a reduce broadcast back over what it reduced, combined with the row: norms and softmaxes, what fusion targets
ROW = {
  "softmax": lambda x, a: _float(x).softmax(a), "log_softmax": lambda x, a: _float(x).log_softmax(a),
  "rmsnorm": lambda x, a: _float(x) * (_float(x).square().mean(a, keepdim=True) + 1e-5).rsqrt(),
  "center": lambda x, a: x - x.max(a, keepdim=True), "share": lambda x, a: x / (x.abs().sum(a, keepdim=True) + 1) if dtypes.is_float(x.dtype) else x - x.sum(a, keepdim=True),
}

def apply_step(vals:list[Tensor], s:Step, inputs:list[Tensor]) -> Tensor:
  x = vals[s.src[0]] if s.src else None
  if s.op in UNARY: return UNARY[s.op](x)
  if s.op in BINARY:
    return BINARY[s.op](x, convert(_same_shape(x, vals[s.src[1]]), x.dtype))
  if s.op in REDUCE: return REDUCE[s.op](x, _axis(x, s.arg[0]), s.arg[1]) if x.ndim else x
  if s.op in ROW: return ROW[s.op](x, _axis(x, s.arg[0])) if x.ndim else x
  if s.op == "cast": return convert(x, getattr(dtypes, s.arg[0]))
  if s.op == "bitcast":
    to = getattr(dtypes, s.arg[0])
    if to.itemsize != x.dtype.itemsize or x.dtype == dtypes.bool or to == dtypes.bool: return x
    # a computed float's bits read as an integer compare its last bit exactly, which any sum order may round otherwise
    # (an fp16 attention's result, 13445 for 13444): such a bitcast is left out
    if dtypes.is_float(x.dtype) and not dtypes.is_float(to): return x
    # a float made from arbitrary bits may be a NaN with any payload: keep it finite and small
    return x.bitcast(to) if not dtypes.is_float(to) else (x & 0x3C7F if to.itemsize == 2 else x & 0x3F7FFFFF).bitcast(to) if dtypes.is_int(x.dtype) else x
  if s.op == "permute": return x.permute(*np.random.default_rng(s.arg[0]).permutation(x.ndim).tolist()) if x.ndim > 1 else x
  if s.op == "flip": return x.flip(_axis(x, s.arg[0])) if x.ndim else x
  if s.op == "pad": return x.pad(tuple((s.arg[0], s.arg[1]) if i == _axis(x, s.arg[2]) else (0, 0) for i in range(x.ndim)), value=s.arg[3]) if x.ndim else x
  if s.op == "shrink":
    if not x.ndim: return x
    a = _axis(x, s.arg[0]); n = x.shape[a]; lo = min(s.arg[1], n - 1)
    return x.shrink(tuple((lo, max(lo + 1, n - s.arg[2])) if i == a else None for i in range(x.ndim)))
  if s.op == "stride": return x[tuple(slice(None, None, 2) if i == _axis(x, s.arg[0]) else slice(None) for i in range(x.ndim))] if x.ndim else x
  if s.op == "expand": return x.unsqueeze(_axis(x, s.arg[0]) if x.ndim else 0).expand(*[s.arg[1] if i == (_axis(x, s.arg[0]) if x.ndim else 0) else -1 for i in range(x.ndim + 1)])
  if s.op == "flatten": return x.flatten()
  if s.op == "reshape2": return x.reshape(2, -1) if x.numel() % 2 == 0 else x.reshape(1, -1)
  if s.op == "gather":  # a one-hot gather along the first axis, by indices computed from y (MoE routing's pattern)
    if not x.ndim: return x
    idx = (_int(vals[s.src[1]]).flatten()[:3].abs() % x.shape[0])
    return x[idx]
  if s.op == "matmul":
    a = _float(x).reshape(-1, x.shape[-1]) if x.ndim else _float(x).reshape(1, 1)
    w = _float(_same_shape(Tensor.empty(a.shape[-1], s.arg[0]), vals[s.src[1]]))
    return a @ w.cast(a.dtype)
  if s.op == "conv2d":
    img = _float(_same_shape(Tensor.empty(1, 2, 5, 6), x))
    w = _float(_same_shape(Tensor.empty(4, 2 // s.arg[1], s.arg[0], s.arg[0]), vals[s.src[1]])).cast(img.dtype)
    return img.conv2d(w, groups=s.arg[1], padding=s.arg[2], stride=s.arg[3])
  if s.op == "attention":  # grouped-query attention: 4 query heads over 2 kv heads, causal or not
    q = _float(_same_shape(Tensor.empty(1, 4, 3, 4), x))
    kv = _float(_same_shape(Tensor.empty(1, 2, 5, 4), vals[s.src[1]])).cast(q.dtype)
    return q.scaled_dot_product_attention(kv, kv * 0.5, is_causal=s.arg[0], enable_gqa=True)
  if s.op == "linalg":  # several values: Q and R, or U, S and V (realized together, as tinygrad's test_linalg does)
    m = _float(_same_shape(Tensor.empty(*s.arg[1:]), x)).cast(dtypes.float32)
    # plus a diagonal of distinct multiples of c > 4 |m|: full rank, singular values apart (Weyl), so Q, R, U, S, V are
    # continuous in m. A tiled input is rank deficient, and its factors' free columns followed rounding noise (a 2x2 QR's
    # second column flipped sign with fusion's sum order)
    rows, cols = s.arg[-2:]
    c = m.abs().sum((-2, -1), keepdim=True) * 4 + 1
    m = m + c * Tensor.eye(rows, cols) * Tensor.arange(1, cols + 1, dtype=dtypes.float32)
    if s.arg[0] == "qr": return m.qr()
    # a singular vector is defined up to its sign, which the algorithm's rounding picks (two schedules of one U, one
    # with fusion's kernels, flipped a column): each pair u_i, v_i gets the sign that makes u_i's weighted sum positive,
    # far from 0 since u_i is near a unit vector here
    U, S, V = m.svd()
    sign = (U * Tensor.arange(1, rows + 1, dtype=dtypes.float32).reshape(rows, 1)).sum(-2, keepdim=True).sign()
    return U * sign, S, V * sign.transpose(-1, -2)
  if s.op == "symbolic":  # a sum over a prefix whose length is a bound Variable: one program for every length
    n = x.numel()
    return _float(x).flatten().shrink(((0, Variable("n", 1, n).bind(max(1, min(n, s.arg[0])))),)).sum()
  raise ValueError(s.op)

@dataclass(frozen=True)
class Program:
  inputs: tuple[tuple[tuple[int, ...], str, int], ...]   # (shape, dtype, seed)
  steps: tuple[Step, ...]
  outputs: tuple[int, ...]    # values realized together
  assign: bool                # the first output is also assigned into a buffer, twice, from one reduce
  backward: bool              # gradients of the float inputs are outputs too
  jit: bool                   # run through TinyJit (three calls, the last one compared)

  def source(self) -> str:
    lines = [f"t{i} = Tensor({shape}, {dt}, seed={seed})" for i, (shape, dt, seed) in enumerate(self.inputs)]
    n = len(self.inputs)
    for s in self.steps:
      lines.append(s.source(n) if values_of(s) == 1 else s.source(n).replace(f"t{n} =", ", ".join(f"t{n + i}" for i in range(values_of(s))) + " =", 1))
      n += values_of(s)
    return "\n".join(lines + [f"realize {', '.join(f't{o}' for o in self.outputs)} (assign={self.assign}, backward={self.backward}, jit={self.jit})"])

  def build(self, inputs:list[Tensor], realize_steps:bool=False) -> list[Tensor]:
    vals = list(inputs)
    for s in self.steps:
      out = apply_step(vals, s, inputs)
      out = out if isinstance(out, tuple) else (out,)
      vals.extend(o.contiguous().realize() for o in out) if realize_steps else vals.extend(out)
    outs = [vals[o] for o in self.outputs]
    if self.assign:
      # one reduce feeding two assigns (two buffers updated from the same row sum)
      r = outs[0].sum() if outs[0].dtype != dtypes.bool else outs[0].cast(dtypes.int32).sum()
      b1, b2 = Tensor.zeros(3, dtype=r.dtype).contiguous().realize(), Tensor.ones(3, dtype=r.dtype).contiguous().realize()
      b1.assign(b1 + r); b2.assign(b2 * 2 - r)
      outs += [b1, b2]
    if self.backward and (floats := [o for o in outs if dtypes.is_float(o.dtype)]):
      loss = functools.reduce(Tensor.add, [(o.cast(dtypes.float32) * (i + 1)).sum() for i, o in enumerate(floats)])
      graph = loss.uop.toposort()
      if wrt := [t for t in inputs if dtypes.is_float(t.dtype) and t.uop in graph]: outs += loss.gradient(*wrt)
    return outs

  def inputs_on(self, device:str) -> list[Tensor]:
    return [Tensor(input_values(shape, dt, seed), device=device).cast(getattr(dtypes, dt)).contiguous().realize() for shape, dt, seed in self.inputs]

  def output_dtypes(self, device:str) -> list[DType]:
    """The tinygrad dtype of each output (numpy shows a bfloat16 one as float32)."""
    return [o.dtype for o in self.build(self.inputs_on(device))]

  def run(self, device:str, realize_steps:bool=False) -> list[np.ndarray]:
    """The outputs; realize_steps: each step's value realized before the next reads it (no kernel recomputes another's)."""
    def make_inputs(): return self.inputs_on(device)
    if realize_steps or not self.jit:
      outs = self.build(make_inputs(), realize_steps)
      Tensor.realize(*outs)
      return [o.numpy() for o in outs]
    step = TinyJit(lambda *ins: [o.contiguous().realize() for o in self.build(list(ins))])
    for _ in range(3): outs = step(*make_inputs())
    return [o.numpy() for o in outs]

def values_of(s:Step) -> int: return {"qr": 2, "svd": 3}.get(s.arg[0], 1) if s.op == "linalg" else 1

OPS = [*UNARY, *BINARY, *REDUCE, *ROW, "cast", "bitcast", "permute", "flip", "pad", "shrink", "stride", "expand", "flatten",
       "reshape2", "gather", "matmul", "conv2d", "attention", "linalg", "symbolic"]
TWO_SOURCES = set(BINARY) | {"gather", "matmul", "conv2d", "attention"}

@st.composite
def programs(draw, device:str, max_steps:int=6) -> Program:
  dts = [d for d in DTYPES if runs(device, d)]
  n_in = draw(st.integers(1, 3))
  inputs = []
  for _ in range(n_in):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)))
    inputs.append((shape, draw(st.sampled_from(dts)), draw(st.integers(0, 2**16))))
  steps, n, forced = [], n_in, []
  for _ in range(draw(st.integers(1, max_steps))):
    op = draw(st.sampled_from(OPS))
    src = (draw(st.integers(0, n - 1)),) + ((draw(st.integers(0, n - 1)),) if op in TWO_SOURCES else ())
    arg: tuple = ()
    if op in REDUCE: arg = (draw(st.integers(-3, 3)), draw(st.booleans()))
    elif op in ROW or op in ("flip", "stride"): arg = (draw(st.integers(-3, 3)),)
    elif op in ("cast", "bitcast"): arg = (draw(st.sampled_from(dts)),)
    elif op == "permute": arg = (draw(st.integers(0, 99)),)
    elif op == "pad": arg = (draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(st.integers(-3, 3)), draw(st.sampled_from([0, 1, -1])))
    elif op == "shrink": arg = (draw(st.integers(-3, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    elif op == "expand": arg = (draw(st.integers(-3, 3)), draw(st.integers(1, 4)))
    elif op == "matmul": arg = (draw(st.integers(1, 9)),)
    elif op == "conv2d": arg = (draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2])), draw(st.integers(0, 1)), draw(st.sampled_from([1, 2])))
    elif op == "attention": arg = (draw(st.booleans()),)
    # square matrices: a non-square one's Q or U/V has columns beyond its rank, defined only up to sign (rounding picks it)
    elif op == "linalg": arg = (draw(st.sampled_from(["qr", "svd"])), *draw(st.sampled_from([(2, 2), (3, 3), (2, 3, 3), (2, 2, 2, 2, 2)])))
    elif op == "symbolic": arg = (draw(st.integers(1, 64)),)
    steps.append(Step(op, src, arg))
    if op == "linalg": forced += range(n, n + values_of(steps[-1]))
    n += values_of(steps[-1])
  outputs = tuple(sorted(set(draw(st.lists(st.integers(n_in, n - 1), min_size=1, max_size=3)) + forced)))
  return Program(tuple(inputs), tuple(steps), outputs, draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from([False, False, True])))

def mismatch(ref:list[np.ndarray], got:list[np.ndarray], dtypes_:list[DType]|None=None) -> str|None:
  """Where got differs from ref: exactly for integers and bools, for floats beyond rounding (NaN and inf where ref has
  them), or None."""
  if len(ref) != len(got): return f"{len(got)} outputs, expected {len(ref)}"
  for i, (r, g) in enumerate(zip(ref, got)):
    if r.shape != g.shape or r.dtype != g.dtype: return f"output {i}: {g.dtype}{g.shape}, expected {r.dtype}{r.shape}"
    if r.dtype.kind != "f":
      if not np.array_equal(r, g): return f"output {i}: {np.argwhere(r != g).shape[0]} of {r.size} elements differ, first at {tuple(np.argwhere(r != g)[0])}: {g[tuple(np.argwhere(r != g)[0])]} (expected {r[tuple(np.argwhere(r != g)[0])]})"
      continue
    r64, g64 = r.astype(np.float64), g.astype(np.float64)
    if not np.array_equal(np.isnan(r64), np.isnan(g64)) or not np.array_equal(np.isinf(r64), np.isinf(g64)) or \
       not np.array_equal(r64[np.isinf(r64)], g64[np.isinf(g64)]):
      return f"output {i}: NaN/inf positions differ"
    fin = np.isfinite(r64)
    # numpy holds a bfloat16 result as float32: its tolerance is its own dtype's (dtypes_, as the outputs were computed)
    narrow = r.dtype != np.float32 or (dtypes_ is not None and dtypes_[i] in (dtypes.half, dtypes.bfloat16))
    rtol = 1e-2 if narrow else 1e-4
    scale = max(1.0, float(np.abs(r64[fin]).max(initial=0)))
    if (bad := np.abs(r64[fin] - g64[fin]) > rtol * scale + rtol * np.abs(r64[fin])).any():
      j = np.argwhere(bad)[0][0]
      return f"output {i}: {int(bad.sum())} of {r.size} elements differ beyond rounding, e.g. {g64[fin][j]} (expected {r64[fin][j]})"
  return None
