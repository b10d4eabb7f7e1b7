"""Helpers for tests: the kernels a Tensor expression compiles to, and their rendered source."""
import re, sys, types
from typing import Callable
from dataclasses import replace
from tinygrad import Tensor, Device, dtypes
from tinygrad.llm.gguf import ggml_data_to_tensor
from tinygrad.uop.ops import Ops, UOp, ProgramInfo
from tinygrad.helpers import Target, Context
import tinygrad.codegen as codegen

def a_row_and_a_block_per_lane():
  """The matvec policy without row upcasts and with each quant block whole in one lane: structural tests count the loads
  and products of one row's block."""
  return Context(TINYGRAD_EXT_MATVEC_POLICY="upcast_rows=1,wide_upcast_rows=0,lanes_per_block_wide=1")

def kernel_asts(make:Callable[[], Tensor]) -> list[UOp]:
  """The SINK of every kernel that realizing make() would run (built fresh, nothing is realized; shapes may be symbolic)."""
  return [c.src[0] for c in Tensor.linear_with_vars(make())[0].src if c.src[0].op is Ops.SINK]

def program(ast:UOp, device:str|None=None) -> UOp:
  return codegen.to_program(ast, Device[device or Device.DEFAULT].renderer)

def kernel_sources(make:Callable[[], Tensor], device:str|None=None) -> list[str]:
  return [program(ast, device).src[2].arg for ast in kernel_asts(make)]

# *** Q4_0 matvecs as the GLM model reads them (raw GGUF bytes dequantized in the kernel, in float32, times the fp16
# activation widened: model.linear under the mixed numerics policy), and what renders of them hold ***

