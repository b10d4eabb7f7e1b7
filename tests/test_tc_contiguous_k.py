"""tc_contiguous_k: tensor cores' K bits relabeled so a thread's operand elements are adjacent along K (one vector load)."""
import dataclasses, json, os, pathlib, subprocess, sys
import pytest
import tinygrad_ext
from tinygrad import dtypes
from tinygrad.codegen.opt import tc
from kernels import kernel_asts, render, cuda_renderer, half_gemm, staged_moe_tiles, half_loads
from tinygrad_ext.passes.tc_contiguous_k import k_relabeling, with_contiguous_k

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (bf16 loads stay scalar on tinygrad 0.14's CUDA renderer: the relabeling only makes them adjacent)
@pytest.mark.parametrize("make", [half_gemm(64, 256, 512), half_gemm(16, 64, 128), staged_moe_tiles()], ids=["half", "half_small", "moe_tiles"])
def test_a_thread_loads_its_k_elements_of_a_row_as_one_vector(make):
  # m16n8k16: a thread's K of a row are 2t, 2t+1, 2t+8, 2t+9 (two 2-vectors 16 bytes apart) in hardware order, and
  # 4t .. 4t+3 (one 4-vector) relabeled; the same product on tensor cores either way
  (ast,) = [a for a in kernel_asts(make) if "mma" in render(a, cuda_renderer())]
  on = half_loads(render(ast, cuda_renderer()))
  with tinygrad_ext.without("tc_contiguous_k"): off = half_loads(render(ast, cuda_renderer()))
  assert off and {t[-1] for t in off} == {"2"} and {t[-1] for t in on} == {"4"} and len(on) * 2 == len(off), (on, off)

def test_the_relabeling_is_one_for_both_operands_and_only_where_it_moves_elements_down():
  # CUDA m16n8k16: K bits 0 and 3 are a thread's elements, 1 and 2 its lane's: they become bits 0, 1 and 2, 3
  cuda = next(t for t in tc.cuda_sm80 if t.dims == (8, 16, 16))
  assert k_relabeling(cuda) == {"r0": "r0", "r3": "r1", "r1": "r2", "r2": "r3"}
  # m16n8k8 half: a thread's two elements are already K's lowest bit; Metal's 8x8x8 likewise
  for t in [t for t in tc.cuda_sm80 if t.dims == (8, 16, 8) and t.dtype_in == dtypes.half] + tc.metal: assert with_contiguous_k(t) is t
  # operands whose element bits differ cannot share one relabeling: left as they are
  a, b = cuda.swizzle
  mixed = dataclasses.replace(cuda, swizzle=(a, ((b[0][0], "r0", *b[0][2:]), ("r2", b[1][1]), b[2])))
  assert k_relabeling(mixed) is None and with_contiguous_k(mixed) is mixed

# run on tinygrad's emulated tensor cores (DEV=PYTHON::<arch>, the lanes and registers as the hardware has them): every
# relabeled tensor core the emulator has, both operands K-contiguous or either one strided along K, passes on and
# without tc_contiguous_k, against float64. The values are multiples of 1/8 below 1 (exact in
# every input dtype) so any order of the sum is exact and all agree to the bit; a wrong relabeling (one operand's only)
# is off by whole units.
EMULATED = r"""
import base64, json, pickle, sys
import numpy as np
import tinygrad_ext
from hypothesis import given, settings, strategies as st, HealthCheck
from tinygrad import Tensor, dtypes, Device
from tinygrad.helpers import Context
from tinygrad.uop.ops import Ops
from kernels import kernel_asts, render
names, examples = json.loads(sys.argv[1]), int(sys.argv[2])
ren, seen = Device[Device.DEFAULT].renderer, set()
CONFIGS = {"on": (), "without tc_contiguous_k": ("tc_contiguous_k",)}

@settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(names), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.booleans(), st.booleans(), st.integers(0, 2**31))
def check(name, m, n, k, a_strided, b_strided, seed):
  dt, rng = getattr(dtypes, name), np.random.default_rng(seed)
  M, N, K = 16 * m, 16 * n, 32 * k
  def operand(rows, strided):
    v = rng.integers(-7, 8, (rows, K)) / 8
    return v, (Tensor(v.T.astype(np.float32)).cast(dt).T if strided else Tensor(v.astype(np.float32)).cast(dt)).realize()
  (av, a), (bv, b) = operand(M, a_strided), operand(N, b_strided)
  make = lambda: a.matmul(b.T, dtype=dtypes.float)
  got, programs = {}, {}
  for config, off in CONFIGS.items():
    with Context(ALLOW_TF32=1), tinygrad_ext.without(*off):
      (ast,) = kernel_asts(make)
      programs[config] = render(ast, ren)
      got[config] = make().numpy()
  assert all(any(u.op is Ops.WMMA for u in pickle.loads(base64.b64decode(p))) for p in programs.values()), (name, M, N, K)
  assert programs["on"] != programs["without tc_contiguous_k"]
  ref = av @ bv.T
  for config, out in got.items(): assert (out == ref).all(), (config, name, M, N, K, a_strided, b_strided)
  seen.add(name)
check()
print(json.dumps(sorted(seen)))
"""

@pytest.mark.parametrize("arch, dtype_names", [("sm_80", ["half", "bfloat16", "float32"]), ("sm_89", ["fp8e4m3", "fp8e5m2"]),
                                               ("gfx1201", ["half", "bfloat16"])], ids=["cuda_sm80", "cuda_sm89_fp8", "amd_rdna4"])
def test_tensor_core_passes_compute_the_same_products_on_emulated_hardware(arch, dtype_names):
  env = {**os.environ, "DEV": f"PYTHON::{arch}", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
  r = subprocess.run([sys.executable, "-c", EMULATED, json.dumps(dtype_names), str(4 * len(dtype_names))], env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.strip().splitlines()[-1]) == sorted(dtype_names)  # every dtype drawn and checked
