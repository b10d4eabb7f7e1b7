"""quant_gemm: products of rows with a weight read as it dequantizes go on tensor cores, the dequant in the tile loads."""
import json, math, os, pathlib, subprocess, sys
import pytest
import tinygrad_ext
from tinygrad import Tensor, dtypes
from tinygrad.llm.gguf import ggml_data_to_tensor
from kernels import kernel_asts, render, cuda_renderer, metal_renderer, scheduler_of
from tinygrad_ext.passes.quant_gemm import choose_quant_gemm_opts

ROOT = pathlib.Path(__file__).resolve().parents[1]
Q4_0, Q8_0, Q4_K, Q6_K = 2, 8, 12, 14
BLOCK = {Q4_0: (32, 18), Q8_0: (32, 34), Q4_K: (256, 144), Q6_K: (256, 210)}

def quant(qtype:int, *shape:int) -> Tensor:
  n = math.prod(shape)
  return ggml_data_to_tensor(Tensor.empty(n // BLOCK[qtype][0] * BLOCK[qtype][1], dtype=dtypes.uint8), n, qtype).reshape(*shape)

def gemm(M:int, N:int, K:int, qtype:int=Q4_0, dt=dtypes.half):
  x, w = Tensor.empty(M, K, dtype=dt), quant(qtype, N, K)
  return lambda: x.matmul(w.cast(dt).T, dtype=dtypes.float)

def moe_tiles(tiles:int=4, M:int=64, N:int=768, K:int=512):
  # a prefill chunk's MoE tiles: each tile's expert weight gathered by a loaded id (model.grouped_experts)
  x, w, te = Tensor.empty(tiles, M, K, dtype=dtypes.half), quant(Q4_0, 9, N, K), Tensor.empty(tiles, dtype=dtypes.int32)
  return lambda: x.matmul(w[te].cast(dtypes.half).transpose(-1, -2), dtype=dtypes.float)

# (a K-quant's reduce is 2 x 2 x 2 x 2 x 32 a row of 512: tinygrad's own TC choice tries the first three axes only)
@pytest.mark.parametrize("make", [gemm(64, 256, 512), gemm(128, 384, 256, Q8_0), gemm(64, 256, 512, Q4_K), gemm(32, 128, 512, Q6_K),
                                  moe_tiles()], ids=["q4_0", "q8_0", "q4_k", "q6_k", "moe_tiles"])
def test_a_quant_gemm_renders_tensor_cores(make):
  ast, = kernel_asts(make)
  assert "mma" in render(ast, cuda_renderer())
  with tinygrad_ext.passes_off(): assert "mma" not in render(kernel_asts(make)[0], cuda_renderer())  # one reduce axis only
  # (without fusion a loaded expert id is a kernel of its own)
  with tinygrad_ext.only("quant_gemm"): assert any("mma" in render(a, cuda_renderer()) for a in kernel_asts(make))
  assert "simdgroup_multiply_accumulate" in render(ast, metal_renderer())

@pytest.mark.parametrize("make", [
  gemm(1, 256, 512),                                                                          # a GEMV: matvec's
  lambda: Tensor.empty(64, 512, dtype=dtypes.half) @ Tensor.empty(512, 256, dtype=dtypes.half),  # no dequant: tinygrad's
  gemm(64, 256, 512, dt=dtypes.float),                                                        # no tensor-core dtype
], ids=["gemv", "float_matrix", "float32"])
def test_other_products_are_left_alone(make):
  ast, = kernel_asts(make)
  assert choose_quant_gemm_opts(scheduler_of(ast, cuda_renderer())) is None

def test_no_tensor_cores_no_opts():
  ast, = kernel_asts(gemm(64, 256, 512))
  from kernels import clang_renderer
  assert choose_quant_gemm_opts(scheduler_of(ast, clang_renderer())) is None

# run on tinygrad's emulated CUDA tensor cores (DEV=PYTHON::sm_80; bf16: the emulator on Python < 3.12 has no half)
EMULATED = r"""
import json, sys
import numpy as np, gguf
import tinygrad_ext
from tinygrad import Tensor, dtypes, Device
from tinygrad.llm.gguf import ggml_data_to_tensor
from examples.glm import synth
M, N, K, qtype, seed = json.loads(sys.argv[1])
rng = np.random.default_rng(seed)
gq = gguf.GGMLQuantizationType(qtype)
blocks = synth.random_blocks(gq, N * K, 0.05, rng).reshape(N, -1)
w = ggml_data_to_tensor(Tensor(blocks.reshape(-1)), N * K, qtype).reshape(N, K)
x = Tensor(rng.standard_normal((M, K)).astype(np.float32)).cast(dtypes.bfloat16)
out = x.matmul(w.cast(dtypes.bfloat16).T, dtype=dtypes.float)
got = out.numpy().astype(np.float64)
bf = lambda a: Tensor(a.astype(np.float32)).cast(dtypes.bfloat16).float().numpy().astype(np.float64)
ref = x.float().numpy().astype(np.float64) @ bf(gguf.quants.dequantize(blocks, gq).reshape(N, K)).T
print(json.dumps({"err": float(np.abs(got - ref).max() / np.abs(ref).max())}))
"""

@pytest.mark.parametrize("shape", [(16, 16, 64, Q4_0, 0), (32, 48, 96, Q8_0, 1), (16, 32, 128, Q4_0, 2), (16, 16, 512, Q4_K, 3)])
def test_tensor_core_products_match_float64_on_emulated_cuda(shape, tmp_path):
  # the emulator runs the mma's lanes as CUDA's do; each product of two bf16 values is exact in the float sum
  env = {**os.environ, "DEV": "PYTHON::sm_80", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
  r = subprocess.run([sys.executable, "-c", EMULATED, json.dumps(shape)], env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(r.stdout.strip().splitlines()[-1])["err"] <= 1e-5
