"""matvec heuristic: recognizes GEMV / MoE matvecs over GGML dequant chains and plain float weights, picks REDUCE_LOCAL
opts for them, leaves everything else to tinygrad; results equal passes off."""
import os, re
import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tinygrad import Tensor, dtypes, Device
from tinygrad.helpers import Context, prod
from tinygrad.llm.gguf import ggml_data_to_tensor
import tinygrad_ext
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad_ext.passes.reduce_local import OptOpsExt
from kernels import kernel_asts, cuda_renderer, metal_renderer, render, q4_0_matvec_ast, gated_moe_matvec_ast, shuffle_offsets
from helpers import QTYPES, quantized, matvecs, assert_close_fp16, applied, need_tool

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")
EXAMPLES = {"CPU": 10}  # clang compiles slowly, and without local memory the heuristic declines there anyway

@pytest.mark.parametrize("device", DEVICES)
def test_matvec_passes_on_equal_passes_off(device):
  @settings(max_examples=EXAMPLES.get(device, 25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.data())
  def prop(data):
    with Context(DEV=device):
      make = data.draw(matvecs(device))
      # the backend's policy, or one that splits each quant block over lanes (down to a 2-byte word a lane), or a row's
      # blocks over warps (with wide matrices' blocks split too and short loops unrolled whole), or two blocks a loop
      # step at any size (CUDA's choices, run here too)
      policy = data.draw(st.sampled_from(["", "lanes_per_block=2", "lanes=32,lanes_per_block=4", "lanes=32,lanes_per_block=2,reduce_warps=8",
                                          "lanes=16,lanes_per_block=2,block_unroll=2,block_unroll_min_elements=0",
                                          "lanes=32,lanes_per_block=8,block_unroll=4,block_unroll_min_elements=0",
                                          "lanes=32,lanes_per_block=2,lanes_per_block_wide=2,reduce_warps=8,short_loop_unroll=8",
                                          "spread_in_block=0", "lanes=32,spread_in_block=1,reduce_warps=8",
                                          "lanes=32,spread_in_block=1,spread_word_bytes=8"]))
      with tinygrad_ext.passes_off(): ref = make().numpy()
      with Context(TINYGRAD_EXT_MATVEC_POLICY=policy): assert_close_fp16(make().numpy(), ref)
  prop()

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype, inp, lanes_per_block", [("Q4_0", 1536, 1), ("Q4_0", 2560, 1), ("Q8_0", 1536, 1), ("Q4_K", 3072, 2)])
def test_matvec_rows_split_over_warps_equal_passes_off(device, qtype, inp, lanes_per_block):
  # reduce_warps: each lane's blocks split over 3 or 5 warps (a GROUP after REDUCE_LOCAL), the warps' sums combined after
  # each warp's lanes (that order once went wrong: every lane stored into its warp's one slot). Q4_K's 256-element blocks
  # go 2 lanes a block (REDUCE_LOCAL on both block axes): a whole block a lane took PoCL over 5 minutes to compile
  with Context(DEV=device):
    w, r = quantized(rng, (16, inp), qtype, device), np.random.default_rng(inp)
    xs = Tensor(r.uniform(-1, 1, (1, inp)).astype(np.float16), device=device).realize()
    with tinygrad_ext.passes_off(): ref = (xs @ w.T).float().numpy()
    with Context(TINYGRAD_EXT_MATVEC_POLICY=f"lanes=16,reduce_warps=8,lanes_per_block_wide={lanes_per_block}"):
      if Device[device].renderer.has_local:  # where the heuristic runs at all (CPU has no local threads)
        assert any(o.op is OptOps.GROUP and o.arg in (3, 5) for o in applied(lambda: xs @ w.T, Device[device].renderer))
      assert_close_fp16((xs @ w.T).float().numpy(), ref)

rng = np.random.default_rng(0)
x = Tensor.empty(1, 2048, dtype=dtypes.float16)

@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
def test_matvec_picks_reduce_local_for_decode_matvecs(qtype):
  # only the kernel's opts are checked: a BF16 weight stays unrealized (DEV=CPU's clang 14 has no __bf16 to make one)
  w = Tensor.empty(256, 2048, dtype=dtypes.bfloat16).cast(dtypes.float16) if qtype == "BF16" else quantized(rng, (256, 2048), qtype, Device.DEFAULT)
  def lanes(opts) -> int: return prod(o.arg for o in opts if o.op is OptOpsExt.REDUCE_LOCAL)
  # a lane per quant block (the largest power of two up to 32 that divides them): 2048 inputs are 64 blocks of Q4_0 and
  # Q8_0 and 256 steps of 8 float weights, but 8 super-blocks of a K-quant
  with Context(TINYGRAD_EXT_MATVEC_POLICY="lanes_per_block_wide=1,spread_in_block=0"):
    assert lanes(applied(lambda: x @ w.T, cuda_renderer())) == (8 if qtype.endswith("_K") else 32)
  # CUDA's policy: fewer rows than inputs and the rows split over warps, so the quantized blocks are split over lanes
  # too (2 a Q4_0/Q8_0 block, 4 a K-quant super-block): 32 lanes a row either way
  opts = applied(lambda: x @ w.T, cuda_renderer())
  assert lanes(opts) == 32, opts
  # CUDA: 2 rows per lane on quantized weights at any size (a fused activation is computed once for both); small float
  # matrices (the float32 router) keep one
  assert any(o.op is OptOps.UPCAST and o.arg == 2 for o in opts) == (qtype not in ("F16", "BF16")), opts
  assert any(o.op is OptOpsExt.REDUCE_LOCAL for o in applied(lambda: x @ w.T, metal_renderer()))
  with tinygrad_ext.passes_off(): assert not any(o.op is OptOpsExt.REDUCE_LOCAL for o in applied(lambda: x @ w.T, cuda_renderer()))
  with tinygrad_ext.only("reduce_local"): assert not any(o.op is OptOpsExt.REDUCE_LOCAL for o in applied(lambda: x @ w.T, cuda_renderer()))

def test_matvec_moe_reads_experts_in_place_and_gets_reduce_local():
  w = quantized(rng, (8, 256, 2048), "Q4_0", Device.DEFAULT)
  sel = Tensor([[[1, 5]]], dtype=dtypes.int32)
  make = lambda: (x.reshape(1, 1, 1, 2048).unsqueeze(-2) @ w[sel].transpose(-1, -2)).contiguous()  # as ExpertWeights
  assert len(kernel_asts(make)) == 1, "no kernel gathers (copies) the selected experts' weights"
  assert any(o.op is OptOpsExt.REDUCE_LOCAL for o in applied(make, cuda_renderer()))

@pytest.mark.parametrize("moe", [False, True])
def test_q4_0_matvec_renders_simd_sum_and_ushorts_on_metal_and_a_compiling_shuffle_butterfly_on_cuda(moe):
  # the heuristic's own choice (default policies), GLM's attn_output shape or its MoE down with 4 of 8 experts
  ast = gated_moe_matvec_ast(8, 2048, 1536) if moe else q4_0_matvec_ast(2048, 5120)
  metal, cuda = render(ast, metal_renderer()), render(ast, cuda_renderer())
  # a whole simdgroup a row sums with simd_sum; MoE down's 48 blocks a row fill 16 lanes (Metal's policy: a block a lane),
  # which sum by shuffles: either way within the simdgroup, no threadgroup memory
  assert ("simd_sum(" in metal if not moe else metal.count("simd_shuffle_xor(") == 4) and "threadgroup_barrier" not in metal, metal
  assert "*((device unsigned short*)" in metal and "unsigned char val" not in metal, metal
  offsets = shuffle_offsets(cuda)
  # one 32-lane butterfly per row a lane sums (the rows of a lane one after the other, or interleaved step by step)
  n = len(offsets) // 5
  assert offsets and offsets in ([16, 8, 4, 2, 1] * n, [o for o in (16, 8, 4, 2, 1) for _ in range(n)]), cuda
  assert "*((unsigned short*)" in cuda and "unsigned char val" not in cuda, cuda
  with tinygrad_ext.passes_off():  # stock tinygrad: byte loads, no warp reduce
    stock_metal, stock_cuda = render(ast, metal_renderer()), render(ast, cuda_renderer())
  assert "simd_" not in stock_metal and "*((device unsigned short*)" not in stock_metal and "unsigned char val" in stock_metal
  assert "__shfl_xor_sync" not in stock_cuda
  need_tool("nvcc", "the CUDA toolkit's compiler, to compile the rendered CUDA")
  assert len(cuda_renderer().compiler.compile(cuda)) > 0

def test_matvec_leaves_gemm_and_other_kernels_to_tinygrad():
  w = quantized(rng, (256, 2048), "Q4_0", Device.DEFAULT)
  x4 = Tensor.empty(4, 2048, dtype=dtypes.float16)
  for make in (lambda: x4 @ w.T, lambda: (x4 * 2).sum(axis=1), lambda: (x4.float().exp()).max(axis=1)):
    with tinygrad_ext.passes_off(): stock = applied(make, cuda_renderer())
    assert applied(make, cuda_renderer()) == stock

def test_matvec_takes_a_small_reduce_beside_it():
  # GLM's MoE output: (expert rows * weights).sum over the 4 selected + the shared expert's down matvec, one kernel
  w = quantized(rng, (2048, 1536), "Q4_0", Device.DEFAULT)
  rows, weights, act = Tensor.empty(1, 4, 2048, dtype=dtypes.float16), Tensor.empty(1, 4, 1, dtype=dtypes.float16), Tensor.empty(1, 1536, dtype=dtypes.float16)
  make = lambda: (rows * weights).sum(1) + act @ w.T
  opts = applied(make, cuda_renderer())
  assert any(o.op is OptOpsExt.REDUCE_LOCAL for o in opts) and Opt(OptOps.UNROLL, 0, 4) in opts, opts
  big = Tensor.empty(1, 64, 2048, dtype=dtypes.float16)  # a side reduce as long as a row is no side reduce: left to tinygrad
  with tinygrad_ext.passes_off(): stock = applied(lambda: big.sum(1) + act @ w.T, cuda_renderer())
  assert applied(lambda: big.sum(1) + act @ w.T, cuda_renderer()) == stock

def test_matvec_takes_fused_activations_and_moe_down():
  # the activation may be an expression (an RMSNorm fused into the matmul) and, in MoE down, read the expert slot axis
  w = quantized(rng, (8, 256, 2048), "Q4_0", Device.DEFAULT)
  dense = quantized(rng, (256, 2048), "Q4_0", Device.DEFAULT)
  sel = Tensor([[[1, 5]]], dtype=dtypes.int32)
  xs = Tensor.empty(1, 1, 2, 2048, dtype=dtypes.float16)
  for make in (lambda: (xs.unsqueeze(-2) @ w[sel].transpose(-1, -2)).contiguous(), lambda: (x * 3 + 1) @ dense.T):
    assert any(o.op is OptOpsExt.REDUCE_LOCAL for o in applied(make, cuda_renderer()))

def upcast_rows(opts) -> int: return max([o.arg for o in opts if o.op is OptOps.UPCAST], default=1)

def test_matvec_gives_a_costly_activation_more_rows_per_lane():
  # MoE down reads silu(gate) * up: an exp and a reciprocal per element, computed once per lane for all its rows
  sel = Tensor([[[1, 5, 6, 7]]], dtype=dtypes.int32)
  gate_up = Tensor.empty(1, 1, 4, 2 * 1536, dtype=dtypes.float16)
  act = gate_up[..., :1536].silu() * gate_up[..., 1536:]
  def moe_down(experts, rows):
    w = quantized(rng, (experts, rows, 1536), "Q4_0", Device.DEFAULT)
    return lambda: (act.unsqueeze(-2) @ w[sel].transpose(-1, -2)).contiguous()
  assert upcast_rows(applied(moe_down(8, 2048), cuda_renderer())) == 4  # 4 x 2048 x 1536: over 8M elements
  assert upcast_rows(applied(moe_down(8, 256), cuda_renderer())) == 2   # smaller: fewer threads would cost more
  # a norm's rsqrt is once per row, not per element: the plain policy
  w = quantized(rng, (4096, 2048), "Q4_0", Device.DEFAULT)
  normed = lambda: (x.float() * (x.float().square().mean(-1, keepdim=True) + 1e-5).rsqrt()).cast(dtypes.half) @ w.T
  assert upcast_rows(applied(normed, cuda_renderer())) == 2

def test_matvec_gives_a_float32_activation_more_rows_per_lane():
  # a MoE block's gate+up reads the block's float32 norm: 4 bytes of activation an element, loaded again for every row
  # group; CUDA's policy gives each lane 4 rows from 8M weights to share those loads (wide_act_upcast_rows)
  w = quantized(rng, (4096, 2048), "Q4_0", Device.DEFAULT)
  row32, row16 = Tensor.empty(1, 2048, dtype=dtypes.float32), Tensor.empty(1, 2048, dtype=dtypes.float16)
  matvec = lambda act: (lambda: act.float() @ w.T)
  assert upcast_rows(applied(matvec(row32), cuda_renderer())) == 4
  assert upcast_rows(applied(matvec(row16), cuda_renderer())) == 2  # fp16: half the bytes, the plain policy
  small = quantized(rng, (1024, 2048), "Q4_0", Device.DEFAULT)
  assert upcast_rows(applied(lambda: row32.float() @ small.T, cuda_renderer())) == 2  # under wide_act_min_elements
  with Context(TINYGRAD_EXT_MATVEC_POLICY="wide_act_upcast_rows=0"):  # the field is what decides
    assert upcast_rows(applied(matvec(row32), cuda_renderer())) == 2
  # and it computes what passes off does, here (the policy override reaches this device's policy too)
  act = Tensor(rng.standard_normal((1, 2048)).astype(np.float32)).realize()
  with tinygrad_ext.passes_off(): ref = (act @ small.float().T).numpy()
  with Context(TINYGRAD_EXT_MATVEC_POLICY="wide_act_upcast_rows=4,wide_act_min_elements=0"):
    assert upcast_rows(applied(lambda: act @ small.float().T, Device[Device.DEFAULT].renderer)) == 4
    np.testing.assert_allclose((act @ small.float().T).numpy(), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))

