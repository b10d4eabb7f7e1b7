"""packed_loads: byte loads of GGUF blocks become ushort/uint loads where alignment is proven; results are bit-identical."""
import os, re
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tinygrad import Tensor, dtypes
from tinygrad.helpers import Context
from tinygrad.llm.gguf import ggml_data_to_tensor
import tinygrad_ext
from kernels import kernel_asts, render, cuda_renderer, metal_renderer, a_row_and_a_block_per_lane, q4_0_matvec_ast, gated_moe_matvec_ast
from helpers import quantized

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")
EXAMPLES = {"CPU": 8}

@pytest.mark.parametrize("device", DEVICES)
def test_packed_loads_are_bit_identical(device):
  @settings(max_examples=EXAMPLES.get(device, 20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.sampled_from(["Q4_0", "Q8_0", "Q4_K", "Q6_K"]), st.sampled_from([1, 2, 3]), st.sampled_from([4, 8, 12]), st.integers(0, 2**16),
         st.sampled_from(["dequant", "matvec", "moe"]))
  def prop(qtype, nblocks, out, seed, kind):
    with Context(DEV=device):
      rng = np.random.default_rng(seed)
      inp = nblocks * (256 if qtype.endswith("_K") else 32)
      x = Tensor(rng.uniform(-1, 1, (1, inp)).astype(np.float16), device=device).realize()
      if kind == "moe":  # the expert id gates the weight's loads; ids past the experts select 0, negative ones wrap
        w = quantized(rng, (4, out, inp), qtype, device)
        sel = Tensor(rng.integers(-4, 8, 2).astype(np.int32).reshape(1, 1, 2), device=device).realize()
        make = lambda: (x.reshape(1, 1, 1, inp).unsqueeze(-2) @ w[sel].transpose(-1, -2)).float()
      else:
        w = quantized(rng, (out, inp), qtype, device)
        make = (lambda: (x @ w.T).float()) if kind == "matvec" else (lambda: w.float() * 1)  # a fused matvec, or the dequant alone
      with tinygrad_ext.without("packed_loads"): ref = make().numpy()
      np.testing.assert_array_equal(make().numpy(), ref)
  prop()

@a_row_and_a_block_per_lane()
def test_q4_0_matvec_reads_ushorts_with_the_pass_and_bytes_without():
  ast = q4_0_matvec_ast()
  for ren, word, byte in ((cuda_renderer(), "*((unsigned short*)", "unsigned char val"), (metal_renderer(), "*((device unsigned short*)", "unsigned char val")):
    on = render(ast, ren)
    with tinygrad_ext.without("packed_loads"): off = render(ast, ren)
    assert on.count(word) == 9 and byte not in on, on  # 18-byte block: the fp16 scale and 16 nibble bytes in 9 words
    assert word not in off and off.count(byte) >= 18, off
  from tinygrad.codegen import full_rewrite_to_sink
  assert any(u.op.name == "LOAD" and u.dtype == dtypes.uint16 for u in full_rewrite_to_sink(ast, cuda_renderer()).toposort())

def test_gated_moe_loads_are_packed_under_their_gate():
  # MoE: the expert id is checked against the expert count, so every weight load is gated; the words are loaded under
  # that gate and select 0 where it fails, as the gated byte loads did (with hoist off: hoist takes the gate out of the
  # sum, and the words with it, test_hoist.py)
  ast = gated_moe_matvec_ast()
  with tinygrad_ext.without("hoist"): on = render(ast, cuda_renderer())
  with tinygrad_ext.without("hoist", "packed_loads"): off = render(ast, cuda_renderer())
  assert on.count("*((unsigned short*)") >= 9 and "unsigned char val" not in on, on
  # each word is selected by the gate (as it is, or widened for int_to_float's fields in place: the cast moves into the select)
  assert len(re.findall(r"\?(?:\(\(uint\)\()?val\d+", on)) == on.count("*((unsigned short*)"), on
  # read at the expert id clamped to the experts (once a thread), not at an index selected per word
  words = re.findall(r"unsigned short val\d+ = .*data3_\d+\+(.*);", on)
  assert len(words) == on.count("*((unsigned short*)") and not any("?" in w for w in words), words
  assert not re.search(r"\?\(alu\d+\+\d+\):0\)", on), on  # no index selected per word: (gate?(idx+k):0)
  assert "*((unsigned short*)" not in off and off.count("unsigned char val") >= 18, off

def test_unprovable_alignment_keeps_byte_loads():
  # MXFP4 blocks are 17 bytes: a block starts at an odd byte as often as not, so no run can be proven aligned
  raw = Tensor.empty(64 * 256 // 32 * 17, dtype=dtypes.uint8)
  x = Tensor.empty(1, 256, dtype=dtypes.float16)
  ast = kernel_asts(lambda: x @ ggml_data_to_tensor(raw, 64 * 256, 39).reshape(64, 256).cast(dtypes.float16).T)[-1]
  src = render(ast, cuda_renderer())
  assert "unsigned short*" not in src and "unsigned int*" not in src and "unsigned char val" in src, src

def test_clamped_root_bounds_what_the_gate_bounds():
  from tinygrad.uop.ops import UOp
  from tinygrad_ext.passes.shared import clamped_root
  e = UOp.variable("expert", -1000, 1000)
  root, gate = e * 100 + 5, (UOp.const(-1, e.dtype) < e) & (e < 64)
  clamped = clamped_root(root, gate)
  assert (clamped.vmin, clamped.vmax) == (5, 6305)  # the expert id in [0, 63]
  for v in (0, 7, 63):  # the same index inside the gate
    at = clamped.substitute({e: UOp.const(v, e.dtype)})
    assert at.vmin == at.vmax == v * 100 + 5
  assert clamped_root(root, e < 64).vmin < 0  # one bound: the root may still go below the buffer, so it is not used
  assert clamped_root(root, gate & e.ne(3)) is None  # a clause that is no bound

def test_python_emulator_keeps_byte_loads_and_computes_the_matvec():
  # the emulator executes UOps and cannot read a word through a byte buffer's index: the pass leaves it the bytes
  from tinygrad import Device
  rng = np.random.default_rng(3)
  with Context(DEV="PYTHON"):
    w = quantized(rng, (4, 64), "Q4_0", "PYTHON")
    x = Tensor(rng.uniform(-1, 1, (1, 64)).astype(np.float16)).realize()
    ast = kernel_asts(lambda: x @ w.T)[-1]
    assert "unsigned short" in render(ast, cuda_renderer())  # the same kernel packs for CUDA
    with tinygrad_ext.passes_off(): ref = (x @ w.T).float().numpy()
    np.testing.assert_allclose((x @ w.T).float().numpy(), ref, rtol=2e-3, atol=2e-3)
