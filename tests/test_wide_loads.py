"""wide_loads: a REDUCE_LOCAL matvec reads its fp16 activations as half8 on CUDA where the index proves 16-byte
alignment; every element is read as before, results are bit-identical, and half views off 16 bytes are copied."""
import os
from collections import Counter
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from tinygrad import Tensor, dtypes, Device
from tinygrad.helpers import Context
from tinygrad.uop.ops import Ops
from tinygrad.renderer.cstyle import CUDARenderer
import tinygrad_ext
from tinygrad_ext import Pass, CodegenStep
from tinygrad_ext.passes.wide_loads import wide_half_loads
from tinygrad_ext.passes.shared import root_and_offset
from kernels import kernel_asts, render, cuda_renderer, metal_renderer, clang_renderer
from tinygrad.llm.gguf import ggml_data_to_tensor
from tinygrad.codegen.opt import OptOps
from helpers import quantized, applied, need_tool

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")

def matvec(kind:str, out:int, inp:int, device:str|None=None, seed:int=0, x_offset:int=0, empty:bool=False):
  """A Q4_0 matvec (dense, or 2 of 8 experts) whose fp16 activation starts x_offset elements into its buffer (empty: on
  unfilled buffers, to render)."""
  rng = np.random.default_rng(seed)
  x = Tensor.empty(1, inp + x_offset, dtype=dtypes.half, device=device) if empty else \
      Tensor(rng.uniform(-1, 1, (1, inp + x_offset)).astype(np.float16), device=device).realize()
  x = x[:, x_offset:]
  experts = 1 if kind == "dense" else 8
  if empty: w = ggml_data_to_tensor(Tensor.empty(experts * out * inp // 32 * 18, dtype=dtypes.uint8, device=device), experts * out * inp, 2)
  else: w = quantized(rng, (experts, out, inp), "Q4_0", device)
  w = w.reshape(experts, out, inp).cast(dtypes.float16)
  if kind == "dense":
    w = w[0]
    return lambda: (x @ w.T).float()
  sel = Tensor(rng.permutation(8)[:2].astype(np.int32).reshape(1, 1, 2), device=device)
  if not empty: sel = sel.realize()
  return lambda: (x.reshape(1, 1, 1, inp).unsqueeze(-2) @ w[sel].transpose(-1, -2)).float()

def matvec_ast(make):
  return next(a for a in kernel_asts(make) if any(u.op is Ops.REDUCE for u in a.toposort()))

def vector_loads(src:str) -> Counter:
  """How many half8 and half4 loads the rendered CUDA has (a load reads through a cast pointer: `((half8*)`)."""
  return Counter({w: n for w in ("half8", "half4") if (n:=src.count(f"(({w}*)"))})

def sink_before_the_pass(ast, ren):
  """The kernel right after tinygrad's "add images" step, as the pass receives it (the pass itself off)."""
  seen = []
  capture = Pass("test_capture_add_images", "test only", (CodegenStep("add images", lambda s, r: seen.append(s) or s),))
  tinygrad_ext.register(capture)
  try:
    with tinygrad_ext.without("wide_loads"): render(ast, ren)
  finally: tinygrad_ext.unregister(capture.name)
  return seen[0]

def half_elements_used(sink) -> Counter:
  """Each use of a loaded fp16 element, as (buffer, index root, element offset from the root)."""
  used = Counter()
  for u in sink.toposort():
    if u.op is Ops.INDEX and len(u.src) == 2 and u.src[1].op is Ops.CONST and (ld:=u.src[0]).op is Ops.LOAD and ld.src[0].op is Ops.SHRINK:
      buf, start, _ = ld.src[0].src
      if buf.dtype == dtypes.half:
        root, off = root_and_offset(start)
        used[(buf, root, off + u.src[1].arg)] += 1
  return used

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["dense", "moe"]), st.sampled_from([8, 64, 256, 1024]), st.sampled_from([64, 256, 512, 2048]), st.sampled_from([0, 0, 4, 8]))
def test_every_fp16_element_is_read_as_before_and_half8_only_at_16_bytes(kind, out, inp, x_offset):
  ren = cuda_renderer()
  sink = sink_before_the_pass(matvec_ast(matvec(kind, out, inp, "CPU", x_offset=x_offset, empty=True)), ren)
  new = wide_half_loads(sink, ren)
  assert half_elements_used(new) == half_elements_used(sink)
  for u in new.toposort():
    if u.op is Ops.LOAD and u.src[0].op is Ops.SHRINK and u.src[0].src[2].arg == 8:
      assert u.src[0].src[1].divides(8) is not None, u.src[0].src[1].render()

# ffn up's shape with the CUDA policy's tall rule off: its rows stay on one warp, as MoE gate+up's do (with the rule,
# 2 warps split its rows and it keeps half4, as test_rows_split_over_warps_keep_half4_unless_asked says)
ONE_WARP_A_ROW = "tall_upcast_rows=0"

