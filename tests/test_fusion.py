"""fusion: RMSNorm and softmax schedule to one kernel each, and equal the passes off; a normalized row that a matmul reads
is that one kernel's output, not recomputed for every output row of the matmul."""
import os, pathlib, re, sys
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tinygrad import Tensor, dtypes, UOp
from tinygrad.helpers import Context
from tinygrad.uop.ops import Ops
from tinygrad_ext import without, passes_off, only
from kernels import kernel_asts, render, cuda_renderer, metal_renderer
from helpers import assert_close_fp16
from tinygrad_ext.passes.fusion import SMALL_WORK, TINY_REDUCE, SHORT_ROW, SHORT_ROW_MATMUL
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo root: examples.glm
from examples.glm.model import topk_ids  # noqa: E402

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")
EXAMPLES = {"CPU": 15, "CL": 25}

def rms_norm(x:Tensor, w:Tensor|None) -> Tensor:
  xf = x.float()
  out = xf * (xf.square().mean(-1, keepdim=True) + 1e-5).rsqrt()
  return (out if w is None else out * w.float()).cast(x.dtype)

def softmax(x:Tensor, mask:Tensor|None=None) -> Tensor:
  if mask is not None: x = x + mask
  return x.float().softmax(-1).cast(x.dtype)

def causal_mask(rows:int, cols:int) -> Tensor:
  """Attention's mask over the positions so far: row i sees the cols-rows+1+i first columns (at least the first one).
  Realized here, as a model holds it: building it is a kernel of its own with or without fusion."""
  return Tensor.full((rows, cols), float("-inf")).triu(max(1, cols - rows + 1)).realize()

@st.composite
def row_ops(draw, device:str):
  """(build the result, n columns, is its row length symbolic) for a random RMSNorm or softmax over the last axis."""
  kind = draw(st.sampled_from(["rms_norm", "softmax"]))
  rows, cols = draw(st.integers(1, 5)), draw(st.sampled_from([1, 3, 32, 100, 256, 300, 1024, 2048, 4100]))
  dtype = draw(st.sampled_from([dtypes.float32, dtypes.float16]))
  variant, symbolic = draw(st.booleans()), kind == "softmax" and draw(st.booleans())
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  with Context(DEV=device):
    full = cols + 37 if symbolic else cols
    x = Tensor((rng.standard_normal((rows, full)) * 4).astype(np.float32), dtype=dtype).realize()
    w = Tensor(rng.standard_normal(cols).astype(np.float32), dtype=dtype).realize()
    mask = causal_mask(rows, cols) if variant and kind == "softmax" and not symbolic else None
  def make() -> Tensor:
    if kind == "rms_norm": return rms_norm(x, w if variant else None)
    if not symbolic: return softmax(x, mask)
    # a row of a length the kernel only knows at run time (attention over the positions so far)
    return softmax(x[:, :UOp.variable("n", 1, full).bind(cols)])
  return make, cols, symbolic

def values(t:Tensor, cols:int, symbolic:bool) -> np.ndarray:
  if symbolic: t = t.pad(((0, 0), (0, t.shape[-1].vmax + 1 - t.shape[-1])))
  return t.float().numpy()[:, :cols]

