"""hoist and int_to_float: a quant block's scale leaves the per-element sum, small integers convert through the exponent
bits; results equal the passes off (bit-identical for the conversions, within float rounding for the reassociation)."""
import os
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tinygrad import Tensor, dtypes
from tinygrad.helpers import Context
from tinygrad.uop.ops import Ops, UOp
from tinygrad.codegen import full_rewrite_to_sink
from tinygrad.codegen.late.linearizer import linearize
from tinygrad_ext import without
from tinygrad_ext.passes.hoist import split_invariant
from tinygrad.llm.gguf import ggml_data_to_tensor
from kernels import with_opts, render, cuda_renderer, metal_renderer, kernel_asts, kernel_sources, a_row_and_a_block_per_lane, \
  q4_0_matvec_ast, gated_moe_matvec_ast
from helpers import quantized, matvecs, assert_close_fp16, need_tool

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")
EXAMPLES = {"CPU": 8, "CL": 15}

@pytest.mark.parametrize("device", DEVICES)
def test_hoist_equals_hoist_off(device):
  @settings(max_examples=EXAMPLES.get(device, 25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.data())
  def prop(data):
    with Context(DEV=device):
      make = data.draw(matvecs(device))
      with without("hoist"): ref = make().numpy()
      assert_close_fp16(make().numpy(), ref)
  prop()

@pytest.mark.parametrize("device", DEVICES)
def test_int_to_float_is_bit_identical(device):
  @settings(max_examples=EXAMPLES.get(device, 20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.sampled_from(["Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]), st.sampled_from([1, 2, 3]), st.sampled_from([4, 8]), st.integers(0, 2**16))
  def prop(qtype, nblocks, out, seed):
    with Context(DEV=device):
      rng = np.random.default_rng(seed)
      w = quantized(rng, (out, nblocks * (256 if qtype.endswith("_K") else 32)), qtype, device)
      make = lambda: w.float() * 1  # the dequant alone: every element converted from its integer
      with without("int_to_float"): ref = make().numpy()
      np.testing.assert_array_equal(make().numpy(), ref)
  prop()

@pytest.mark.parametrize("device", DEVICES)
def test_int_to_float_converts_any_bit_field_of_a_word_exactly(device):
  # a field (w >> s) & (2^k - 1) of a uint8/16/32 word, plus a constant, converted in place where the float's mantissa
  # holds it (s + k <= 23) and through the shifted value elsewhere: exactly numpy's value either way
  @settings(max_examples=EXAMPLES.get(device, 20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.sampled_from([np.uint8, np.uint16, np.uint32]), st.integers(0, 31), st.integers(1, 12), st.integers(-300, 300), st.integers(0, 2**16))
  def prop(npdt, shift, width, c, seed):
    bits = 8 * np.dtype(npdt).itemsize
    shift, width = shift % bits, min(width, bits - shift % bits)
    words = np.random.default_rng(seed).integers(0, np.iinfo(npdt).max, 64, dtype=npdt, endpoint=True)
    want = ((words.astype(np.int64) >> shift) & ((1 << width) - 1)).astype(np.float32) + c
    with Context(DEV=device):
      w = Tensor(words, device=device).realize()
      make = lambda: ((w >> shift) & ((1 << width) - 1)).cast(dtypes.float32) + c
      np.testing.assert_array_equal(make().numpy(), want)
      if shift + width <= 23:  # in place: the field's mask and the exponent of 2^(23-shift), no shift of the word
        src = "\n".join(kernel_sources(make, device))
        assert f"{((1 << width) - 1) << shift}u" in src and f"{(150 - shift) << 23}u" in src, src
  prop()

def test_int_to_float_covers_every_int8_and_nibble():
  # the identities the pass relies on, over their whole domains: signed bytes (b ^ 0x80) - 128, nibbles - 8
  b = Tensor(np.arange(256, dtype=np.uint8))
  np.testing.assert_array_equal(b.bitcast(dtypes.int8).float().numpy(), np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32))
  np.testing.assert_array_equal(((b & 15).bitcast(dtypes.int8) - 8).float().numpy(), (np.arange(256) & 15).astype(np.float32) - 8)

def lowered(ast:UOp, ren) -> list[UOp]: return list(linearize(full_rewrite_to_sink(ast, ren)))

def loop_depths(prog:list[UOp]) -> dict[UOp, int]:
  depth, at = 0, {}
  for u in prog:
    if u.op is Ops.RANGE: depth += 1
    if u.op is Ops.END: depth -= 1
    at[u] = depth
  return at

def block_scales(prog:list[UOp]) -> list[UOp]:
  """The Q4_0 block scales: the fp16 read from the block's first two bytes, as float."""
  scales = [u for u in prog if u.op is Ops.CAST and u.dtype == dtypes.float32 and u.src[0].op is Ops.BITCAST and u.src[0].dtype == dtypes.half]
  assert len(scales) >= 1, "no fp16 scale read in the kernel"
  return scales

def scale_users(ast:UOp, ren) -> list[tuple[UOp, int]]:
  """Each use of a Q4_0 block scale, with its loop depth."""
  prog = lowered(ast, ren)
  at = loop_depths(prog)
  return [(u, at[u]) for s in block_scales(prog) for u in prog if s in u.src]

def scale_load_depths(ast:UOp, ren) -> list[int]:
  prog = lowered(ast, ren)
  at = loop_depths(prog)
  return [at[x] for s in block_scales(prog) for x in s.toposort() if x.op is Ops.LOAD]

@a_row_and_a_block_per_lane()
def test_scale_is_applied_once_per_block():
  # the matvec heuristic unrolls a block per lane: the 32 products of a block are summed, then scaled once
  ast = q4_0_matvec_ast()
  assert len(scale_users(ast, cuda_renderer())) == 1
  with without("hoist"): assert len(scale_users(ast, cuda_renderer())) == 32

def test_scale_leaves_the_inner_loop():
  # without unrolling (tinygrad's own opts: a loop over the 16 bytes inside a loop over the blocks), the scale's
  # multiply runs in the block loop, not in the loop over the block's elements
  ast = with_opts(q4_0_matvec_ast(64, 256))
  def depths(): return [d for _, d in scale_users(ast, cuda_renderer())]
  innermost = depth_of_loads(ast)
  assert depths() and all(d < innermost for d in depths()), (depths(), innermost)
  assert all(d < innermost for d in scale_load_depths(ast, cuda_renderer()))  # the scale is read once per block
  with without("hoist"): assert all(d == innermost for d in depths())

def depth_of_loads(ast:UOp) -> int:
  """The loop depth of the weight's nibble loads (the innermost loop of the kernel)."""
  prog, depth, out = lowered(ast, cuda_renderer()), 0, 0
  for u in prog:
    if u.op is Ops.RANGE: depth += 1
    if u.op is Ops.END: depth -= 1
    if u.op is Ops.LOAD and u.dtype in (dtypes.uint8, dtypes.uint16): out = max(out, depth)
  return out

def nibble_fields(src:str, cuda:bool) -> dict[int, int]:
  """Nibble position s -> how many conversions OR the exponent of 2^(23-s) onto the nibble masked in place in its word."""
  out = {}
  for s in (0, 4, 8, 12):
    mask, bits = 15 << s, (150 - s) << 23
    out[s] = src.count(f'"r"({mask}u), "r"({bits}u)') if cuda else src.count(f"&{mask}u)|{bits}u)")
  return out

@a_row_and_a_block_per_lane()
@without("subnormal_dequant")  # on CUDA it converts these nibbles first (tests/test_subnormal_dequant.py)
def test_rendered_cuda_and_metal_convert_nibbles_in_place_through_the_exponent():
  # a Q4_0 block's 32 nibbles, read as 8 ushorts: each is masked where it sits in its word and gets the exponent that
  # makes the float 2^(23-s) + n (on CUDA one lop3 with both constants in registers), with no shift and no byte split
  ast = q4_0_matvec_ast()
  for ren, cuda in ((cuda_renderer(), True), (metal_renderer(), False)):
    on = render(ast, ren)
    assert nibble_fields(on, cuda) == {0: 8, 4: 8, 8: 8, 12: 8}, on
    assert on.count("lop3.b32") == (32 if cuda else 0), on
    assert "(float)((tg_bitcast<signed char>" not in on.replace("as_type<signed char>", "tg_bitcast<signed char>"), on
    with without("int_to_float"): off = render(ast, ren)
    assert "1258291200u" not in off and "lop3" not in off, off
  old_gpu = render(ast, cuda_renderer("sm_35"))  # before sm_50 PTX has no lop3: an AND and an OR
  assert "lop3" not in old_gpu and nibble_fields(old_gpu, False) == {0: 8, 4: 8, 8: 8, 12: 8}, old_gpu
  need_tool("nvcc", "the CUDA toolkit's compiler, to compile the rendered CUDA")
  assert len(cuda_renderer().compiler.compile(render(ast, cuda_renderer()))) > 0

def test_bit_field_reads_through_shifts_masks_and_casts():
  # the chain packed_loads and tinygrad.llm's Q4_0 dequant leave: a byte of a word, then a nibble of the byte
  from tinygrad_ext.passes.shared import bit_field
  w = UOp.variable("w", 0, 65535, dtypes.uint16)
  byte = ((w >> 8) & 255).cast(dtypes.uint8)
  assert bit_field((byte // 16) & 15) == (w, 12, 15)
  assert bit_field(byte & 15) == (w, 8, 15)
  assert bit_field(w.cast(dtypes.uint8) >> 4) == (w, 4, 15)  # a narrowing cast keeps the low 8 bits
  x = UOp.variable("x", 0, 200, dtypes.uint32)
  assert bit_field(x) == (x, 0, 255)  # no field: the value itself, masked by its range

def test_a_factor_read_from_a_stored_buffer_stays():
  # the factor s reads the buffer the kernel stores to: a store inside the loop could change it, so it is not moved
  out, w = UOp.placeholder((4,), dtypes.float32, 0), UOp.placeholder((4, 8), dtypes.float32, 1)
  b, j = UOp.range(4, 0), UOp.range(8, 1)
  s, x = out.index(b), w.index(b, j)
  assert split_invariant([x, s], {j}, set()) is not None
  assert split_invariant([x, s], {j}, {out}) is None
  assert split_invariant([x, w.index(b, 0)], {j}, {out}) is not None

def test_plain_float_matvec_keeps_its_casts():
  # no factor to hoist (an fp16 weight): the half products are not widened, the kernel is unchanged
  w, x = Tensor.empty(256, 2048, dtype=dtypes.half), Tensor.empty(1, 2048, dtype=dtypes.half)
  ast = kernel_asts(lambda: x @ w.T)[0]
  on = render(ast, cuda_renderer())
  with without("hoist"): off = render(ast, cuda_renderer())
  assert on == off

@a_row_and_a_block_per_lane()
def test_moe_scale_is_applied_once_per_block():
  # MoE: the expert id gates every weight load, and a select wraps the dequantized weight; as ExpertWeights builds it
  # (contiguous) and as a kernel that assigns into an existing buffer (the select's 0 is then a weak float)
  raw = Tensor.empty(8 * 256 * 2048 // 32 * 18, dtype=dtypes.uint8)
  x, sel = Tensor.empty(1, 1, 1, 2048, dtype=dtypes.float16), Tensor.empty(1, 1, 4, dtype=dtypes.int32)
  out = Tensor.empty(1, 1, 4, 1, 256, dtype=dtypes.float32)
  w = ggml_data_to_tensor(raw, 8 * 256 * 2048, 2).reshape(8, 256, 2048)
  y = lambda: x.float().unsqueeze(-2) @ w[sel].transpose(-1, -2)  # the GLM model's experts() (mixed numerics)
  for make in (lambda: y().contiguous(), lambda: out.assign(y())):
    ast = kernel_asts(make)[-1]
    on = [u for u, _ in scale_users(ast, cuda_renderer())]
    with without("hoist"): off = [u for u, _ in scale_users(ast, cuda_renderer())]
    assert len(on) == 1 and len(off) == 32, (len(on), len(off))  # a block per lane (4x256 rows < 2048 inputs): 32 products

def test_moe_gate_leaves_the_loop():
  # the expert id's check against the expert count gates the MoE weight: with hoist, the sum is selected once after the
  # lanes combine it, and no select (of a word, an element or the scale) is left inside the loop over the blocks
  ast = gated_moe_matvec_ast()
  def in_loop_selects() -> int:
    # this 2M-weight MoE matvec would spread its blocks over warps (CUDA's reduce_warps), one step each and no loop left;
    # GLM's MoE matvecs (31M weights) keep the loop this is about
    with Context(TINYGRAD_EXT_MATVEC_POLICY="reduce_warps=1"): prog = lowered(ast, cuda_renderer())
    at = loop_depths(prog)
    return sum(1 for u in prog if u.op is Ops.WHERE and at[u] > 0)
  on = in_loop_selects()
  with without("hoist"): off = in_loop_selects()
  assert on == 0 and off >= 10, (on, off)
  src = render(ast, cuda_renderer())
  assert src.count("?") == 5, src  # the id's wrap and clamp (3), and one select of each row's sum
  need_tool("nvcc", "the CUDA toolkit's compiler, to compile the rendered CUDA")
  assert len(cuda_renderer().compiler.compile(src)) > 0
