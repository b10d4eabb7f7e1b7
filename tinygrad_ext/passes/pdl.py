"""pdl: programmatic dependent launch of a captured CUDA graph's kernels (Hopper and later).

A decode step is ~750 kernels in one CUDA graph, most of them a few microseconds long, and each waits for its
predecessor to finish and its writes to be flushed before it is even launched: ~2 us a dependent launch on an H100,
which is most of what the small kernels cost. With programmatic dependent launch (sm_90+, CUDA 12.3+ graphs) a
kernel may be launched while its predecessor drains: its blocks are scheduled and run their prologue, and
`griddepcontrol.wait` holds them until every prerequisite grid has completed and its memory is visible.

Two hooks, one pass:
  - KernelPrologue: every kernel the CUDA renderer renders for sm_90+ starts with `griddepcontrol.wait` (before any
    memory access: a read of what the predecessor writes, and a write of what it reads, are both after it), then
    `griddepcontrol.launch_dependents` (the kernels after it may be launched once all its blocks have begun). Launched
    without a programmatic dependency (a plain launch, an older driver) both instructions do nothing.
  - GraphBuilt: after tinygrad builds a CUDA graph, each kernel-to-kernel edge into a kernel that starts with that wait
    becomes a programmatic edge (from the predecessor's programmatic port), and the graph is instantiated again.

Legality: a programmatic edge lets a kernel start before its predecessor ends, so it is made only into a kernel whose
source begins with the wait; edges from or to copies stay full dependencies. The wait waits for every prerequisite
grid's completion and memory (not for the trigger), so the trigger's place cannot make a kernel read early; a kernel
that reaches past its predecessor (to a grandparent's output) is safe too, since the predecessor cannot have completed
before its own wait returned. A GPU, driver or graph without the feature (before sm_90, libcuda without
cuGraphAddDependencies_v2, an instantiate that fails) keeps the graph as tinygrad built it.
"""
from __future__ import annotations
import ctypes, re
from tinygrad.renderer import Renderer
from tinygrad.renderer.cstyle import CUDARenderer
from tinygrad_ext import Pass, KernelPrologue, GraphBuilt, register

WAIT = 'asm volatile("griddepcontrol.wait;" ::: "memory");'
TRIGGER = 'asm volatile("griddepcontrol.launch_dependents;");'

def sm_version(arch:str) -> int:
  """90 for "sm_90" or "sm_90a"; 0 for what is not an sm_ arch."""
  return int(m.group(1)) if (m:=re.fullmatch(r"sm_(\d+)a?", arch)) else 0

def prologue(ren:Renderer) -> list[str]:
  """The first lines of every kernel: the wait and the trigger for CUDA on sm_90+, nothing elsewhere."""
  return ["  " + WAIT, "  " + TRIGGER] if isinstance(ren, CUDARenderer) and sm_version(ren.target.arch) >= 90 else []

def waits_first(src:str) -> bool:
  """The kernel's body starts with the wait (rendered by this pass): it may start before its predecessors end."""
  body = src[src.index("{", src.index("__global__")) + 1:] if "__global__" in src else ""
  return body.lstrip().startswith(WAIT)

def programmatic_edges(edges:list[tuple[int, int]], kernels:set[int], waiting:set[int]) -> list[tuple[int, int]]:
  """Which edges of a graph (from, to node) become programmatic: kernel to kernel, into a kernel that waits."""
  return [(a, b) for a, b in edges if a in kernels and b in kernels and b in waiting]

# *** the CUDA driver (CUDA 12.3 graph edge data; tinygrad's bindings predate it) ***

class EdgeData(ctypes.Structure):
  _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte), ("reserved", ctypes.c_ubyte * 5)]
PORT_PROGRAMMATIC, DEPENDENCY_PROGRAMMATIC = 1, 1

def driver_entry(name:str):
  """A libcuda function tinygrad does not bind, or None where this driver lacks it."""
  import tinygrad.runtime.autogen.cuda as cuda
  try: return getattr(cuda.dll, name)
  except (AttributeError, OSError): return None

