"""REDUCE_LOCAL: forced at random legal amounts it computes what the unoptimized kernel computes; illegal requests are
refused with KernelOptError; CUDA and Metal source carry the warp epilogue."""
import os, re
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tinygrad import Tensor, dtypes, Device
from tinygrad.helpers import Context
from tinygrad.codegen.opt import Opt, OptOps, KernelOptError
import tinygrad_ext
from tinygrad_ext.passes.reduce_local import OptOpsExt
from helpers import need_tool
from kernels import kernel_asts, with_opts, render, realize_with_opts, cuda_renderer, metal_renderer, clang_renderer, scheduler_of, \
  q4_0_matvec_ast, shuffle_offsets

def REDUCE_LOCAL(axis, amount): return Opt(OptOpsExt.REDUCE_LOCAL, axis, amount)

def reference(make):
  with Context(NOOPT=1): return make().numpy()

# where the kernels run: CL (PoCL) and the PYTHON emulator here; TINYGRAD_EXT_TEST_DEVICES=CUDA on the GPU machine
DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,PYTHON").split(",")
EXAMPLES = {"PYTHON": 6}  # the emulator is slow
# PoCL has no cl_khr_fp16, and tinygrad 0.14's emulated-half MAX accumulator fails to compile in a loop even with stock
# opts (GROUP, or NOOPT): there half max is left to the devices with native half
NATIVE_HALF = {"CUDA", "METAL", "AMD", "NV"}