def test_matvec_keeps_enough_blocks_for_few_rows():
  # the 64-row float32 router: one row per block (64 blocks), where 4 rows per block would leave 16
  router = Tensor.empty(64, 2048, dtype=dtypes.float32)
  opts = applied(lambda: x.float() @ router.T, cuda_renderer())
  assert any(o.op is OptOpsExt.REDUCE_LOCAL for o in opts) and not any(o.op is OptOps.LOCAL for o in opts), opts
  big = Tensor.empty(1024, 2048, dtype=dtypes.float32)
  assert Opt(OptOps.LOCAL, 0, 4) in applied(lambda: x.float() @ big.T, cuda_renderer())

def block_threads(opts) -> int: return prod(o.arg for o in opts if o.op in (OptOps.LOCAL, OptOpsExt.REDUCE_LOCAL))

def test_matvec_fills_a_warp_where_the_reduce_is_short():
  # attn_k_b's 192 inputs are 6 Q4_0 blocks: 4 lanes a row, so 8 rows a block fill one 32-lane warp (4 left it half empty)
  w = quantized(rng, (4096, 192), "Q4_0", Device.DEFAULT)
  short = Tensor.empty(1, 192, dtype=dtypes.float16)
  opts = applied(lambda: short @ w.T, cuda_renderer())
  assert block_threads(opts) == 32 and Opt(OptOps.LOCAL, 0, 8) in opts, opts
  with Context(TINYGRAD_EXT_MATVEC_POLICY="min_block_threads=0"): assert block_threads(applied(lambda: short @ w.T, cuda_renderer())) == 16
  long = quantized(rng, (4096, 2048), "Q4_0", Device.DEFAULT)  # 32 lanes a row already fill a warp: as before
  with Context(TINYGRAD_EXT_MATVEC_POLICY="min_block_threads=0"): before = applied(lambda: x @ long.T, cuda_renderer())
  assert applied(lambda: x @ long.T, cuda_renderer()) == before

