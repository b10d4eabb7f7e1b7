"""long_reduce: reduces over symbolic lengths (decode attention over the positions so far) and long reduces no warp
divides (an argmax over a vocab) go over padded lanes, and compute what the passes-off kernels compute."""
import os, re
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tinygrad import Tensor, dtypes, UOp, TinyJit, Device
from tinygrad.helpers import Context, prod
from tinygrad.codegen.opt import Opt, OptOps
import tinygrad.codegen as codegen
from tinygrad_ext import passes_off, without
from tinygrad_ext.passes.reduce_local import OptOpsExt
from tinygrad_ext.passes.long_reduce import lanes_for
from helpers import need_tool
from kernels import kernel_asts, render, cuda_renderer, metal_renderer

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")
EXAMPLES = {"CPU": 8, "CL": 20}
MAX_POS = 512

def applied_opts(ast, ren) -> tuple[Opt, ...]: return codegen.full_rewrite_to_sink(ast, ren, optimize=True).arg.applied_opts

def decode_attention(device:str, rng:np.random.Generator, heads:int, width:int):
  """(jitted attention of one query per head over the first n cached positions, the variable n, numpy q and cache):
  MLA decode, the positions so far a symbolic length (one compiled kernel serves every n): q.k over the cache rows,
  softmax, then probs @ the rows' first `width` columns."""
  q = rng.standard_normal((1, heads, 1, width + 8)).astype(np.float16)
  cache = rng.standard_normal((1, 1, MAX_POS, width + 8)).astype(np.float16)
  with Context(DEV=device): Q, C = Tensor(q).realize(), Tensor(cache).realize()
  # as a decode step writes it: the positions so far are start_pos+1 (a length variable that starts at 1 makes stock
  # tinygrad launch an invalid kernel on CUDA, passes on or off)
  n = UOp.variable("start_pos", 0, MAX_POS - 1)
  def attend(v):
    keys = C[:, :, :v+1]
    scores = Q.matmul(keys.transpose(-1, -2), dtype=dtypes.float32) * 0.125
    return (scores.softmax(-1).cast(dtypes.half) @ keys[..., :width]).float().realize()
  return TinyJit(attend), n, q, cache