@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_and_softmax_are_one_kernel_and_equal_passes_off(device):
  @settings(max_examples=EXAMPLES.get(device, 25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.data())
  def prop(data):
    make, cols, symbolic = data.draw(row_ops(device))
    with Context(DEV=device):
      with without("fusion"):
        off_kernels = len(kernel_asts(make))
        ref = values(make(), cols, symbolic)
      on_kernels = len(kernel_asts(make))
      # a row of one needs no reduce: tinygrad folds it (a softmax of one element is a constant store)
      assert (on_kernels == 1 and off_kernels > 1) if cols > 1 else on_kernels <= off_kernels
      got = values(make(), cols, symbolic)
    assert_close_fp16(got, ref)
  prop()

@pytest.mark.parametrize("device", DEVICES)
def test_fused_row_kernel_without_reduce_local(device):
  # the row's lanes combine through tinygrad's own GROUP reduce when REDUCE_LOCAL's epilogue is off
  with Context(DEV=device):
    x = Tensor(np.random.default_rng(1).standard_normal((3, 700)).astype(np.float32)).realize()
    with passes_off(): ref = x.softmax(-1).numpy()
    with only("fusion"):
      assert len(kernel_asts(lambda: x.softmax(-1))) == 1
      np.testing.assert_allclose(x.softmax(-1).numpy(), ref, rtol=1e-5, atol=1e-7)

def reads(ast) -> int: return sum(u.op is Ops.PARAM for u in ast.toposort()) - 1  # its buffers but the output

@pytest.mark.parametrize("device", DEVICES)
def test_normalized_row_feeding_a_matmul_is_realized_once(device):
  # the normalized row is one kernel (its sum of squares inside) and the matmul reads it as a plain vector; with fusion
  # off the matmul recomputes it for every output row from x, w and the sum of squares, its own kernel. A row of at most
  # SHORT_ROW elements is recomputed in the matmul with its sum of squares too: one kernel
  @settings(max_examples=EXAMPLES.get(device, 25) // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.sampled_from([32, 300, 512, 1280, 2048]), st.integers(1, 96), st.sampled_from([dtypes.float32, dtypes.float16]), st.integers(0, 2**16))
  def prop(cols, outs, dtype, seed):
    rng = np.random.default_rng(seed)
    with Context(DEV=device):
      x = Tensor(rng.standard_normal((1, cols)).astype(np.float32), dtype=dtype).realize()
      w = Tensor(rng.standard_normal(cols).astype(np.float32), dtype=dtype).realize()
      m = Tensor((rng.standard_normal((cols, outs)) / np.sqrt(cols)).astype(np.float32), dtype=dtype).realize()
      make = lambda: rms_norm(x, w) @ m
      with without("fusion"):
        off = kernel_asts(make)
        ref = make().float().numpy()
      on = kernel_asts(make)
      # one output row recomputes nothing: then the schedule stays as it was, but for a sum of squares short enough to
      # recompute inside the matvec (fusion's small intermediates): one kernel
      assert len(off) == 2 and [reads(a) for a in off] == [1, 4]
      if outs > 1: assert [reads(a) for a in on] == ([3] if cols <= SHORT_ROW else [2, 2])  # a short row: recomputed in the matvec
      # one output row: the sum of squares stays a kernel, but for one short enough to recompute (fusion's small buffers)
      else: assert [reads(a) for a in on] == ([3] if cols <= TINY_REDUCE and cols * cols <= SMALL_WORK else [1, 4])
      assert_close_fp16(make().float().numpy(), ref)
  prop()

def float32_row_and_norm(seed:int, cols:int=2048) -> tuple[Tensor, Tensor]:
  rng = np.random.default_rng(seed)
  return Tensor(rng.standard_normal((1, cols)).astype(np.float32)).realize(), Tensor(rng.standard_normal(cols).astype(np.float32)).realize()

def random_matrix(seed:int, shape, dtype=np.float32) -> Tensor:
  return Tensor((np.random.default_rng(seed).standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)).realize()

@pytest.mark.parametrize("device", DEVICES)
def test_a_row_read_wide_and_rounded_is_realized_once(device):
  # GLM's MoE input under the mixed numerics policy: the float32 router reads the float32 norm, the experts read it
  # rounded to fp16. One row kernel writes the float32 row and the experts' matvec rounds what it reads (the same bits);
  # a row realized in each dtype was a sum-of-squares kernel and two elementwise ones (2 kernels a MoE block more)
  with Context(DEV=device):
    x, w = float32_row_and_norm(0)
    router, experts = random_matrix(1, (64, 2048)), random_matrix(2, (512, 2048), np.float16)
    def make():
      n = rms_norm(x, w)
      return (n @ router.T).contiguous(), (n.cast(dtypes.half).cast(dtypes.float) @ experts.float().T).contiguous()
    on = [c.src[0] for c in Tensor.linear_with_vars(*make())[0].src if c.src[0].op is Ops.SINK]
    assert len(on) == 3, len(on)  # the row, the router, the experts
    with without("fusion"): ref = [t.numpy() for t in make()]
    for got, want in zip(make(), ref): assert_close_fp16(got.numpy(), want)  # the sum of squares summed in another order

@pytest.mark.parametrize("device", DEVICES)
def test_a_row_rounded_to_half_and_widened_back_is_realized_wide(device):
  # tinygrad's codegen folds float.cast(half).cast(float) into the float (coalesce.py's pm_simplify_add_image): a matvec
  # reading a float32 norm that way never rounds it. Realizing the rounded half row stored rounded values, a function
  # other than the program's (the mixed policy's logits 2x further from float64 with fusion than without)
  with Context(DEV=device):
    x, w = float32_row_and_norm(3)
    m = random_matrix(4, (1024, 2048)).T
    make = lambda: rms_norm(x, w).cast(dtypes.half).cast(dtypes.float) @ m
    with without("fusion"): ref = make().numpy()
    assert len(kernel_asts(make)) == 2  # the row realized once, as for any long row
    np.testing.assert_allclose(make().numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))

@pytest.mark.parametrize("device", DEVICES)
def test_a_concatenation_of_rounded_rows_widened_back_is_realized_wide(device):
  # the same through a concatenation (GLM's absorbed q once: the q_nope product and the roped q_pe, each rounded to fp16,
  # side by side): stock codegen folds each part's rounding, so the program is the float32 row's; realizing the half row
  # rounded it (passes on 1.2x further from float64 than off on the deep preset)
  with Context(DEV=device):
    x, w = float32_row_and_norm(5)
    m = random_matrix(6, (1024, 2048)).T
    def make():
      parts = rms_norm(x[:, :1536], w[:1536]).cast(dtypes.half), (x[:, 1536:] * 3).cast(dtypes.half)
      return parts[0].cat(parts[1], dim=-1).cast(dtypes.float) @ m
    with without("fusion"): ref = make().numpy()
    assert len(kernel_asts(make)) == 2
    np.testing.assert_allclose(make().numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))

