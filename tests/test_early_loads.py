"""early_loads: a load no loop needs (a matvec's residual, a side reduce's inputs) is issued before the loop; the program
computes exactly what it computed with the load after the loop, and a buffer the kernel writes is never read early."""
import os, re
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tinygrad import Tensor, dtypes
from tinygrad.helpers import Context
from tinygrad_ext import without
from tinygrad.uop.ops import UOp, Ops
import tinygrad.codegen as codegen
from passes.early_loads import MAX_ELEMENTS, early_loads, global_buffer
from kernels import kernel_asts, render, cuda_renderer, metal_renderer

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")
EXAMPLES = {"CPU": 10, "CL": 20}

def residual_matvec(rows:int, cols:int, rng:np.random.Generator, device:str|None=None):
  """(make() -> x + W @ v, the epilogue's buffer): a matvec whose kernel adds the residual after its reduce loop."""
  with Context(**({"DEV": device} if device else {})):
    w = Tensor(rng.standard_normal((rows, cols)).astype(np.float16)).realize()
    v = Tensor(rng.standard_normal((cols,)).astype(np.float16)).realize()
    x = Tensor(rng.standard_normal((rows,)).astype(np.float16)).realize()
  return lambda: x + w @ v

@pytest.mark.parametrize("device", DEVICES)
def test_reordered_loads_compute_exactly_the_same(device):
  # the pass moves loads, no arithmetic: the results are bit for bit those of the pass off
  @settings(max_examples=EXAMPLES.get(device, 20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.integers(0, 2**16), st.sampled_from([1, 7, 64, 96, 512]), st.sampled_from([16, 100, 256, 2048]), st.booleans())
  def prop(seed, rows, cols, side):
    rng = np.random.default_rng(seed)
    make = residual_matvec(rows, cols, rng, device)
    if side:  # a small side reduce beside the matvec, read after its loop too (the shape of GLM's MoE output kernel)
      with Context(DEV=device): e, s = Tensor(rng.standard_normal((4, rows)).astype(np.float16)).realize(), Tensor(rng.random(4).astype(np.float16)).realize()
      base, make = make, lambda: base() + (e * s.unsqueeze(-1)).sum(0)
    with Context(DEV=device):
      with without("early_loads"): ref = make().numpy()
      got = make().numpy()
    np.testing.assert_array_equal(got, ref)
  prop()

def residual_load(src:str) -> int:
  """Where the CUDA/Metal source loads the residual x (the matvec's third buffer, data1; data0 is the output)."""
  return re.search(r"\(data1_\d+\+", src).start()

def test_cuda_residual_is_loaded_before_the_loop():
  (ast,) = kernel_asts(residual_matvec(2048, 5120, np.random.default_rng(0)))
  on = render(ast, cuda_renderer())
  with without("early_loads"): off = render(ast, cuda_renderer())
  assert on.count("for (") == off.count("for (") == 1
  assert residual_load(on) < on.index("for (") and residual_load(off) > off.index("for (")

def test_metal_residual_is_loaded_before_the_loop():
  (ast,) = kernel_asts(residual_matvec(2048, 5120, np.random.default_rng(0)))
  src = render(ast, metal_renderer())
  assert residual_load(src) < src.index("for (")

def test_a_buffer_the_kernel_writes_is_not_read_early():
  # the residual matvec's program order as tinygrad linearizes it, and the same with a store into the residual's buffer
  # (as a kernel that updates a buffer in place has): its load moves before the loop in the first only
  (ast,) = kernel_asts(residual_matvec(2048, 5120, np.random.default_rng(1)))
  with without("early_loads"): lst = codegen.linearize(codegen.full_rewrite_to_sink(ast, cuda_renderer()))
  (x,) = [u for u in lst if u.op is Ops.LOAD and (b:=global_buffer(u)) is not None and b.arg.slot == 1]
  def after_loop(order:list[UOp]) -> bool: return order.index(x) > next(i for i, u in enumerate(order) if u.op is Ops.RANGE)
  writes_x = lst[:-1] + [UOp(Ops.STORE, dtypes.void, (x.src[0], x)), lst[-1]]
  assert after_loop(lst) and not after_loop(early_loads(lst))
  assert early_loads(writes_x) == writes_x

def test_at_most_max_elements_are_held_through_the_loop():
  # an epilogue reading more values than MAX_ELEMENTS a thread: only the first loads up to that many move
  rng = np.random.default_rng(2)
  rows = 256
  make = residual_matvec(rows, 4096, rng)
  extra = [Tensor(rng.standard_normal(rows).astype(np.float16)).realize() for _ in range(MAX_ELEMENTS + 8)]
  (ast,) = kernel_asts(lambda: make() + sum(extra[1:], extra[0]))
  src = render(ast, cuda_renderer())
  loop = src.index("for (")
  early = [m for m in re.finditer(r"(half\d?) val\d+ = \(\*\(", src) if m.start() < loop]
  elements = sum(int(m.group(1)[4:] or 1) for m in early)
  assert 0 < elements <= MAX_ELEMENTS
