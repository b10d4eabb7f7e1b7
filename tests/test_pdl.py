"""pdl: every sm_90+ CUDA kernel starts with griddepcontrol.wait (then the trigger), and a captured CUDA graph's edges
into such kernels become programmatic. Rendered here for CUDA, OpenCL, clang and Metal; the graph's legality is
checked by simulating launches under the relaxed edges; on CUDA (TINYGRAD_EXT_TEST_DEVICES=CUDA) a jitted chain of
dependent kernels runs with the edges and is compared with pdl off."""
import os
import numpy as np
from hypothesis import given, settings, strategies as st
import pytest
from tinygrad import Tensor, TinyJit, Context, dtypes
import tinygrad.codegen as codegen
from tinygrad_ext import without
from tinygrad_ext.passes.pdl import WAIT, TRIGGER, waits_first, programmatic_edges, sm_version
from kernels import kernel_asts, render, cuda_renderer, clang_renderer, metal_renderer, q4_0_matvec_ast, gated_moe_matvec_ast
from helpers import need_tool

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")

def kernels():
  """Kernels of the kinds a decode step runs: quantized matvecs, a fused RMSNorm row (shared memory), elementwise."""
  x, w = Tensor.empty(1, 2048), Tensor.empty(2048)
  return [q4_0_matvec_ast(), gated_moe_matvec_ast(), *kernel_asts(lambda: x * (x.square().mean(-1, keepdim=True) + 1e-6).rsqrt() * w),
          *kernel_asts(lambda: (x.cast(dtypes.half) + 1).contiguous())]

def body(src:str) -> list[str]:
  """The statements of the kernel function, in order."""
  return [s.strip() for s in src[src.index("{", src.index("__global__")) + 1:].splitlines() if s.strip()]

@pytest.mark.parametrize("arch", ["sm_90", "sm_100"])
def test_hopper_kernels_wait_for_their_predecessors_before_anything_else(arch):
  for ast in kernels():
    src = render(ast, cuda_renderer(arch))
    assert body(src)[:2] == [WAIT, TRIGGER] and src.count("griddepcontrol") == 2, src
    assert waits_first(src)
    with without("pdl"): off = render(ast, cuda_renderer(arch))
    assert "griddepcontrol" not in off and not waits_first(off)
    assert body(src)[2:] == body(off), "the rest of the kernel is the same"

@pytest.mark.parametrize("ren", [lambda: cuda_renderer("sm_80"), lambda: cuda_renderer("sm_89"), clang_renderer, metal_renderer,
                                 lambda: __import__("tinygrad").Device["CL"].renderer], ids=["sm_80", "sm_89", "clang", "metal", "cl"])
def test_other_targets_render_no_dependency_control(ren):
  for ast in kernels():
    src = render(ast, ren())
    assert "griddepcontrol" not in src and not waits_first(src)

def test_the_wait_must_come_first_for_an_edge_to_be_relaxed():
  src = render(q4_0_matvec_ast(), cuda_renderer())
  lines = src.splitlines()
  at = next(i for i, line in enumerate(lines) if WAIT in line)
  moved = lines[:at] + [lines[at + 2], lines[at], lines[at + 1]] + lines[at + 3:]  # a statement before the wait
  assert waits_first(src) and not waits_first("\n".join(moved))
  assert sm_version("sm_90") == 90 and sm_version("sm_90a") == 90 and sm_version("gfx1100") == 0

def test_the_compiled_kernel_keeps_the_wait_and_programs_are_cached_per_setting():
  need_tool("nvcc", "the CUDA toolkit's compiler, to compile the rendered CUDA")
  ast, ren = q4_0_matvec_ast(), cuda_renderer()
  ptx = ren.compiler.compile(render(ast, ren)).decode()
  assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
  on = codegen.to_program(ast, ren).src[2].arg
  with without("pdl"): off = codegen.to_program(ast, ren).src[2].arg
  assert waits_first(on) and not waits_first(off) and codegen.to_program(ast, ren).src[2].arg == on

# *** the graph: launches simulated under the relaxed edges ***