def test_short_row_is_recomputed_only_in_small_matmuls():
  # a 768-wide normalized row: inside a 768 x 5120 matvec (GLM's q_b) one kernel; read by a matmul over SHORT_ROW_MATMUL
  # elements it is realized once, as longer rows are (each lane would re-read x and the norm weight for every row)
  x, w = Tensor.empty(1, 768, dtype=dtypes.half), Tensor.empty(768, dtype=dtypes.half)
  for outs, kernels in ((5120, 1), (SHORT_ROW_MATMUL // 768 + 1, 2)):
    m = Tensor.empty(768, outs, dtype=dtypes.half)
    assert len(kernel_asts(lambda: rms_norm(x, w) @ m)) == kernels, outs

def fused_rms_ast(cols=2048):
  x, w = Tensor.empty(1, cols, dtype=dtypes.half), Tensor.empty(cols, dtype=dtypes.half)
  (ast,) = kernel_asts(lambda: rms_norm(x, w))
  return ast

def test_cuda_fused_rms_norm_is_one_block_of_shuffling_lanes():
  src = render(fused_rms_ast(), cuda_renderer())
  assert "__launch_bounds__(256)" in src and "blockIdx" not in src  # one row: one block, every lane in it
  assert src.count("__shfl_xor_sync") == 5 and src.count("__syncthreads") == 1  # a 32-lane butterfly, then 8 warps
  # the output loop comes after the reduce: each lane writes its 8 elements, nothing is recomputed per element
  assert src.index("__syncthreads") < src.index("*(data0_2048+")

def test_cuda_fused_rms_norm_loads_every_element_once_before_the_barrier():
  # a lane's 8 elements are unrolled: x is loaded once for the sum of squares and the output, and the weight loads,
  # which do not wait on the reduce, are issued before the lanes combine (one memory round trip, not three)
  src = render(fused_rms_ast(), cuda_renderer())
  barrier = src.index("__syncthreads")
  x_loads, w_loads = [[i for i in range(len(src)) if src.startswith(f"(*(data{b}_2048+", i)] for b in (1, 2)]
  assert len(x_loads) == len(w_loads) == 8 and max(x_loads + w_loads) < barrier
  assert "for (" not in src  # the 8 warps' partials are combined unrolled too

def test_cuda_fused_softmax_over_a_symbolic_row():
  big = Tensor.empty(20, 4096)
  (ast,) = kernel_asts(lambda: big[:, :UOp.variable("start_pos", 0, 4095).bind(37) + 1].softmax(-1))
  src = render(ast, cuda_renderer())
  assert src.count("__shfl_xor_sync") == 10 and src.count("__syncthreads") == 2  # max, then sum, each over 256 lanes
  assert "if (" in src and "INFINITY" in src  # padding: stores gated off, loads read as the max's identity

def test_cuda_a_row_longer_than_max_row_is_spread_over_blocks():
  # a vocab-long row (sampling's exp(x - max) over 154880 logits) would be one block looping 605 times (100 us on the
  # H100): the row heuristic leaves it to tinygrad's, whose blocks each take a slice and recompute the row's max
  x = Tensor.empty(154880)
  srcs = [render(a, cuda_renderer()) for a in kernel_asts(lambda: (x - x.max()).exp())]
  out = [s for s in srcs if "data0_154880" in s]
  assert len(out) == 1 and "blockIdx" in out[0] and not re.search(r"for \(int \w+ = 0; \w+ < 605;", out[0])

def test_metal_fused_rms_norm_uses_simd_sum():
  src = render(fused_rms_ast(), metal_renderer())
  assert "simd_sum(" in src and "threadgroup_barrier" in src

@pytest.mark.parametrize("device", DEVICES)
def test_normed_row_beside_a_roped_tail_is_one_kernel(device):
  # GLM's KV row: [rms_norm(kv[:512]) ; rope(kv[512:])], two row axes (the pairs): the longer goes over the lanes
  with Context(DEV=device):
    rng = np.random.default_rng(2)
    x = Tensor(rng.standard_normal((1, 576)).astype(np.float32)).realize()
    w = Tensor(rng.standard_normal(512).astype(np.float32)).realize()
    def make():
      r = x[:, 512:].reshape(1, 32, 2)
      return rms_norm(x[:, :512], w).cat(Tensor.stack(r[..., 0] - r[..., 1], r[..., 0] + r[..., 1], dim=-1).flatten(-2), dim=-1)
    with passes_off(): ref = make().numpy()
    assert len(kernel_asts(make)) == 1
    np.testing.assert_allclose(make().numpy(), ref, rtol=1e-5, atol=1e-6)

def q4_0_row_norm(device:str, rng:np.random.Generator, rows:int, cols:int):
  """(make, n) for GLM's first norm: rms_norm of a token's row of a Q4_0 embedding, dequantized inside the kernel, so
  codegen sees the row and its reduce split into blocks x elements of a block."""
  from tinygrad.llm.gguf import ggml_data_to_tensor
  blocks = rng.integers(0, 256, (rows * cols // 32, 18), dtype=np.uint8)
  blocks[:, :2] = np.frombuffer(np.full(len(blocks), 0.01, np.float16).tobytes(), np.uint8).reshape(-1, 2)  # the scale d
  with Context(DEV=device):
    raw = Tensor(blocks.reshape(-1)).realize()
    w = Tensor(rng.standard_normal(cols).astype(np.float32)).realize()
  emb = ggml_data_to_tensor(raw, rows * cols, 2).reshape(rows, cols)
  return lambda: rms_norm(emb[rows // 2:rows // 2 + 1].cast(dtypes.half), w)

@pytest.mark.parametrize("device", DEVICES)
def test_normed_row_read_through_quant_blocks_goes_over_lanes(device):
  make = q4_0_row_norm(device, np.random.default_rng(3), 8, 2048)
  with Context(DEV=device):
    with without("fusion"): ref = make().float().numpy()
    (ast,) = kernel_asts(make)
    assert_close_fp16(make().float().numpy(), ref)
  # split into blocks x elements, the row still goes over lanes (each thread summing the whole row took 124 us on the H200)
  src = render(ast, cuda_renderer())
  assert src.count("__shfl_xor_sync") == 5 and "__syncthreads" in src

@pytest.mark.parametrize("device", DEVICES)
def test_tiny_routing_weights_are_recomputed_where_they_are_read(device):
  # MoE routing: the selected experts' scores (a one-hot gather), normalized by their sum, weigh the experts' outputs.
  # Stock tinygrad makes the gather and the normalization a kernel each; four values are cheaper to recompute per thread.
  rng = np.random.default_rng(4)
  with Context(DEV=device):
    scores = Tensor(rng.random((1, 1, 64)).astype(np.float32)).realize()
    sel = Tensor(rng.choice(64, 4, replace=False).astype(np.int32).reshape(1, 1, 4)).realize()
    out = Tensor(rng.standard_normal((1, 1, 4, 256)).astype(np.float16)).realize()
    def make():
      w = scores.gather(-1, sel)
      return (out * ((w / w.sum(-1, keepdim=True)) * 1.8).cast(dtypes.half).unsqueeze(-1)).sum(-2)
    with without("fusion"):
      assert len(kernel_asts(make)) == 3
      ref = make().float().numpy()
    assert len(kernel_asts(make)) == 1
    got = make().float().numpy()
  s, o = scores.numpy()[0, 0, sel.numpy()[0, 0]].astype(np.float64), out.numpy()[0, 0].astype(np.float64)
  exact = ((s / s.sum() * 1.8)[:, None] * o).sum(0)
  assert_close_fp16(got[0, 0], exact)
  assert_close_fp16(ref[0, 0], exact)

@pytest.mark.parametrize("device", DEVICES)
def test_moe_output_is_recomputed_only_in_its_one_reading_kernel(device):
  # GLM's MoE output: the residual plus the experts' rows weighted by their normalized scores (reduces over the k slots
  # and the gathered scores, all short). Read by one kernel, each element once (the next RMSNorm row), it is recomputed
  # there and its kernel is gone. Read by two (that norm and the residual after the next matmul) it stays a kernel of its
  # own: each kernel would compile its own float sums, and the two copies could differ in their last bits.
  @settings(max_examples=EXAMPLES.get(device, 25) // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.sampled_from([1280, 2048]), st.integers(2, 5), st.integers(0, 2**16), st.booleans())
  def prop(dim, slots, seed, two_readers):
    rng = np.random.default_rng(seed)
    with Context(DEV=device):
      h = Tensor(rng.standard_normal((1, 1, dim)).astype(np.float16)).realize()
      rows = Tensor(rng.standard_normal((1, 1, slots, dim)).astype(np.float16)).realize()
      scores = Tensor(rng.random((1, 1, 16)).astype(np.float32)).realize()
      sel = Tensor(rng.choice(16, slots, replace=False).astype(np.int32).reshape(1, 1, slots)).realize()
      g = Tensor(rng.standard_normal(dim).astype(np.float32)).realize()
      w = Tensor((rng.standard_normal((48, dim)) / np.sqrt(dim)).astype(np.float16)).realize()
      def make():
        s = scores.gather(-1, sel)
        x = h + (rows * (s / s.sum(-1, keepdim=True) * 1.8).cast(dtypes.half).unsqueeze(-1)).sum(-2)
        return x[..., :48] + rms_norm(x, g) @ w.T if two_readers else rms_norm(x, g)
      with without("fusion"): ref = make().float().numpy()
      with Context(TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT=1): kept = len(kernel_asts(make))
      asts = kernel_asts(make)
      assert len(asts) == kept - (not two_readers), (len(asts), kept)
      # the norm that recomputes it is still one workgroup whose lanes share the row (each element's weighted rows
      # unrolled in its lane): refused as a reduce inside a reduce, each of dim workgroups summed the whole row (the
      # final norm, 102 us a token on the H100)
      if not two_readers: assert "blockIdx" not in render(asts[-1], cuda_renderer())
      assert_close_fp16(make().float().numpy(), ref)
  prop()

@pytest.mark.parametrize("device", DEVICES)
def test_an_argmax_over_a_uint_padded_with_minus_one_computes_as_stock(device):
  # the pad is the weak int -1 in a uint WHERE: tinygrad's range analysis folds it away from the argmax's comparisons
  # (x == max) but, once the max is recomputed in the same kernel, not from the max, so no element equals the max
  # (the argmax is 4, past the row). Such a max is not recomputed; on computes what off does (fuzzer, uint32 seed 20796)
  with Context(DEV=device):
    x = Tensor(np.random.default_rng(0).integers(0, 2**32, (6, 2), dtype=np.uint64).astype(np.uint32)).realize()
    make = lambda: x.pad(((0, 0), (2, 0)), value=-1).argmax(-1)
    with without("fusion"): ref = make().numpy()
    np.testing.assert_array_equal(make().numpy(), ref)

@pytest.mark.parametrize("device", DEVICES)
def test_weights_gathered_by_an_index_tensor_are_read_in_the_matmul_of_many_rows(device):
  # a prefill's MoE tile: 16 token rows times the Q4_0 weights of the tile's expert, w[tile_expert]. tinygrad realizes
  # the gather (a one-hot sum over the experts) when a matmul broadcasts it over rows: every dequantized weight written
  # and read back. Recomputed in the matmul it is one load at the expert's index
  from tinygrad.llm.gguf import ggml_data_to_tensor
  rng = np.random.default_rng(5)
  E, O, I, NT, M = 5, 64, 64, 3, 16
  blocks = rng.integers(0, 256, (E * O * I // 32, 18), dtype=np.uint8)
  blocks[:, :2] = np.frombuffer(np.full(len(blocks), 0.01, np.float16).tobytes(), np.uint8).reshape(-1, 2)
  with Context(DEV=device):
    raw = Tensor(blocks.reshape(-1)).realize()
    tile_expert = Tensor(np.array([4, 0, 2], np.int32)).realize()
    x = Tensor(rng.standard_normal((NT, M, I)).astype(np.float16)).realize()
    make = lambda: x.float() @ ggml_data_to_tensor(raw, E * O * I, 2).reshape(E, O, I)[tile_expert].transpose(-1, -2)
    with without("fusion"):
      ref = make().numpy()
      assert len(kernel_asts(make)) == 2
    (ast,) = kernel_asts(make)
    np.testing.assert_allclose(make().numpy(), ref, rtol=1e-5, atol=1e-5)
  assert re.search(r"\*\(data2_3\+", render(ast, cuda_renderer()))  # the expert id, loaded

def test_padding_never_reads_a_gathers_ids_past_their_buffer():
  # a row scaled by the sum of 3 gathered scores: spreading the 3 ids over padded lanes (2 lanes, the sum padded to 4)
  # would gate the ids' load only where it feeds the scores' gate, and tinygrad's simplification under that gate reads
  # ids[lane] ungated, past the 3 ids; the padding is refused and the kernel reads the ids at valid indices only
  scores, sel, x = Tensor.empty(1, 64), Tensor.empty(1, 3, dtype=dtypes.int32), Tensor.empty(1, 2048)
  (ast,) = kernel_asts(lambda: x * scores.gather(-1, sel).sum(-1, keepdim=True))
  src = render(ast, cuda_renderer())
  # each read of the ids: at a constant offset, or under a select
  reads = [(line.split("data2_3+")[0], re.search(r"data2_3\+([^)]*)\)", line).group(1)) for line in src.splitlines() if "data2_3+" in line]
  assert reads and all("?" in before or offset.strip().isdigit() for before, offset in reads), src

@pytest.mark.parametrize("device", DEVICES)
def test_small_topk_ranks_are_recomputed_in_the_selection(device):
  # MoE routing's top-k: each expert's rank (a count over the 64 experts) is read by the k one-hot sums over the experts.
  # Stock tinygrad makes the ranks a kernel of their own; recomputed inside the selection (4 x 64 x 64 comparisons),
  # the top-k is one kernel. Ties (quantized scores) go to the lower id, as with fusion off.
  @settings(max_examples=EXAMPLES.get(device, 25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.sampled_from([8, 16, 64]), st.integers(1, 8), st.integers(1, 64), st.integers(0, 2**16))
  def prop(n, k, levels, seed):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, levels, (1, 1, n)) / levels).astype(np.float32)  # few levels: many ties
    with Context(DEV=device):
      t = Tensor(x).realize()
      with without("fusion"):
        n_off = len(kernel_asts(lambda: topk_ids(t, k)))
        off = topk_ids(t, k).numpy()
      n_on = len(kernel_asts(lambda: topk_ids(t, k)))
      on = topk_ids(t, k).numpy()
    # one kernel while the recomputed ranks cost at most SMALL_WORK comparisons; stock tinygrad itself makes one of k = 1
    assert n_on == (1 if k * n * n <= SMALL_WORK else n_off) and n_off in (1, 2)
    expected = np.argsort(-x[0, 0], kind="stable")[:k]  # largest first, ties to the lower id
    assert off[0, 0].tolist() == on[0, 0].tolist() == expected.tolist()
  prop()

def test_cuda_topk_is_one_lane_per_expert():
  # each lane counts one expert's rank once (64 comparisons), holds all k outputs, and the lanes sum them by shuffles
  (ast,) = kernel_asts(lambda: topk_ids(Tensor.empty(1, 1, 64), 4))
  src = render(ast, cuda_renderer())
  assert "__launch_bounds__(64)" in src and "blockIdx" not in src
  # one rank loop over the 64 experts (the other loop adds the two warps' partials); a butterfly per output
  assert src.count("< 64;") == 1 and src.count("__shfl_xor_sync") == 4 * 5
