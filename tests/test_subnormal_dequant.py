"""subnormal_dequant: a quant field read as a subnormal, the scale and offset on the fp16 activation. Exact (tested on
the identity itself and on matvecs against the pass off), CUDA only unless forced, and rendered in the order that keeps
it exact."""
import os, re
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tinygrad.helpers import Context
from tinygrad_ext import without
from tinygrad_ext.passes.subnormal_dequant import B, SUBNORMAL_EXP
from kernels import render, cuda_renderer, metal_renderer, clang_renderer, a_row_and_a_block_per_lane, q4_0_matvec_ast
from helpers import matvecs, assert_close_fp16, need_tool

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")
EXAMPLES = {"CPU": 8, "CL": 12}

def every_half() -> np.ndarray:
  """Every finite fp16 value, as float32."""
  h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
  return h[np.isfinite(h)].astype(np.float32)

@pytest.mark.parametrize("s", [0, 4, 8, 12, 16, 19])
def test_scaled_activation_times_subnormal_field_is_exact(s):
  # y * 2^(149-s-B) times the subnormal bits (u << s) is y * u * 2^-B exactly, for every fp16 y and every nibble u at bit s
  y = every_half()
  scaled = y * np.float32(2.0 ** (SUBNORMAL_EXP - s - B))
  assert np.isfinite(scaled).all()  # B keeps the largest fp16 (65504) below float32's range
  for u in range(16):
    v = np.array([u << s], dtype=np.uint32).view(np.float32)[0]
    assert v == np.float32(u * 2.0 ** (s - SUBNORMAL_EXP)) or u == 0
    got = scaled * v
    np.testing.assert_array_equal(got.astype(np.float64) * 2.0 ** B, y.astype(np.float64) * u)

@pytest.mark.parametrize("device", DEVICES)
def test_subnormal_dequant_equals_it_off(device):
  # forced on this device's renderer (x86 and PoCL compute subnormals exactly): every quant type, dense and MoE
  @settings(max_examples=EXAMPLES.get(device, 25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.data())
  def prop(data):
    with Context(DEV=device):
      make = data.draw(matvecs(device))
      with without("subnormal_dequant"): ref = make().numpy()
      with Context(TINYGRAD_EXT_SUBNORMAL_DEQUANT_EVERYWHERE=1): got = make().numpy()
      assert_close_fp16(got, ref)
  prop()

SCALED = re.compile(r"\(\(cast\d+\*0x1\.0+p\+(\d+)f\)\*tg_bitcast<float>\(\(uint\)\(\(cast\d+&(\d+)u\)\)\)\)")

@a_row_and_a_block_per_lane()
def test_rendered_cuda_reads_nibbles_as_subnormals_scaled_activation_first():
  ast = q4_0_matvec_ast()
  on = render(ast, cuda_renderer())
  # 32 nibbles a block: each masked in place and read as a subnormal, multiplied by the activation scaled for its bit,
  # in that order (the activation times the subnormal first would round in the subnormal range)
  found = SCALED.findall(on)
  assert len(found) == 32, on
  assert {(int(k), int(m)) for k, m in found} == {(SUBNORMAL_EXP - s - B, 15 << s) for s in (0, 4, 8, 12)}, found
  assert "lop3" not in on and "1258291200u" not in on, on  # no exponent trick left for int_to_float
  with without("subnormal_dequant"): off = render(ast, cuda_renderer())
  assert not SCALED.search(off) and "lop3" in off, off
  # other renderers keep int_to_float's form unless forced
  for ren in (metal_renderer(), clang_renderer()):
    assert not SCALED.search(src:=render(ast, ren)) and "0x1.0000000000000p+" not in src, src
  with Context(TINYGRAD_EXT_SUBNORMAL_DEQUANT_EVERYWHERE=1): assert "0x1.0000000000000p+" in render(ast, clang_renderer())
  need_tool("nvcc", "the CUDA toolkit's compiler, to compile the rendered CUDA")
  assert len(cuda_renderer().compiler.compile(on)) > 0