def simulate(n:int, edges:list[tuple[int, int]], relaxed:set[tuple[int, int]], waits:set[int], took:list[float]) -> list[tuple[float, float]]:
  """(when node v first touches memory, when it ends) for nodes launched in order 0..n-1. A node starts when each
  predecessor has ended, or, over a programmatic edge, when its predecessor has triggered (pdl's kernels trigger just
  after their wait; others when they end). A waiting node touches memory once every programmatic predecessor ended;
  one that does not wait touches it as it starts."""
  touch, end, trigger = [0.0] * n, [0.0] * n, [0.0] * n
  for v in range(n):
    preds = [(u, (u, v) in relaxed) for u, w in edges if w == v]
    start = max([trigger[u] if r else end[u] for u, r in preds], default=0.0)
    touch[v] = max([start] + [end[u] for u, r in preds if r]) if v in waits else start
    end[v] = touch[v] + took[v]
    trigger[v] = touch[v] if v in waits else end[v]
  return list(zip(touch, end))

@st.composite
def graphs(draw):
  n = draw(st.integers(2, 12))
  edges = [(u, v) for v in range(n) for u in range(v) if draw(st.booleans())]
  kernels = {v for v in range(n) if draw(st.integers(0, 4))}  # the rest are copies
  waits = {v for v in kernels if draw(st.integers(0, 3))}      # the rest were compiled without the pass
  took = [draw(st.floats(0.1, 10)) for _ in range(n)]
  return n, edges, kernels, waits, took

@settings(max_examples=300, deadline=None)
@given(graphs())
def test_no_kernel_touches_memory_before_its_predecessors_end(g):
  n, edges, kernels, waits, took = g
  relaxed = set(programmatic_edges(edges, kernels, waits))
  times = simulate(n, edges, relaxed, waits, took)
  assert all(times[v][0] >= times[u][1] for u, v in edges), (edges, relaxed)
  assert relaxed == {(u, v) for u, v in edges if u in kernels and v in kernels and v in waits}

def test_the_simulation_catches_an_edge_relaxed_into_a_kernel_that_does_not_wait():
  # a -> b relaxed with b not waiting: b would read a's output before a ends (what pdl refuses to build)
  assert programmatic_edges([(0, 1)], {0, 1}, {0}) == []
  touch, _ = simulate(2, [(0, 1)], {(0, 1)}, {0}, [5.0, 1.0])[1]
  assert touch < 5.0

# *** on a device: a jitted chain of dependent kernels ***

@pytest.mark.parametrize("device", DEVICES)
def test_a_jitted_chain_of_dependent_kernels_computes_as_without_pdl(device):
  # each kernel reads what the one before it wrote, and writes what it read (a read-after-write and a write-after-read
  # hazard per edge): a kernel that ran ahead of its predecessor would read stale values
  from tinygrad_ext.internals import graph_runners
  from tinygrad_ext.passes.pdl import driver_entry
  def run():
    with Context(DEV=device):
      x, y = Tensor(np.arange(1 << 16, dtype=np.float32)).realize(), Tensor(np.ones(1 << 16, np.float32)).realize()
      @TinyJit
      def chain(x:Tensor, y:Tensor):
        for i in range(12):
          x.assign(x * 0.5 + y.flip(0) + i).realize()
          y.assign(y + x.sum() * 1e-9).realize()
        return (x + y).realize()
      out = [chain(x, y).numpy() for _ in range(4)]
      return out, [getattr(g, "programmatic_edges", None) for g in graph_runners(chain)]
  with without("pdl"): off, off_edges = run()
  on, on_edges = run()
  for a, b in zip(on, off): np.testing.assert_array_equal(a, b)
  assert all(e in (None, 0) for e in off_edges)
  if device.startswith("CUDA"):
    from tinygrad import Device
    can = sm_version(Device[device].arch) >= 90 and driver_entry("cuGraphAddDependencies_v2") is not None
    assert on_edges and all((e > 0) if can else (e == 0) for e in on_edges), on_edges
  else: assert all(e is None for e in on_edges)