def q_b_reading_its_norm(w:Tensor):
  """GLM's attn_q_b: the matvec of the q_a RMSNorm (768 of q_a+kv_a's 1344 outputs), fused into it."""
  q_a, norm = Tensor.empty(1, 1344, dtype=dtypes.float16), Tensor.empty(768, dtype=dtypes.float32)
  def make():
    xf = q_a[:, :768].float()
    return (xf * (xf.square().mean(-1, keepdim=True) + 1e-5).rsqrt() * norm).cast(dtypes.half) @ w.T
  return make

def test_matvec_spreads_a_short_norm_over_its_lanes():
  # GLM's q_b reads the 768-wide q_a RMSNorm: fusion leaves the norm in the matvec, whose lanes also split its sum of
  # squares (24 elements a lane, one butterfly), where a thread would otherwise walk all 768
  (ast,) = kernel_asts(q_b_reading_its_norm(quantized(rng, (5120, 768), "Q4_0", Device.DEFAULT)))
  src = render(ast, cuda_renderer())
  assert "< 24;" in src and "< 768;" not in src and src.count("__shfl_xor_sync") == 5 * 3, src  # the norm's + 2 rows'

@pytest.mark.parametrize("device", DEVICES)
def test_matvec_takes_the_moe_output_with_its_routing_weights_inside(device):
  # GLM's MoE output with fusion's tiny routing buffers inlined: the experts' rows weighed by their scores over the
  # scores' sum (two side reduces over the 4 selected experts) plus the shared expert's down matvec, one kernel
  r = np.random.default_rng(5)
  with Context(DEV=device):
    w = quantized(r, (256, 512), "Q4_0", device)
    rows = Tensor(r.standard_normal((1, 4, 256)).astype(np.float16)).realize()
    # 8 experts: the one-hot gather of their scores is itself a reduce small enough to be a side reduce
    scores = Tensor(r.random((1, 8)).astype(np.float32)).realize()
    sel = Tensor(r.choice(8, 4, replace=False).astype(np.int32).reshape(1, 4)).realize()
    act = Tensor(r.standard_normal((1, 512)).astype(np.float16)).realize()
    def make():
      s = scores.sigmoid().gather(-1, sel)  # a gathered expression: one-hot reduces over the 8, the same in both uses
      return (rows * (s / s.sum(-1, keepdim=True)).cast(dtypes.half).unsqueeze(-1)).sum(1) + act @ w.T
    assert len(kernel_asts(make)) == 1
    opts = applied(make, cuda_renderer())
    assert any(o.op is OptOpsExt.REDUCE_LOCAL for o in opts) and opts.count(Opt(OptOps.UNROLL, 0, 4)) == 2, opts
    with tinygrad_ext.passes_off(): ref = make().numpy()
    assert_close_fp16(make().numpy(), ref)

