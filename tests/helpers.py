"""Helpers the tests share (no test module imports another): quantized weights as tinygrad.llm loads them, a hypothesis
strategy of matvecs, fp16 tolerances, the opts a kernel got, a fresh Python process."""
import os, subprocess, sys
import numpy as np
import gguf
from hypothesis import strategies as st
from tinygrad import Tensor, dtypes
from tinygrad.llm.gguf import ggml_data_to_tensor
import tinygrad.codegen as codegen
from kernels import kernel_asts

def need_tool(name:str, what:str) -> None:
  """Skips the test where a tool it runs is not on PATH (the README's setup does not install the CUDA toolkit), naming it."""
  import shutil, pytest
  if shutil.which(name) is None: pytest.skip(f"{name} is not on PATH ({what})")

def need_dtype(dtype, device:str|None=None) -> None:
  """Skips the test where the device cannot compute this dtype (DEV=CPU's clang 14 has no __bf16), naming both."""
  import pytest
  from tinygrad import Tensor, Device
  try: Tensor([1.5, 2.5], device=device).contiguous().realize().cast(dtype).contiguous().realize().float().numpy()
  except Exception as e: pytest.skip(f"{device or Device.DEFAULT} cannot compute {dtype} ({type(e).__name__})")

def run_python(code:str, **env) -> subprocess.CompletedProcess:
  """code run by a fresh interpreter with these environment settings added."""
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env})

QTYPES = {"Q4_0": gguf.GGMLQuantizationType.Q4_0, "Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q5_0": gguf.GGMLQuantizationType.Q5_0,
          "Q4_K": gguf.GGMLQuantizationType.Q4_K, "Q5_K": gguf.GGMLQuantizationType.Q5_K, "Q6_K": gguf.GGMLQuantizationType.Q6_K}

# gguf's quantize has no K-quants: random blocks, with the fp16 super-block scales set to small finite values
K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,)}

def random_bytes(rng, shape, qtype:str) -> np.ndarray:
  if qtype not in K_SCALES: return gguf.quants.quantize((rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32), QTYPES[qtype])
  block_elems, block_bytes = gguf.GGML_QUANT_SIZES[QTYPES[qtype]]
  blocks = rng.integers(0, 256, (int(np.prod(shape)) // block_elems, block_bytes), dtype=np.uint8)
  for off in K_SCALES[qtype]:
    d = (rng.uniform(0.5, 1, len(blocks)) / 64 / np.sqrt(shape[-1])).astype(np.float16).view(np.uint8).reshape(-1, 2)
    blocks[:, off:off+2 if off+2 else None] = d
  return blocks

def quantized(rng, shape, qtype:str, device:str) -> Tensor:
  """A weight as tinygrad.llm loads it from GGUF: raw bytes on the device, dequantized lazily, cast to fp16."""
  if qtype == "F16": return Tensor((rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float16), device=device).realize()
  if qtype == "BF16":  # as a GGUF BF16 tensor loads: bfloat16 values, read through a cast to the activation's fp16
    return Tensor((rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32), device=device).cast(dtypes.bfloat16).realize().cast(dtypes.float16)
  raw = random_bytes(rng, shape, qtype)
  return ggml_data_to_tensor(Tensor(raw.reshape(-1), device=device).realize(), int(np.prod(shape)), int(QTYPES[qtype])).reshape(shape).cast(dtypes.float16)

@st.composite
def matvecs(draw, device:str):
  # every GGML type tinygrad.llm dequantizes that GLM files use, and plain float weights (BF16 not on CPU: clang 14 has
  # no __bf16 for the target tinygrad's CPU backend compiles to)
  qtype = draw(st.sampled_from(["Q4_0", "Q8_0", "Q5_0", "F16", "Q4_K", "Q5_K", "Q6_K"] + (["BF16"] if device != "CPU" else [])))
  block = 256 if qtype.endswith("_K") else 32
  # long rows leave each lane several blocks: a policy's reduce_warps splits those over warps
  inp = block * draw(st.sampled_from([1, 2, 3, 4, 6, 8, 48, 80] if block == 32 else [1, 2, 6]))
  out = draw(st.sampled_from([4, 8, 12, 16, 24, 32]))
  experts, side = draw(st.sampled_from([0, 0, 8])), draw(st.sampled_from([0, 0, 2, 4]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  x = Tensor(rng.uniform(-1, 1, (1, inp)).astype(np.float16), device=device).realize()
  if experts == 0:
    w = quantized(rng, (out, inp), qtype, device)
    if not side: return lambda: (x @ w.T).float()
    # GLM's MoE output: a small sum (the selected experts' rows, weighted) in the kernel of the shared expert's matvec
    rows = Tensor(rng.uniform(-1, 1, (side, out)).astype(np.float16), device=device).realize()
    scale = Tensor(rng.uniform(0, 1, (side, 1)).astype(np.float16), device=device).realize()
    return lambda: ((rows * scale).sum(0) + x @ w.T).float()
  w = quantized(rng, (experts, out, inp), qtype, device)
  # ids as top-k gives them, or any: past the experts they select 0, negative ones wrap (the gate the weight reads under)
  ids = rng.permutation(experts)[:2] if draw(st.booleans()) else rng.integers(-experts - 2, experts + 3, 2)
  sel = Tensor(ids.astype(np.int32).reshape(1, 1, 2), device=device).realize()
  return lambda: (x.reshape(1, 1, 1, inp).unsqueeze(-2) @ w[sel].transpose(-1, -2)).float()

def assert_close_fp16(got:np.ndarray, ref:np.ndarray) -> None:
  # fp16 activations: a reordered float sum differs by rounding, which scales with the magnitudes summed
  np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * max(1.0, float(np.abs(ref).max())))


def applied(make, ren) -> tuple:
  """Opts of the matvec kernel (stock tinygrad copies Q8_0's int8 view into a kernel of its own first)."""
  from tinygrad.uop.ops import Ops
  ast = [a for a in kernel_asts(make) if any(u.op is Ops.REDUCE for u in a.toposort())][-1]
  return codegen.full_rewrite_to_sink(ast, ren).arg.applied_opts