def exact_attention(q:np.ndarray, cache:np.ndarray, n:int, width:int) -> np.ndarray:
  keys = cache[:, :, :n].astype(np.float64)
  s = q.astype(np.float64) @ keys.transpose(0, 1, 3, 2) * 0.125
  p = np.exp(s - s.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ keys[..., :width]

@pytest.mark.parametrize("device", DEVICES)
def test_attention_over_a_symbolic_length_equals_passes_off(device):
  @settings(max_examples=EXAMPLES.get(device, 20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.integers(0, 2**16), st.sampled_from([1, 4, 20]), st.sampled_from([8, 64, 512]), st.lists(st.integers(1, MAX_POS), min_size=1, max_size=3))
  def prop(seed, heads, width, lengths):
    with Context(DEV=device):
      f, n, q, cache = decode_attention(device, np.random.default_rng(seed), heads, width)
      with passes_off(): g = TinyJit(f.fxn)
      for length in lengths:
        got, off = f(n.bind(length - 1)).numpy(), g(n.bind(length - 1)).numpy()
        exact = exact_attention(q, cache, length, width)
        # fp16 probs and products summed in float32, then rounded to fp16: both within fp16 rounding of the exact value
        tol = 4e-3 * max(1.0, float(np.abs(exact).max()))
        np.testing.assert_allclose(got, exact, atol=tol, rtol=4e-3)
        np.testing.assert_allclose(got, off, atol=tol, rtol=4e-3)
  prop()

def latent_ast(width:int=512):
  P, C = Tensor.empty(1, 20, 1, 4096, dtype=dtypes.half), Tensor.empty(1, 1, 4096, 576, dtype=dtypes.half)
  n = UOp.variable("start_pos", 0, 4095).bind(70) + 1
  (ast,) = kernel_asts(lambda: P[..., :n] @ C[:, :, :n, :width])
  return ast

def test_cuda_attention_over_positions_shuffles_padded_lanes_and_compiles():
  ren = cuda_renderer()
  ast = latent_ast()
  opts = applied_opts(ast, ren)
  assert Opt(OptOpsExt.REDUCE_LOCAL, 0, 32) in opts
  # 4 heads share each cache load (the cache does not read the head), 4 positions' columns make one 8-byte load
  assert sum(o.op.name == "UPCAST" and o.arg == 4 for o in opts) == 2
  src = render(ast, ren)
  assert src.count("__shfl_xor_sync") == 16 * 5 and "__syncthreads" not in src  # 16 outputs a lane, a 32-lane butterfly
  # the loop over the positions padded to 32 lanes (start_pos+1 of them: start_pos//32+1 steps), the padding gated off
  assert "Ridx0 < ((data3_>>5)+1)" in src and "<(data3_+1));" in src and "half4" in src
  with without("long_reduce"): assert Opt(OptOpsExt.REDUCE_LOCAL, 0, 32) not in applied_opts(ast, ren)
  need_tool("nvcc", "the CUDA toolkit's compiler, to compile the rendered CUDA")
  assert len(ren.compiler.compile(src)) > 0

def test_argmax_stages_go_over_lanes_on_cuda_and_metal():
  x = Tensor.empty(1, 154880)
  asts = kernel_asts(lambda: x.argmax(-1))
  # tinygrad's split_reduceop: 256 partials of 605 (no warp divides it), then 256 -> 1, for the max and for its index
  long = [a for a in asts if applied_opts(a, cuda_renderer()) == (Opt(OptOpsExt.REDUCE_LOCAL, 0, 32),)]
  assert len(long) == 2
  srcs = [render(a, cuda_renderer()) for a in long]
  assert all(s.count("__shfl_xor_sync") == 5 for s in srcs) and any("int alu" in s and "__shfl_xor_sync(0xffffffffu, (int)" not in s for s in srcs)
  assert all("simd_max(" in render(a, metal_renderer()) for a in long)

def test_cuda_scores_over_positions_read_each_row_once_for_four_heads():
  q, C = Tensor.empty(1, 20, 1, 576, dtype=dtypes.half), Tensor.empty(1, 1, 4096, 576, dtype=dtypes.half)
  n = UOp.variable("start_pos", 0, 4095).bind(70) + 1
  (ast,) = kernel_asts(lambda: q.matmul(C[:, :, :n].transpose(-1, -2), dtype=dtypes.float32))
  assert applied_opts(ast, cuda_renderer()) == (Opt(OptOps.UPCAST, 0, 4), Opt(OptOpsExt.REDUCE_LOCAL, 0, 32))
  src = render(ast, cuda_renderer())
  assert src.count("__shfl_xor_sync") == 4 * 5 and "__syncthreads" not in src  # 4 heads a lane, one 32-lane butterfly each
  assert src.count("data2_2359296+") == 1  # the position's row: one load a step, shared by the 4 heads

@pytest.mark.parametrize("device", DEVICES)
def test_a_float32_product_with_more_outputs_than_tinygrad_groups_equals_passes_off(device):
  # a prefill chunk's router: tokens x experts outputs, each a float32 dot over the model's width
  @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.integers(0, 2**16), st.sampled_from([33, 64, 200]), st.sampled_from([64, 96]), st.sampled_from([256, 512, 2048]))
  def prop(seed, tokens, experts, width):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((tokens, width)).astype(np.float32), rng.standard_normal((experts, width)).astype(np.float32)
    with Context(DEV=device):
      X, W = Tensor(x).realize(), Tensor(w).realize()
      if (ren:=Device[device].renderer).has_local:  # the lanes need local memory (PoCL here; not the CPU backend)
        (ast,) = kernel_asts(lambda: X @ W.T)
        assert Opt(OptOpsExt.REDUCE_LOCAL, 0, lanes_for(ren, dtypes.float32)) in applied_opts(ast, ren)
      got = (X @ W.T).numpy()
      with passes_off(): off = (X @ W.T).numpy()
    # float32 sums in another order: far within 2e-6 of the sum of |products| (a term missed or counted twice is not)
    bound = 2e-6 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    assert (np.abs(got - off) <= bound).all() and (np.abs(got - x.astype(np.float64) @ w.T) <= bound).all()
  prop()

def test_a_prefill_chunks_router_goes_over_lanes_in_enough_blocks():
  # 512 tokens x 64 experts over 2048: more outputs than tinygrad groups, so its heuristic gave each thread 16 outputs'
  # whole sums: 16 blocks on the H100's 132 SMs, 207 us a call; over lanes, one block per 16 outputs of 4x4
  x, w = Tensor.empty(1, 512, 2048), Tensor.empty(64, 2048)
  (ast,) = kernel_asts(lambda: (x @ w.T).sigmoid())
  ren = cuda_renderer()
  assert Opt(OptOpsExt.REDUCE_LOCAL, 0, 32) in applied_opts(ast, ren)
  src = render(ast, ren)
  assert prod(int(n) for n in re.findall(r"blockIdx\.\w+; /\* (\d+) \*/", src)) >= 1024 and src.count("__shfl_xor_sync") == 16 * 5
  with without("long_reduce"): assert Opt(OptOpsExt.REDUCE_LOCAL, 0, 32) not in applied_opts(ast, ren)

def test_short_and_divisible_reduces_are_left_to_tinygrad():
  ren = cuda_renderer()
  for make in (lambda: Tensor.empty(64, 100).sum(-1), lambda: Tensor.empty(4, 4096).max(-1)):
    (ast,) = kernel_asts(make)
    assert not any(o.op is OptOpsExt.REDUCE_LOCAL for o in applied_opts(ast, ren))