def groups(opts) -> list: return [o for o in opts if o.op is OptOps.GROUP]

def test_matvec_splits_a_rows_blocks_over_warps_only_where_it_is_alone_in_its_kernel():
  # CUDA's reduce_warps: a lone matvec under 11M weights gets a GROUP on what the lanes leave of the blocks (5120 inputs:
  # 160 Q4_0 blocks, 5 a lane, 5 warps); with a row reduce in its activation (q_b's fused q_a norm, which each warp would
  # repeat) or a side reduce (attn_output's epilogue recomputing the MoE output) it gets none: both lost in the model
  # (with its blocks split in two over lanes, 10 lane steps, 2 warps: the next test)
  w, wq_b = quantized(rng, (256, 5120), "Q4_0", Device.DEFAULT), quantized(rng, (512, 768), "Q4_0", Device.DEFAULT)
  x5 = Tensor.empty(1, 5120, dtype=dtypes.float16)
  with Context(TINYGRAD_EXT_MATVEC_POLICY="lanes_per_block_wide=1"):
    assert groups(applied(lambda: x5 @ w.T, cuda_renderer())) == [Opt(OptOps.GROUP, 0, 5)]
  assert groups(applied(lambda: x5 @ w.T, cuda_renderer())) == [Opt(OptOps.GROUP, 0, 2)]
  with Context(TINYGRAD_EXT_MATVEC_POLICY="reduce_warps=1"): assert not groups(applied(lambda: x5 @ w.T, cuda_renderer()))
  x7 = Tensor.empty(1, 768, dtype=dtypes.float16)
  assert groups(applied(lambda: x7 @ wq_b.T, cuda_renderer())) == [Opt(OptOps.GROUP, 0, 3)]  # 24 blocks: 8 lanes x 3
  assert not groups(applied(q_b_reading_its_norm(wq_b), cuda_renderer()))
  rows, weights = Tensor.empty(1, 4, 256, dtype=dtypes.float16), Tensor.empty(1, 4, 1, dtype=dtypes.float16)
  opts = applied(lambda: (rows * weights).sum(1) + x5 @ w.T, cuda_renderer())
  assert any(o.op is OptOpsExt.REDUCE_LOCAL for o in opts) and not groups(opts), opts