def q4_0_matvec_ast(rows=256, inp=2048):
  raw = Tensor.empty(rows * inp // 32 * 18, dtype=dtypes.uint8)
  x = Tensor.empty(1, inp, dtype=dtypes.float16)
  return kernel_asts(lambda: x.float() @ ggml_data_to_tensor(raw, rows * inp, 2).reshape(rows, inp).T)[0]

def gated_moe_matvec_ast(experts=8, rows=256, inp=2048):
  raw = Tensor.empty(experts * rows * inp // 32 * 18, dtype=dtypes.uint8)
  x, sel = Tensor.empty(1, 1, 1, inp, dtype=dtypes.float16), Tensor.empty(1, 1, 4, dtype=dtypes.int32)
  w = ggml_data_to_tensor(raw, experts * rows * inp, 2).reshape(experts, rows, inp)
  return kernel_asts(lambda: (x.float().unsqueeze(-2) @ w[sel].transpose(-1, -2)).contiguous())[0]

def shuffle_offsets(src:str) -> list[int]:
  """The lane offsets of every warp shuffle in rendered CUDA, in order."""
  return [int(o) for o in re.findall(r"__shfl_xor_sync\(0xffffffffu, \w+, (\d+)\)", src)]

# *** rendering for backends this machine cannot run ***

def with_opts(ast:UOp, *opts) -> UOp:
  """The kernel with these opts forced (tinygrad's KernelInfo.opts_to_apply), instead of the heuristic's."""
  return ast.replace(arg=replace(ast.arg, opts_to_apply=tuple(opts)))

def render(ast:UOp, ren) -> str:
  """Source of the kernel as `ren` renders it, without compiling."""
  sink = codegen.full_rewrite_to_sink(ast, ren, optimize=ast.tag is None)
  prg = codegen.do_linearize(ren, UOp(Ops.PROGRAM, src=(sink,), arg=ProgramInfo.from_sink(sink, ren.target)), sink)
  return ren.render(list(prg.src[-1].src))

def launch_dims_at_zero(ast:UOp, ren) -> tuple[tuple[int, ...], tuple[int, ...]|None]:
  """The kernel's launch dims with every variable at 0, as `ren` would launch it: what tinygrad's CUDA graph builds
  each node with (graph/cuda.py), whatever the variables' ranges; the driver refuses a 0 there."""
  info = ProgramInfo.from_sink(codegen.full_rewrite_to_sink(ast, ren, optimize=ast.tag is None), ren.target)
  return info.launch_dims({v.expr: 0 for v in info.vars})

# *** fp16 products on tensor cores, as a prefill chunk runs them (tc_contiguous_k) ***

def half_gemm(M:int, N:int, K:int) -> Callable[[], Tensor]:
  a, b = Tensor.empty(M, K, dtype=dtypes.half), Tensor.empty(N, K, dtype=dtypes.half)
  return lambda: a.matmul(b.T, dtype=dtypes.float)

def staged_moe_tiles(tiles:int=4, M:int=64, N:int=768, K:int=512) -> Callable[[], Tensor]:
  """A prefill chunk's MoE tiles against their experts' staged fp16 weights (model.grouped_experts)."""
  x, w, te = Tensor.empty(tiles, M, K, dtype=dtypes.half), Tensor.empty(9, N, K, dtype=dtypes.half), Tensor.empty(tiles, dtype=dtypes.int32)
  return lambda: x.matmul(w[te].transpose(-1, -2), dtype=dtypes.float)

def half_loads(src:str) -> list[str]:
  """The vector type of each half load a rendered CUDA kernel makes."""
  return re.findall(r"\b(half\d?) val\d+ = ", src)

def cuda_renderer(arch="sm_90"):
  from tinygrad.renderer.cstyle import NVCCRenderer  # compiles with nvcc, where there is one; renders anywhere
  return NVCCRenderer(Target(device="CUDA", arch=arch))

def clang_renderer():
  # tinygrad's CPU renderer without opening the CPU device (which compiles on open: the GPU machine's gcc cannot)
  from tinygrad.renderer.cstyle import ClangRenderer
  return ClangRenderer(Target(device="CPU", arch="x86_64,native"))

def metal_renderer(arch="Apple9"):
  # MetalRenderer imports its compiler from ops_metal, which needs macOS: stub that import to render on Linux
  if "tinygrad.runtime.ops_metal" not in sys.modules:
    stub = types.ModuleType("tinygrad.runtime.ops_metal")
    stub.MetalCompiler = type("MetalCompiler", (), {})
    sys.modules["tinygrad.runtime.ops_metal"] = stub
  from tinygrad.renderer.cstyle import MetalRenderer
  return MetalRenderer(Target(device="METAL", arch=arch))

class _Captured(Exception): pass

def scheduler_of(ast:UOp, ren):
  """tinygrad's Scheduler of ast as codegen hands it to apply_opts (ranges split and simplified, loops made global):
  the state BEAM searches from, whose opts replay exactly through realize_with_opts."""
  from tinygrad.codegen.opt.postrange import Scheduler
  seen: list[UOp] = []
  def capture(sink, ren, beam=0):
    seen.append(sink)
    raise _Captured
  old, codegen.apply_opts = codegen.apply_opts, capture
  try: codegen.full_rewrite_to_sink(ast, ren, optimize=True)
  except _Captured: pass
  finally: codegen.apply_opts = old
  k = Scheduler(seen[0], ren)
  k.convert_loop_to_global()
  return k

def realize_with_opts(make:Callable[[], Tensor], *opts):
  """Realizes make() with `opts` forced on every kernel that has a REDUCE (others keep the heuristic); returns numpy."""
  from tinygrad.engine.realize import run_linear
  t = make()
  lin = t.schedule_linear()
  # each CALL rebuilt with its kernel replaced: UOp.substitute does not reach a CALL's kernel, so a substitute left every
  # kernel as it was and the opts were silently never applied
  def forced(c:UOp) -> UOp:
    if c.op is not Ops.CALL or c.src[0].op is not Ops.SINK or not any(u.op is Ops.REDUCE for u in c.src[0].toposort()): return c
    return c.replace(src=(with_opts(c.src[0], *opts),)+c.src[1:])
  new = lin.replace(src=tuple(forced(c) for c in lin.src))
  assert new is not lin, "no reduce kernel"
  run_linear(new)
  return t.numpy()