@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_a_lanes_activations_are_half8_on_cuda_and_compile(kind):
  with Context(TINYGRAD_EXT_MATVEC_POLICY=ONE_WARP_A_ROW):
    ast = matvec_ast(matvec(kind, 10240 if kind == "dense" else 3072, 2048, "CPU", empty=True))  # ffn up, MoE gate+up
    on = render(ast, cuda_renderer())
    with tinygrad_ext.without("wide_loads"): off = render(ast, cuda_renderer())
  assert vector_loads(off) == {"half4": 4} and vector_loads(on) == {"half8": 2}, (off, on)
  need_tool("nvcc", "the CUDA toolkit's compiler, to compile the rendered CUDA")
  assert len(cuda_renderer().compiler.compile(on)) > 0

def test_an_activation_4_elements_in_keeps_half4():
  # x starts 8 bytes into its buffer: a lane's 8 elements start at root+4, which no half8 may read
  with Context(TINYGRAD_EXT_MATVEC_POLICY=ONE_WARP_A_ROW):
    src = render(matvec_ast(matvec("dense", 10240, 2048, "CPU", x_offset=4, empty=True)), cuda_renderer())
    assert vector_loads(src)["half4"] >= 4 and "(half8*)" not in src, src
    src = render(matvec_ast(matvec("dense", 10240, 2048, "CPU", x_offset=8, empty=True)), cuda_renderer())
  assert vector_loads(src) == {"half8": 2}, src

def test_rows_split_over_warps_keep_half4():
  # attn_output: a GROUP splits each row's blocks over warps, where half8 measured slower
  make = matvec("dense", 2048, 5120, "CPU", empty=True)
  assert any(o.op is OptOps.GROUP for o in applied(make, cuda_renderer()))
  src = render(matvec_ast(make), cuda_renderer())
  assert "(half8*)" not in src and vector_loads(src)["half4"] > 0, src

def test_only_cuda_gets_half8():
  ast = matvec_ast(matvec("moe", 3072, 2048, "CPU", empty=True))
  for ren in (metal_renderer(), clang_renderer()): assert "half8" not in render(ast, ren) and "fp168" not in render(ast, ren)

@pytest.mark.parametrize("device", DEVICES)
def test_wide_loads_are_bit_identical(device):
  fires = isinstance(Device[device].renderer, CUDARenderer)
  @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.sampled_from(["dense", "moe"]), st.sampled_from([16, 64, 256]), st.sampled_from([256, 512, 2048]), st.sampled_from([0, 4, 8]),
         st.integers(0, 2**16))
  def prop(kind, out, inp, x_offset, seed):
    with Context(DEV=device):
      make = matvec(kind, out, inp, device, seed, x_offset)
      with tinygrad_ext.without("wide_loads"): ref = make().numpy()
      np.testing.assert_array_equal(make().numpy(), ref)
  prop()
  # the property ran where the pass fires: CUDA reads the activations as half8 (here: rendered for the device)
  src = render(matvec_ast(matvec("moe", 3072, 2048, device, empty=True)), Device[device].renderer)
  assert ("(half8*)" in src) == fires, src

def test_half_views_off_16_bytes_are_copied_while_the_pass_is_on():
  a = Tensor(np.arange(64, dtype=np.float16), device="CPU").realize()
  def realized(make):
    t = make().contiguous().realize()
    np.testing.assert_array_equal(t.numpy(), make().numpy())
    b = t.uop.buffer
    return (b.offset, b._base is not None)  # bytes into its base buffer, and whether it is a view of one
  with tinygrad_ext.without("wide_loads"):
    assert realized(lambda: a[3:]) == (6, True) and realized(lambda: a[4:]) == (8, True)
  with tinygrad_ext.only("wide_loads"):
    assert realized(lambda: a[3:]) == (0, False) and realized(lambda: a[4:]) == (0, False)
    assert realized(lambda: a[8:]) == (16, True) and realized(lambda: a[40:]) == (80, True)  # 16-byte aligned: still views
    assert realized(lambda: a.bitcast(dtypes.uint16)[3:]) == (6, True)  # not fp16: no kernel of the pass reads it
    with tinygrad_ext.passes_off(): u = a.bitcast(dtypes.uint16)[3:].contiguous().realize()
    # a view of a view: its offset counts from the first buffer (6 + 10 bytes is aligned, 6 + 8 is not)
    assert realized(lambda: u.bitcast(dtypes.half)[5:]) == (16, True) and realized(lambda: u.bitcast(dtypes.half)[4:]) == (0, False)

def test_disk_views_stay_views(tmp_path):
  # a GGUF file is read through views of a DISK buffer at any offset, and DISK runs no kernels: a copy would fail there
  data = np.arange(64, dtype=np.float16)
  data.tofile(path := tmp_path / "x.bin")
  with tinygrad_ext.only("wide_loads"):
    t = Tensor.empty(64, dtype=dtypes.half, device=f"disk:{path}")
    np.testing.assert_array_equal(t[3:].to("CPU").numpy(), data[3:])
