"""tc_wide_k: tensor-core products take two K steps an iteration, a thread's elements of both adjacent: one half8 a row.
(Its products against float64 on emulated tensor cores: test_tc_contiguous_k.py.)"""
import re
import pytest
import tinygrad_ext
from tinygrad import Tensor, dtypes
from tinygrad.codegen.opt import OptOps
from kernels import kernel_asts, render, cuda_renderer, scheduler_of, half_gemm, staged_moe_tiles, half_loads
from tinygrad_ext.passes.tc_wide_k import relabeled_k, choose_wide_k_opts

def padded_weight(M=64, N=768, K=512):
  # rows past the weight's are padding: its loads are gated (as a MoE tile's weight by its expert-id check), one gate
  # for a thread's two halves
  x, w = Tensor.empty(M, K, dtype=dtypes.half), Tensor.empty(N, K, dtype=dtypes.half)
  return lambda: x.matmul(w.pad(((0, 256), (0, 0))).T, dtype=dtypes.float)

@pytest.mark.parametrize("make", [half_gemm(64, 256, 512), half_gemm(16, 64, 64), staged_moe_tiles(), padded_weight()], ids=["gemm", "gemm_small", "moe_tiles", "gated"])
def test_a_thread_loads_two_k_steps_of_a_row_as_one_half8(make):
  (ast,) = [a for a in kernel_asts(make) if "mma" in render(a, cuda_renderer())]
  on = half_loads(render(ast, cuda_renderer()))
  with tinygrad_ext.without("tc_wide_k"): one_step = half_loads(render(ast, cuda_renderer()))
  # without it: one half4 a row a K step of 16; with it: one half8 a row for two steps, the same count an iteration
  assert set(one_step) == {"half4"} and set(on) == {"half8"} and len(on) == len(one_step), (on, one_step)

def test_a_gated_pair_keeps_its_gate():
  (ast,) = [a for a in kernel_asts(padded_weight()) if "mma" in render(a, cuda_renderer())]
  src = render(ast, cuda_renderer())
  others = set(re.findall(r"half8 val\d+ = \(\w+\?\*\(\(half8\*\).*\):(\w+)\);", src))
  # where the gate is false: eight zeros
  assert len(others) == 1 and re.search(rf"half8 {others.pop()} = make_half8\(((\(\(half\)\(0.0f\)\)),?){{8}}\);", src)

def test_the_relabeling_is_a_permutation_that_puts_the_unrolled_step_beside_the_elements():
  from tinygrad.uop.ops import UOp
  r = UOp.variable("r", 0, 127)
  # m16n8k16 relabeled: 2 element bits, 2 lane bits; the bit after them (the unrolled step) comes down to bit 2
  perm = [relabeled_k(r, 2, 2).substitute({r: r.const_like(k)}).ssimplify() for k in range(128)]
  assert sorted(perm) == list(range(128))
  assert [perm[k] for k in (0, 1, 2, 3, 16, 17, 18, 19)] == list(range(8))      # a thread's 8: its 4 elements, 2 steps
  assert [perm[4 * t] for t in range(4)] == [0, 8, 16, 24] and perm[32] == 32   # lanes 8 apart; blocks of 32 stay

@pytest.mark.parametrize("make, why", [
  (lambda: Tensor.empty(64, 48, dtype=dtypes.half) @ Tensor.empty(48, 256, dtype=dtypes.half), "K 48: not a multiple of 32"),
  (lambda: Tensor.empty(64, 512, dtype=dtypes.float) @ Tensor.empty(512, 256, dtype=dtypes.float), "no tensor core (float32)"),
  (lambda: Tensor.empty(1, 512, dtype=dtypes.half) @ Tensor.empty(512, 256, dtype=dtypes.half), "a GEMV"),
], ids=["k48", "float32", "gemv"])
def test_it_declines_what_it_cannot_widen(make, why):
  ast, = kernel_asts(make)
  assert choose_wide_k_opts(scheduler_of(ast, cuda_renderer())) is None, why

def test_it_declines_a_symbolic_k_that_tinygrad_puts_on_tensor_cores():
  # (attention's q.k over start_pos + T keys: a relabeling of a length not known to be a multiple is not one-to-one)
  from tinygrad.uop.ops import UOp
  from tinygrad_ext.passes.shared import tensor_cores_take
  n = UOp.variable("n", 1, 16).bind(4)
  a, b = Tensor.empty(64, 512, dtype=dtypes.half), Tensor.empty(256, 512, dtype=dtypes.half)
  ast, = kernel_asts(lambda: a[:, :n * 32].matmul(b[:, :n * 32].T, dtype=dtypes.float))
  k = scheduler_of(ast, cuda_renderer())
  assert tensor_cores_take(k) and choose_wide_k_opts(k) is None and "mma" in render(ast, cuda_renderer())

def test_it_needs_tc_contiguous_k():
  ast, = kernel_asts(half_gemm(64, 256, 512))
  k = choose_wide_k_opts(scheduler_of(ast, cuda_renderer()))
  assert k is not None and [o.op for o in k.applied_opts][0] is OptOps.TC and k.applied_opts[-1].op is OptOps.UNROLL
  with tinygrad_ext.without("tc_contiguous_k"): assert choose_wide_k_opts(scheduler_of(ast, cuda_renderer())) is None