@st.composite
def reduce_kernels(draw, device:str):
  """(make, make_reference, reduce size, dtype): a sum, max or matvec whose first reduce axis has the given size."""
  dtype = draw(st.sampled_from([dtypes.float32, dtypes.float16]))
  kinds = ["sum", "max", "matvec", "sum2axes", "argmax"]
  kind = draw(st.sampled_from(kinds if dtype == dtypes.float32 or device in NATIVE_HALF else [k for k in kinds if k not in ("max", "argmax")]))
  rows = draw(st.integers(1, 6))
  red = draw(st.sampled_from([2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 37, 100, 605]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  if kind == "matvec":
    w, x = rng.standard_normal((rows, red)), rng.standard_normal(red)
    W, X = Tensor(w, dtype=dtype).realize(), Tensor(x, dtype=dtype).realize()
    return (lambda: (W @ X).float()), (lambda: (W @ X).float()), red, dtype
  if kind == "sum2axes":
    a = Tensor(rng.standard_normal((red, rows, 3)), dtype=dtype).realize()
    return (lambda: a.sum(axis=(0, 2)).float()), (lambda: a.sum(axis=(0, 2)).float()), red, dtype
  a = Tensor(rng.standard_normal((rows, red)), dtype=dtype).realize()
  # argmax: a float MAX, then an int32 MAX over the positions of the maximum
  return (lambda: getattr(a, kind)(axis=1).float()), (lambda: getattr(a, kind)(axis=1).float()), red, dtype

# amounts that do not divide the axis pad it (the padding is the reduce's identity); more lanes than elements is refused
def amounts_for(draw, red): return draw(st.sampled_from([a for a in (2, 4, 8, 16, 32, 64, 128, 256) if a <= red]))

def check_against_noopt(data, device):
  make, make_reference, red, dtype = data.draw(reduce_kernels(device))
  amount = amounts_for(data.draw, red)
  # a second REDUCE_LOCAL on the rest of the axis composes its lanes with the first (slower lane bits)
  more = [a for a in (2, 4, 8, 16) if red % amount == 0 and (red // amount) % a == 0 and amount * a <= 32]
  compose = data.draw(st.sampled_from([(), *[(REDUCE_LOCAL(0, a),) for a in more]]))
  # a GROUP on what the lanes leave of the axis (BEAM may pick it; the matvec policy's reduce_warps does): warps of lanes
  left = -(-red // amount) // (compose[0].arg if compose else 1)
  group = data.draw(st.sampled_from([(), *[(Opt(OptOps.GROUP, 0, g),) for g in (2, 3, 5) if left % g == 0]]))
  upcast = data.draw(st.sampled_from([(), (Opt(OptOps.UPCAST, 0, 2),)]))
  ref = reference(make_reference)
  try: got = realize_with_opts(make, REDUCE_LOCAL(0, amount), *compose, *group, *upcast)
  except KernelOptError as e:
    # the only legal refusals here: the upcast does not divide the output axis, or there is none (one row: axis 0 is
    # then the lanes'), or the GROUP does not divide what the lanes left (sum2axes' reduce may reach codegen merged, its
    # length then not red)
    assert (upcast and ("divide" in str(e) or "upcast is for GLOBAL/LOCAL/LOOP" in str(e))) or (group and "can't divide" in str(e)), e
    return
  # a reordered float sum differs by rounding, which scales with the magnitudes summed, not with a cancelled result
  tol = 2e-3 if dtype == dtypes.float16 else 1e-5
  np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))

@pytest.mark.parametrize("device", DEVICES)
def test_reduce_local_equals_noopt(device):
  @settings(max_examples=EXAMPLES.get(device, 40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.data())
  def prop(data):
    with Context(DEV=device): check_against_noopt(data, device)
  prop()

@st.composite
def walk_kernels(draw, device:str):
  """(make, tolerance): float32 kernels with one reduce or several (fusion's softmax and RMSNorm rows), one or two axes,
  and a Q4_0 matvec with an fp16 activation (hoist and packed_loads rewrite it after the opts)."""
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  rows, n = draw(st.integers(1, 6)), draw(st.sampled_from([24, 48, 96, 100, 192]))
  a = Tensor(rng.standard_normal((rows, n)).astype(np.float32)).realize()
  b = Tensor(rng.standard_normal((rows, n, 3)).astype(np.float32)).realize()
  x = Tensor(rng.standard_normal(n).astype(np.float32)).realize()
  kind = draw(st.sampled_from(["softmax", "rmsnorm", "sum2axes", "matvec", "max", "q4_0"]))
  if kind == "q4_0":
    from test_matvec import quantized
    w, xh = quantized(rng, (rows * 4, 32 * (n // 24)), "Q4_0", device), Tensor(rng.uniform(-1, 1, (1, 32 * (n // 24))).astype(np.float16)).realize()
    return (lambda: (xh @ w.T).float()), 2e-3
  return {"softmax": lambda: a.softmax(1), "rmsnorm": lambda: a * (a.square().mean(1, keepdim=True) + 1e-5).rsqrt(),
          "sum2axes": lambda: b.sum(axis=(1, 2)), "matvec": lambda: a @ x, "max": lambda: a.max(1)}[kind], 1e-5

@pytest.mark.parametrize("device", DEVICES)
def test_beam_walks_from_reduce_local_equal_noopt(device):
  # what BEAM may reach: from a REDUCE_LOCAL, a few more of BEAM's legal actions (tinygrad's and ours), drawn at random.
  # Found this way and refused since: a second REDUCE_LOCAL over another reduce (softmax's sum beside its max) or one
  # that pads, and tinygrad's UNROLL of the lanes
  from tinygrad.codegen.opt.search import get_kernel_actions
  from tinygrad.uop.ops import Ops
  @settings(max_examples=EXAMPLES.get(device, 30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.data())
  def prop(data):
    with Context(DEV=device):
      make, tol = data.draw(walk_kernels(device))
      asts = [a for a in kernel_asts(make) if any(u.op is Ops.REDUCE for u in a.toposort())]
      k = scheduler_of(asts[-1], Device[device].renderer)
      starts = [s for s in get_kernel_actions(k, include_0=False).values() if any(o.op is OptOpsExt.REDUCE_LOCAL for o in s.applied_opts)]
      if not starts: return  # no REDUCE_LOCAL is legal on this kernel: nothing to walk from
      k = data.draw(st.sampled_from(starts))
      for _ in range(data.draw(st.integers(1, 4))):
        if not (nxt:=list(get_kernel_actions(k, include_0=False).values())): break
        k = data.draw(st.sampled_from(nxt))
      got, ref = realize_with_opts(make, *k.applied_opts), reference(make)
      np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())), err_msg=str(k.applied_opts))
  prop()

def matvec_ast(rows=8, red=64, dtype=dtypes.float32):
  W, x = Tensor.rand(rows, red).cast(dtype).realize(), Tensor.rand(red).cast(dtype).realize()
  return kernel_asts(lambda: W @ x)[0]

@pytest.mark.parametrize("opt, reason", [
  (REDUCE_LOCAL(0, 48), "power of two"),
  (REDUCE_LOCAL(0, 128), "more lanes than the axis has elements"),
  (REDUCE_LOCAL(1, 16), "no reduce axis"),
  (REDUCE_LOCAL(0, 1), "power of two"),
])
def test_reduce_local_refuses_illegal_amounts(opt, reason):
  with pytest.raises(KernelOptError, match=reason): render(with_opts(matvec_ast(), opt), Device["CL"].renderer)

def test_reduce_local_refuses_what_it_cannot_combine():
  ren = Device["CL"].renderer
  a, i = Tensor.rand(4, 64).realize(), Tensor.randint(4, 64, high=10).cast(dtypes.int64).realize()
  with pytest.raises(KernelOptError, match="ADD and MAX"): render(with_opts(kernel_asts(lambda: a.prod(axis=1))[0], REDUCE_LOCAL(0, 16)), ren)
  with pytest.raises(KernelOptError, match="accumulator"): render(with_opts(kernel_asts(lambda: i.sum(axis=1))[0], REDUCE_LOCAL(0, 16)), ren)
  with pytest.raises(KernelOptError, match="threads"):
    render(with_opts(matvec_ast(4, 4096), Opt(OptOps.LOCAL, 0, 4), REDUCE_LOCAL(0, 512)), ren)
  with pytest.raises(KernelOptError, match="composes lanes within one warp"):
    render(with_opts(matvec_ast(4, 4096), REDUCE_LOCAL(0, 16), REDUCE_LOCAL(0, 16)), ren)
  with pytest.raises(KernelOptError, match="composes lanes within one warp"):
    render(with_opts(matvec_ast(4, 4096), REDUCE_LOCAL(0, 64), REDUCE_LOCAL(0, 2)), ren)
  with pytest.raises(KernelOptError, match="local"): render(with_opts(matvec_ast(), REDUCE_LOCAL(0, 16)), clang_renderer())
  with tinygrad_ext.passes_off(), pytest.raises(KernelOptError, match="reduce_local pass, which is off"):
    render(with_opts(matvec_ast(), REDUCE_LOCAL(0, 16)), ren)

@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
def test_reduce_local_cuda_source_has_the_shuffle_butterfly_and_compiles(dtype):
  src = render(with_opts(matvec_ast(8, 256, dtype), REDUCE_LOCAL(0, 32), Opt(OptOps.UPCAST, 0, 2)), cuda_renderer())
  assert sorted(set(shuffle_offsets(src)), reverse=True) == [16, 8, 4, 2, 1] and len(shuffle_offsets(src)) == 10, src
  assert "__shared__" not in src and "__syncthreads" not in src, "32 lanes combine in registers"
  # the collective runs in every lane: only the store is gated
  assert src.index("__shfl_xor_sync") < src.index("if (") and "__shfl" not in src[src.index("if ("):]
  need_tool("nvcc", "the CUDA toolkit's compiler, to compile the rendered CUDA")
  assert len(cuda_renderer().compiler.compile(src)) > 0

def test_composed_lanes_read_adjacent_bytes_of_a_block_and_share_one_butterfly():
  # a Q4_0 block over 2 lanes (8 contiguous bytes each), 16 blocks per warp: one 32-lane butterfly combines them all
  opts = (Opt(OptOps.UNROLL, 1, 2), Opt(OptOps.UNROLL, 1, 8), REDUCE_LOCAL(1, 2), REDUCE_LOCAL(0, 16))
  src = render(with_opts(q4_0_matvec_ast(), *opts), cuda_renderer())
  assert sorted(set(shuffle_offsets(src)), reverse=True) == [16, 8, 4, 2, 1] and "__shared__" not in src, src
  assert "(lidx0>>1)" in src and "((lidx0&1)<<3)" in src, src  # lane = block-in-warp * 2 + half of the block
  assert src.count("*((unsigned short*)") == 5, src  # 8 nibble bytes in 4 words, and the block's scale

def test_a_group_after_reduce_local_combines_each_warps_lanes_first_and_compiles():
  # a Q4_0 row's 96 blocks: 32 lanes, each lane's 3 steps over 3 warps (GROUP), 4 rows a block: the butterfly runs in
  # every warp, then one value per warp and row goes through shared memory (that order once was the other way round)
  opts = (Opt(OptOps.UNROLL, 2, 16), Opt(OptOps.UNROLL, 1, 2), REDUCE_LOCAL(0, 32), Opt(OptOps.GROUP, 0, 3), Opt(OptOps.LOCAL, 0, 4))
  src = render(with_opts(q4_0_matvec_ast(64, 3072), *opts), cuda_renderer())
  assert sorted(set(shuffle_offsets(src)), reverse=True) == [16, 8, 4, 2, 1], src
  assert re.search(r"__shared__ __align__\(\d+\) float buf0\[12\];", src), src  # 3 warps x 4 rows, no slot per lane
  assert src.index("__shfl_xor_sync") < src.index("__syncthreads"), src
  need_tool("nvcc", "the CUDA toolkit's compiler, to compile the rendered CUDA")
  assert len(cuda_renderer().compiler.compile(src)) > 0

def test_reduce_local_cuda_wider_than_a_warp_combines_warps_through_shared_memory():
  src = render(with_opts(matvec_ast(8, 1024), REDUCE_LOCAL(0, 128)), cuda_renderer())
  assert sorted(set(shuffle_offsets(src)), reverse=True) == [16, 8, 4, 2, 1]
  assert src.count("__syncthreads();") == 1 and "__shared__" in src and "threadIdx.x; /* 32 */" in src

def test_reduce_local_metal_source_uses_simd_sum_or_shuffles():
  src = render(with_opts(matvec_ast(8, 256, dtypes.float16), REDUCE_LOCAL(0, 32)), metal_renderer())
  assert "simd_sum(" in src and "threadgroup_barrier" not in src
  src = render(with_opts(matvec_ast(8, 256), REDUCE_LOCAL(0, 8)), metal_renderer())
  assert src.count("simd_shuffle_xor(") == 3 and "simd_sum" not in src
  a = Tensor.rand(4, 64).realize()
  assert "simd_max(" in render(with_opts(kernel_asts(lambda: a.max(axis=1))[0], REDUCE_LOCAL(0, 32)), metal_renderer())

def test_reduce_local_lanes_are_innermost_for_coalescing():
  # lane l of a row reads element l + amount*k: threadIdx.x is added unscaled to the weight index
  src = render(with_opts(matvec_ast(8, 256), REDUCE_LOCAL(0, 32)), cuda_renderer())
  assert re.search(r"\(lidx0\+\(Ridx0<<5\)\)", src), src

def test_beam_can_choose_reduce_local():
  from tinygrad.codegen.opt.search import actions, get_kernel_actions
  from tinygrad.codegen.opt.postrange import Scheduler
  assert any(a.op is OptOpsExt.REDUCE_LOCAL for a in actions)
  k = Scheduler(matvec_ast(8, 256), Device["CL"].renderer)
  k.convert_loop_to_global()
  assert any(o.op is OptOpsExt.REDUCE_LOCAL for s in get_kernel_actions(k).values() for o in s.applied_opts)
  with tinygrad_ext.passes_off():
    assert not any(o.op is OptOpsExt.REDUCE_LOCAL for s in get_kernel_actions(k).values() for o in s.applied_opts)

def test_reduce_local_without_register_shuffles_is_a_shared_memory_tree():
  # OpenCL here (PoCL) has no subgroups: log2(lanes) steps, each a store, a barrier and a load of lane^offset
  src = render(with_opts(matvec_ast(8, 256), REDUCE_LOCAL(0, 16), Opt(OptOps.UPCAST, 0, 2)), Device["CL"].renderer)
  assert src.count("barrier(CLK_LOCAL_MEM_FENCE);") == 4, src
  # lane ^ offset, written as (lane + offset) & (2 * offset - 1) within its pair of runs
  assert sorted(int(o) for o in re.findall(r"\(lidx0\+(\d+)\)&", src)) == [1, 2, 4, 8], src
  assert "for (int Ridx" not in src.split("barrier(")[1], "no serial loop over the lanes' partials"

@pytest.mark.parametrize("shape, opts", [
  ((5, 192), (REDUCE_LOCAL(0, 16), Opt(OptOps.UPCAST, 0, 0), Opt(OptOps.GROUP, 0, 0))),
  ((5, 100), (REDUCE_LOCAL(0, 16), Opt(OptOps.UPCAST, 0, 0), Opt(OptOps.GROUP, 0, 0))),
  ((5, 48), (REDUCE_LOCAL(0, 16), Opt(OptOps.UPCAST, 0, 0))),
  ((3, 4096), (REDUCE_LOCAL(0, 32), Opt(OptOps.GROUP, 0, 4))),
])
def test_memory_tree_indexes_partners_in_range(shape, opts):
  # tinygrad bounds no XOR, so a partner index lane ^ offset got a modulo and a negative-index fixup; PoCL 3.1 (LLVM 15)
  # keeps that fixup's select per work-item across the next barrier as a packed <N x i1> and reads its bits as bytes:
  # wrong sums on CL, varying with shape, data and PoCL's cache (found by the BEAM-walk property on a clean-clone CI run)
  rng = np.random.default_rng(0)
  a, x = (Tensor(rng.standard_normal(s).astype(np.float32), device="CL").realize() for s in (shape, shape[1]))  # PoCL's bug, on CL whatever DEV is
  src = render(with_opts(kernel_asts(lambda: a @ x)[0], *opts), Device["CL"].renderer)
  assert "%" not in src and "long" not in src, src
  for make, ref in ((lambda: a @ x, a.numpy() @ x.numpy()), (lambda: a.sum(1), a.numpy().sum(1))):
    np.testing.assert_allclose(realize_with_opts(make, *opts), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

def test_reduce_local_memory_tree_that_does_not_fit_falls_back_to_tinygrads_group():
  # 256 threads x 8 rows per thread x 4 bytes x 5 steps = 40 KB of trees > PoCL's shared memory: one GROUP buffer instead
  ren = Device["CL"].renderer
  ast = with_opts(matvec_ast(64, 1024), REDUCE_LOCAL(0, 32), Opt(OptOps.UPCAST, 0, 8), Opt(OptOps.LOCAL, 0, 8))
  src = render(ast, ren)
  assert 32 * 8 * 8 * 4 * 5 > ren.shared_max and src.count("barrier(CLK_LOCAL_MEM_FENCE);") == 1 and "^" not in src, src
  W, x = Tensor.rand(64, 1024, device="CL").realize(), Tensor.rand(1024, device="CL").realize()
  np.testing.assert_allclose(realize_with_opts(lambda: W @ x, REDUCE_LOCAL(0, 32), Opt(OptOps.UPCAST, 0, 8), Opt(OptOps.LOCAL, 0, 8)),
                             W.numpy() @ x.numpy(), rtol=1e-4)

def test_cuda_shuffle_mask_names_only_the_threads_of_a_small_workgroup():
  # a warp shuffle's mask must name only threads that exist: 0xffffffff over a 2-thread workgroup (the row heuristic's
  # lanes for a batch of 2x2 QRs) gave a wrong Q on an H100
  src = render(with_opts(matvec_ast(8, 256), REDUCE_LOCAL(0, 8)), cuda_renderer())
  assert re.findall(r"__shfl_xor_sync\((\w+), ", src) == ["0xffu"] * 3, src
  src = render(with_opts(matvec_ast(8, 256), REDUCE_LOCAL(0, 32)), cuda_renderer())
  assert set(re.findall(r"__shfl_xor_sync\((\w+), ", src)) == {"0xffffffffu"}, src