def gguf_empty(qtype:str, *shape:int) -> Tensor:
  """A weight of qtype over Tensor.empty bytes: only the opts are looked at."""
  t = gguf.GGMLQuantizationType[qtype]
  (elements, nbytes), n = gguf.GGML_QUANT_SIZES[t], prod(shape)
  return ggml_data_to_tensor(Tensor.empty(n // elements * nbytes, dtype=dtypes.uint8), n, int(t)).reshape(*shape).cast(dtypes.float16)

def test_matvec_splits_wide_blocks_and_unrolls_short_loops_where_warps_split_rows():
  # CUDA (benchmarks/results/h200-2026-12-02e-kernels.txt): a wide matrix whose rows go over warps (attn_output, 2048 x
  # 5120) splits its blocks in two over lanes, and the 5 steps left to each of its 2 warps are unrolled whole (5.4 ->
  # 4.6 us); with no warps the loops stay: MoE gate+up (4 of 64 x 3072 x 2048) unrolled was faster alone (8.3 -> 7.9)
  # and slower in the model (examples/glm/results/h200-2026-12-02e-full-q4_0-policy-ab.txt: 8.95 -> 10.78 a call), the
  # dense ffn up (10240 x 2048) slower alone (6.6 -> 6.8) while its rows stayed on one warp. The tall rule splits them
  # over 2 warps, which leaves each 2 steps, unrolled (h200-2026-12-03-kernels.txt, its policy_r4g2b1 column: 6.0 us;
  # h200-2026-12-05-kernels.txt, main with the rule by default: 6.0 us)
  def block_opts(make) -> list:
    return [o for o in applied(make, cuda_renderer()) if o.op in (OptOps.GROUP, OptOps.UNROLL, OptOpsExt.REDUCE_LOCAL)]
  x5, w = Tensor.empty(1, 5120, dtype=dtypes.float16), gguf_empty("Q4_0", 2048, 5120)
  # the block's 16 bytes: 8 a lane; 2 lanes a block, 16 blocks a warp step, 2 warps, 5 steps unrolled
  assert block_opts(lambda: x5 @ w.T) == [Opt(OptOps.UNROLL, 2, 8), Opt(OptOps.UNROLL, 1, 2), Opt(OptOpsExt.REDUCE_LOCAL, 1, 2),
                                          Opt(OptOpsExt.REDUCE_LOCAL, 0, 16), Opt(OptOps.GROUP, 0, 2), Opt(OptOps.UNROLL, 2, 5)]
  with Context(TINYGRAD_EXT_MATVEC_POLICY="lanes_per_block_wide=1,short_loop_unroll=0"):
    assert block_opts(lambda: x5 @ w.T) == [Opt(OptOps.UNROLL, 2, 16), Opt(OptOps.UNROLL, 1, 2), Opt(OptOpsExt.REDUCE_LOCAL, 0, 32),
                                            Opt(OptOps.GROUP, 0, 5)]
  with Context(TINYGRAD_EXT_MATVEC_POLICY="short_loop_unroll=0"): assert block_opts(lambda: x5 @ w.T)[-1] == Opt(OptOps.GROUP, 0, 2)
  experts, sel = gguf_empty("Q4_0", 64, 3072, 2048), Tensor.empty(1, 1, 4, dtype=dtypes.int32)
  moe = lambda: (x.reshape(1, 1, 1, 2048).unsqueeze(-2) @ experts[sel].transpose(-1, -2)).contiguous()
  w_up = gguf_empty("Q4_0", 10240, 2048)
  assert block_opts(moe)[-1].op is OptOpsExt.REDUCE_LOCAL, block_opts(moe)
  with Context(TINYGRAD_EXT_MATVEC_POLICY="tall_upcast_rows=0"):
    assert block_opts(lambda: x @ w_up.T)[-1].op is OptOpsExt.REDUCE_LOCAL, block_opts(lambda: x @ w_up.T)
  assert block_opts(lambda: x @ w_up.T)[-2:] == [Opt(OptOps.GROUP, 0, 2), Opt(OptOps.UNROLL, 2, 2)]

def test_matvec_unrolls_two_blocks_a_step_only_on_the_largest_matrices():
  # CUDA's block_unroll=2 from 64M weights: the output head (154880 x 2048) takes two of its blocks a loop step, which won
  # on it and lost on the dense ffn up and MoE gate+up (21M, 25M weights)
  def block_unrolls(w:Tensor) -> list:
    """The opts the policy in force applies beyond block_unroll=1's, in order (the same opts can occur twice)."""
    opts = list(applied(lambda: x @ w.T, cuda_renderer()))
    with Context(TINYGRAD_EXT_MATVEC_POLICY="block_unroll=1"): plain = applied(lambda: x @ w.T, cuda_renderer())
    for o in plain: opts.remove(o)
    return opts
  # 64M weights: the blocks left to a lane after the lanes (axis 1: 2048 inputs are 64 blocks, 32 lanes, 2 steps)
  assert block_unrolls(gguf_empty("Q4_0", 32768, 2048)) == [Opt(OptOps.UNROLL, 1, 2)]
  assert block_unrolls(gguf_empty("Q4_0", 16384, 2048)) == []  # 32M

@pytest.mark.parametrize("qtype, inp, row_lanes", [("Q4_K", 768, 32), ("Q6_K", 512, 32), ("Q5_0", 64, 8)])
def test_matvec_spreads_a_short_rows_blocks_over_lanes(qtype, inp, row_lanes):
  # attn_q_b in Q4_K: 768 inputs are 3 super-blocks, which no power of two of lanes divides; a row's lanes take the
  # super-block's 32-byte groups and its bytes a word a lane instead (32 lanes a row), where they took only 2 and the
  # heuristic declined (Q5_0's 2 blocks of 16 bytes: 4 lanes a block, a word each). The lanes read other bytes: no
  # nibble half (the same bytes) goes over lanes
  w = quantized(rng, (5120, inp), qtype, Device.DEFAULT)
  short = Tensor.empty(1, inp, dtype=dtypes.float16)
  def lanes(opts) -> int: return prod(o.arg for o in opts if o.op is OptOpsExt.REDUCE_LOCAL)
  opts = applied(lambda: short @ w.T, cuda_renderer())
  assert lanes(opts) == row_lanes, opts
  with Context(TINYGRAD_EXT_MATVEC_POLICY="spread_in_block=0"): assert lanes(applied(lambda: short @ w.T, cuda_renderer())) < row_lanes
  (ast,) = kernel_asts(lambda: short @ w.T)
  from kernels import scheduler_of
  from tinygrad.uop.ops import AxisType
  from tinygrad_ext.passes.matvec import distinct_byte_axes, pm_matvec
  k = scheduler_of(ast, cuda_renderer())
  red = k.axes_of(AxisType.REDUCE)
  m = pm_matvec.rewrite(next(r for r in k.reduceops))
  # Q4_K: the 4 groups of 32 bytes (2 x 2) and not the nibble half; Q6_K: the two 128-element halves; Q5_0: the 16 bytes' two halves
  assert [k.full_shape[i] for i in distinct_byte_axes(k, m.weight, red)] == {"Q4_K": [2, 2], "Q6_K": [2], "Q5_0": [2]}[qtype]

def test_matvec_gives_a_wide_k_quant_row_over_warps_its_groups_not_a_spread():
  # attn_output in Q4_K (2048 x 5120, 20 super-blocks a row), alone in its kernel: the warps split its rows, so a 32-byte
  # group goes over 8 lanes and 4 super-blocks over the rest, 5 warps one step each, where spreading each super-block
  # over the lanes left every warp 10 steps (H100: 11.3 -> 5.5 us). Q4_0's 16-byte blocks keep 2 lanes a block
  def opts_of(qtype):
    w = quantized(rng, (2048, 5120), qtype, Device.DEFAULT)
    return applied(lambda: Tensor.empty(1, 5120, dtype=dtypes.float16) @ w.T, cuda_renderer())
  q4k = opts_of("Q4_K")
  assert [o.arg for o in q4k if o.op is OptOpsExt.REDUCE_LOCAL] == [8, 4] and Opt(OptOps.GROUP, 0, 5) in q4k, q4k
  assert [o.arg for o in opts_of("Q4_0") if o.op is OptOpsExt.REDUCE_LOCAL] == [2, 16]
  with Context(TINYGRAD_EXT_MATVEC_POLICY="reduce_warps=1,spread_word_bytes=4"):  # no warps: the spread again (a row of few groups' lanes)
    assert len([o for o in opts_of("Q4_K") if o.op is OptOpsExt.REDUCE_LOCAL]) == 3

def test_matvec_spreads_a_k_quant_block_a_wider_word_a_lane_only_where_the_lanes_stay_full():
  # spread_word_bytes=8: a Q4_K super-block's 128 bytes of nibbles over 16 lanes, 8 bytes each, the other 16 lanes on the
  # next super-block, so each lane walks half the steps (MoE down, 1536 inputs: 6 super-blocks, 6 steps -> 3). A row of 3
  # super-blocks (attn_q_b's 768) would leave half the lanes idle, so it keeps a 32-bit word a lane
  def opts(inp, policy):
    w = gguf_empty("Q4_K", 2048, inp)
    with Context(TINYGRAD_EXT_MATVEC_POLICY=policy): return applied(lambda: Tensor.empty(1, inp, dtype=dtypes.float16) @ w.T, cuda_renderer())
  def lanes(o): return [x.arg for x in o if x.op is OptOpsExt.REDUCE_LOCAL]
  assert prod(lanes(opts(1536, "spread_word_bytes=4"))) == 32 and 8 in lanes(opts(1536, "spread_word_bytes=4"))
  wide = lanes(opts(1536, "spread_word_bytes=8"))
  assert prod(wide) == 32 and 4 in wide and 2 in wide and 8 not in wide, wide  # 4 lanes on a group's bytes, 2 super-blocks
  assert opts(768, "spread_word_bytes=8") == opts(768, "spread_word_bytes=4")

@pytest.mark.parametrize("device", DEVICES)
def test_matvecs_per_head_with_merged_axes_equal_passes_off(device):
  # the merged heads-and-rows matvec (below) over random types, head counts and shapes, each policy's opts on it
  @settings(max_examples=EXAMPLES.get(device, 20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.sampled_from(["Q4_0", "Q8_0", "Q5_0", "Q4_K", "Q6_K"]), st.sampled_from([2, 3, 4]), st.sampled_from([8, 16, 64]),
         st.sampled_from([1, 2, 3]), st.integers(0, 2**16), st.sampled_from(["", "lanes=32,reduce_warps=8", "spread_in_block=0"]))
  def prop(qtype, heads, rows, blocks, seed, policy):
    inp = blocks * (256 if qtype.endswith("_K") else 32)
    r = np.random.default_rng(seed)
    with Context(DEV=device):
      w = quantized(r, (heads, rows, inp), qtype, device)
      probs = Tensor(r.uniform(0, 1, (1, heads, 1, 5)).astype(np.float32), device=device).realize()
      keys = Tensor(r.standard_normal((1, 1, 5, inp)).astype(np.float16), device=device).realize()
      make = lambda: ((probs @ keys.float()).contiguous().cast(dtypes.half).cast(dtypes.float) @ w.float().transpose(-1, -2)) \
        .transpose(1, 2).reshape(1, 1, heads * rows).contiguous()
      with tinygrad_ext.passes_off(): ref = make().numpy()
      with Context(TINYGRAD_EXT_MATVEC_POLICY=policy): assert_close_fp16(make().numpy(), ref)
  prop()

@pytest.mark.parametrize("device", DEVICES)
def test_matvec_takes_a_matvec_per_head_whose_heads_and_rows_merged(device):
  # MLA's attn_v_b under the mixed policy: a float32 latent (1, heads, 1, in) times a (heads, out, in) weight, one matvec
  # a head. tinygrad merges heads and rows into one output axis, which the activation reads as out // rows: still a
  # matvec (one activation for each run of rows), where the heuristic declined and one thread walked each row alone
  r = np.random.default_rng(7)
  with Context(DEV=device):
    w = quantized(r, (4, 64, 256), "Q4_0", device)
    probs = Tensor(r.uniform(0, 1, (1, 4, 1, 8)).astype(np.float32), device=device).realize()
    keys = Tensor(r.standard_normal((1, 1, 8, 256)).astype(np.float16), device=device).realize()
    # the latent as the model makes it, the attention's weighted sum of the cached keys: a float32 kernel of its own
    # then each head's matvec, its outputs concatenated over the heads (the model's (B, T, heads * v_head))
    make = lambda: ((probs @ keys.float()).contiguous().cast(dtypes.half).cast(dtypes.float) @ w.float().transpose(-1, -2)) \
      .transpose(1, 2).reshape(1, 1, 4 * 64).contiguous()
    if Device[device].renderer.has_local:
      assert any(o.op is OptOpsExt.REDUCE_LOCAL for o in applied(make, Device[device].renderer))
    with tinygrad_ext.passes_off(): ref = make().numpy()
    assert_close_fp16(make().numpy(), ref)
  from kernels import scheduler_of
  k = scheduler_of(kernel_asts(make)[-1], cuda_renderer())
  assert k.full_shape[0] == 4 * 64  # heads and rows merged (what the test is about)
  assert any(o.op is OptOpsExt.REDUCE_LOCAL for o in applied(make, cuda_renderer()))

# *** a staged weight: the dequant alone, written out (a prefill chunk's weights for the tensor cores) ***

def staged(rng, qtype:str, rows:int, inp:int, device:str) -> Tensor:
  return quantized(rng, (rows, inp), qtype, device).contiguous()  # quantized() reads the weight through a cast to fp16

@pytest.mark.parametrize("device", DEVICES)
def test_a_staged_dequant_equals_passes_off(device):
  @settings(max_examples=EXAMPLES.get(device, 20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.sampled_from(["Q4_0", "Q8_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"]), st.sampled_from([1, 3, 8, 24]), st.sampled_from([1, 2, 5]),
         st.integers(0, 2**16))
  def prop(qtype, rows, blocks, seed):
    inp = blocks * (256 if qtype.endswith("_K") else 32)
    with Context(DEV=device):
      make = lambda: staged(np.random.default_rng(seed), qtype, rows, inp, device)
      with tinygrad_ext.passes_off(): ref = make().numpy()
      np.testing.assert_array_equal(make().numpy(), ref)  # a dequant is exact: the same bits
  prop()

def store_addresses(src:str) -> dict[tuple[int, int, int], list[int]]:
  """Block 0's threads (x, y, z) -> the element offsets of their vector stores, from CUDA source (its index arithmetic
  is C that Python evaluates alike: + * << >> &, no division)."""
  dims = {m[1]: (m[2], int(m[3])) for m in re.finditer(r"int (lidx\d) = threadIdx\.(\w); /\* (\d+) \*/", src)}
  alus = re.findall(r"int (alu\d+) = (.*);", src)
  stores = re.findall(r"\*\(\(half4\*\)\(\(data0_\d+\+(.*?)\)\)\) = ", src)
  size = {d: n for d, n in dims.values()}
  out = {}
  for t in np.ndindex(*(size.get(d, 1) for d in "zyx")):
    env = {"gidx0": 0, "gidx1": 0, "gidx2": 0, **{name: t["zyx".index(d)] for name, (d, _) in dims.items()}}
    for name, expr in alus: env[name] = eval(expr, {}, env)
    out[t[::-1]] = sorted(eval(e, {}, env) for e in stores)
  return out

@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_a_staged_dequant_stores_whole_sectors_from_adjacent_threads(qtype):
  # tinygrad's heuristic gives a thread 2 of a block's elements (2-byte stores, the block's scale reloaded by 16
  # threads); the stage heuristic gives it half4 vectors, adjacent threads the adjacent vectors, so that a warp's store
  # instruction writes whole 32-byte sectors (a whole block a thread stored half4s 64 bytes apart)
  rows, inp = 64, 2048
  # empty bytes on the default device: a render needs no data (built on the CPU device, it failed on the GPU machine)
  block_elems, block_bytes = gguf.GGML_QUANT_SIZES[QTYPES[qtype]]
  raw = Tensor.empty(rows * inp // block_elems * block_bytes, dtype=dtypes.uint8)
  w = ggml_data_to_tensor(raw, rows * inp, int(QTYPES[qtype])).reshape(rows, inp).cast(dtypes.float16)
  (ast,) = [a for a in kernel_asts(lambda: w.contiguous()) if "data0_" in render(a, cuda_renderer())]
  def launch(src:str, idx:str) -> int: return prod(int(n) for n in re.findall(rf"{idx}\.\w+; /\* (\d+) \*/", src))
  src = render(ast, cuda_renderer())
  addresses = store_addresses(src)
  threads = sorted(addresses, key=lambda t: (t[2], t[1], t[0]))  # in warp order: x fastest
  assert launch(src, "blockIdx") * launch(src, "threadIdx") * 4 * len(addresses[threads[0]]) == rows * inp
  # 128 threads a block, K-quants too: a K-quant's thread takes 4 of its sub-blocks (32 threads of 4 elements: 273 GB/s)
  assert launch(src, "threadIdx") == 128 and len(addresses[threads[0]]) * 4 >= (16 if qtype.endswith("_K") else 4)
  for i in range(len(addresses[threads[0]])):  # the i-th store of every thread: vectors side by side in runs of 16+ halves
    starts = [addresses[t][i] for t in threads]
    runs = [starts[j+1] - starts[j] == 4 for j in range(len(starts) - 1)]
    assert sum(runs) >= len(runs) * 3 // 4 and all(s % 16 == 0 for s, r in zip(starts, [False] + runs) if not r), starts
  with tinygrad_ext.without("matvec"): stock = render(ast, cuda_renderer())
  assert launch(stock, "blockIdx") * launch(stock, "threadIdx") > rows * inp // 32
