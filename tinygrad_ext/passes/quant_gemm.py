"""quant_gemm: a matrix product that reads its weight as it dequantizes runs on tensor cores, the dequant in the tile loads.

A GGML dequant splits the product's reduce into a quant block's axes (Q4_0: 64 blocks x 2 nibble halves x 16 bytes of a
2048-long row), and tinygrad's heuristic tries tensor cores only on a kernel with one reduce axis (TC_OPT=0: "more
axes" is its BEAM search's level 1). So a prefill chunk's product with a quantized weight rounded to fp16 ran without
them, unless the weight was first written out whole in fp16 (83 ms of a 512-token chunk's 279 on an H100: every
expert of every block staged). tinygrad's tensor-core opt itself handles several reduce axes, given one its K divides
(a quant block's elements), and every value a tile loads is computed where it is loaded.

This heuristic takes kernels whose one reduce is an ADD of a half x half (or bf16) product, over several reduce axes,
where one side reads GGUF bytes (a uint8 buffer) and the other has an axis of its own (a product of rows, not a GEMV:
those are the matvec pass's), and gives them tinygrad's own tensor-core choice at TC_OPT=1 (hand_coded_optimizations'
first branch: the TC opt, then its upcasts and local) over every axis choice, where tinygrad's tries three (a K-quant's
reduce is 2 x 2 x 2 x 2 x 32: the only axis K divides is the fifth). Where no tensor core applies it declines.

Hook: an OptHeuristic (tinygrad.codegen.apply_opts), after matvec.
"""
from __future__ import annotations
from tinygrad.uop.ops import Ops, AxisType
from tinygrad.dtype import dtypes
from tinygrad.helpers import TC_OPT, USE_TC
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad_ext import Pass, OptHeuristic, register
from tinygrad_ext.passes.shared import BYTE_DTYPES, with_tensor_cores

NAME = "quant_gemm"
TC_DTYPES = (dtypes.half, dtypes.bfloat16)

def reads_bytes(u) -> bool:
  return any(x.op is Ops.INDEX and getattr(x.dtype, "base", x.dtype) in BYTE_DTYPES for x in u.toposort())

def quant_product_choices(k) -> int:
  """For one ADD reduce over several axes of a TC-typed product, one side a dequant, each side with an axis of its own:
  how many (N, M, K) axis choices tinygrad's TC opt has. 0 for any other kernel."""
  if len(reds := k.reduceops) != 1 or reds[0].arg[0] is not Ops.ADD or len(k.axes_of(AxisType.REDUCE)) < 2: return 0
  mul = reds[0].src[0] if reds[0].src[0].op is not Ops.CAST else reds[0].src[0].src[0]
  if mul.op is not Ops.MUL or any(s.dtype not in TC_DTYPES for s in mul.src): return 0
  a, b = mul.src
  if reads_bytes(a) == reads_bytes(b): return 0
  return len([r for r in a.ranges if r not in b.ranges]) * len([r for r in b.ranges if r not in a.ranges]) * len(k.axes_of(AxisType.REDUCE))

def choose_quant_gemm_opts(k):
  """tinygrad's tensor-core choice (hand_coded_optimizations' first branch, at TC_OPT=1), trying every (N, M, K) axis
  choice: its own tries the first three, and a K-quant's reduce is 2 x 2 x 2 x 2 x 32, the only axis K divides fifth."""
  if USE_TC.value <= 0 or not k.ren.tensor_cores or not (choices := quant_product_choices(k)): return None
  if (found := with_tensor_cores(k, choices, max(1, TC_OPT.value))) is None: return None
  tk, rngs = found
  for dim in (1, 0):  # then as tinygrad's: upcast M and N, and a local on N
    if (szs := [sz for sz in (5, 4, 3, 2) if rngs[dim].src[0].divides(sz) is not None]):
      rngs[dim] = tk.apply_opt(Opt(OptOps.UPCAST, tk.rngs.index(rngs[dim]), szs[0]))[0]
  if (szs := [sz for sz in (4, 2) if rngs[0].src[0].divides(sz) is not None]): tk.apply_opt(Opt(OptOps.LOCAL, tk.rngs.index(rngs[0]), szs[0]))
  return tk

QUANT_GEMM = register(Pass(NAME, "puts products of rows with a weight read as it dequantizes (several reduce axes) on tensor cores",
                           (OptHeuristic(choose_quant_gemm_opts),)))