def graph_edges(cuda, graph) -> list[tuple[int, int]]:
  n = ctypes.c_size_t(0)
  if cuda.cuGraphGetEdges(graph, None, None, ctypes.byref(n)) != 0 or n.value == 0: return []
  frm, to = (cuda.CUgraphNode * n.value)(), (cuda.CUgraphNode * n.value)()
  if cuda.cuGraphGetEdges(graph, frm, to, ctypes.byref(n)) != 0: return []
  return [(ctypes.cast(a, ctypes.c_void_p).value or 0, ctypes.cast(b, ctypes.c_void_p).value or 0) for a, b in zip(frm[:n.value], to[:n.value])]

def node_handle(node) -> int: return ctypes.cast(node, ctypes.c_void_p).value or 0

def bind(name:str, cuda):
  """cuGraphAddDependencies_v2 / cuGraphRemoveDependencies_v2 (CUDA 12.3: edges with data), or None."""
  if (f := driver_entry(name)) is None: return None
  f.argtypes = [cuda.CUgraph, ctypes.POINTER(cuda.CUgraphNode), ctypes.POINTER(cuda.CUgraphNode), ctypes.POINTER(EdgeData), ctypes.c_size_t]
  f.restype = ctypes.c_int
  return f

def make_programmatic(graph_runner) -> int:
  """Turns a built CUDAGraph's kernel-to-kernel edges into programmatic ones where legal (see the module doc) and
  instantiates it again; returns how many edges it turned (0: the graph is as tinygrad built it), which it also keeps
  as graph_runner.programmatic_edges."""
  import tinygrad.runtime.autogen.cuda as cuda
  from tinygrad.uop.ops import Ops
  from tinygrad.device import Device
  graph_runner.programmatic_edges = 0
  if sm_version(getattr(Device[graph_runner.calls[0][2][0].device], "arch", None) or "") < 90: return 0
  if (add := bind("cuGraphAddDependencies_v2", cuda)) is None or (remove := bind("cuGraphRemoveDependencies_v2", cuda)) is None: return 0
  # graph_runner.nodes holds one entry per PROGRAM or COPY call, in order (tinygrad.runtime.graph.cuda.CUDAGraph.__init__)
  programs = [ast for _, ast, _, _ in graph_runner.calls if ast.op in (Ops.PROGRAM, Ops.COPY)]
  kernels, waiting, handles = set(), set(), {}
  for ast, (node, _, _, is_copy) in zip(programs, graph_runner.nodes):
    handles[h:=node_handle(node)] = node
    if is_copy: continue
    kernels.add(h)
    if waits_first(ast.src[2].arg): waiting.add(h)
  if not (turn := programmatic_edges(graph_edges(cuda, graph_runner.graph), kernels, waiting)): return 0
  full, programmatic = EdgeData(), EdgeData(PORT_PROGRAMMATIC, 0, DEPENDENCY_PROGRAMMATIC)
  def move(a:int, b:int, old:EdgeData, new:EdgeData) -> bool:
    # one edge a call: some drivers apply the first edge's data to every edge of a batch
    frm, to = (cuda.CUgraphNode * 1)(handles[a]), (cuda.CUgraphNode * 1)(handles[b])
    if remove(graph_runner.graph, frm, to, ctypes.byref(old), 1) != 0: return False
    if add(graph_runner.graph, frm, to, ctypes.byref(new), 1) == 0: return True
    add(graph_runner.graph, frm, to, ctypes.byref(old), 1)
    return False
  done = []
  for a, b in turn:
    if not move(a, b, full, programmatic): break
    done.append((a, b))
  instance = cuda.CUgraphExec()
  if len(done) == len(turn) and cuda.cuGraphInstantiate_v2(ctypes.byref(instance), graph_runner.graph, None, None, 0) == 0:
    cuda.cuGraphExecDestroy(graph_runner.instance)
    graph_runner.instance, graph_runner.programmatic_edges = instance, len(done)
    return len(done)
  for a, b in done: move(a, b, programmatic, full)  # back to full dependencies: tinygrad's instance stays
  return 0

PDL = register(Pass("pdl", "a CUDA graph's kernels launch while their predecessor drains (sm_90+: griddepcontrol.wait first, programmatic edges)",
                    (KernelPrologue(prologue), GraphBuilt("CUDA", make_programmatic))))
