"""The pipeline: at each point where tinygrad_ext enters tinygrad, which passes run there and in what order.

A pass declares where it hooks (registry.py: a codegen step's name, a schedule step's, an opt heuristic, ...); this
table orders the library's passes at each point, in the order tinygrad reaches the points. Order matters where two
passes share a point: subnormal_dequant reads the factors hoist leaves and the fields packed_loads reads and must run
before int_to_float converts them; long_reduce's heuristic only sees kernels matvec's declined; the first heuristic
that takes a kernel decides its opts. A pass this table does not name (one registered by a user) runs after the
named ones at its point, in registration order.

install() checks every step name against the installed tinygrad (check()): a renamed step would otherwise leave its
passes silently idle.
"""
from __future__ import annotations
import functools, inspect, re
from tinygrad_ext.registry import PASSES, Pass, Hook, CodegenStep, ScheduleStep, SchedulerOpt, OptHeuristic, MatcherRules, ViewGuard, KernelPrologue, GraphBuilt, TensorCores, ScheduleOrder
from tinygrad_ext._version import SUPPORTED_TINYGRAD, installed_tinygrad_version
from tinygrad_ext.errors import PipelineError

# (point kind, step or matcher name, passes in the order they run there), in the order tinygrad reaches the points
PIPELINE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
  # scheduling: tinygrad.schedule.rangeify.get_kernel_graph
  ("schedule step", "convert copy to store", ("fusion",)),
  ("schedule step", "symbolic+reduce_collapse+debuf", ("fusion",)),
  # the kernels' order: tinygrad.schedule.create_schedule
  ("schedule order", "", ("late_producers",)),
  # each kernel's opts: tinygrad.codegen.apply_opts (the first heuristic that returns opts decides)
  ("opt heuristic", "", ("fusion", "matvec", "quant_gemm", "long_reduce")),
  ("scheduler opt", "", ("reduce_local",)),
  ("tensor cores", "", ("tc_contiguous_k",)),
  # codegen: tinygrad.codegen.full_rewrite_to_sink, after the named step
  ("codegen step", "postopt symbolic", ("hoist", "subnormal_dequant")),
  ("codegen step", "expander", ("reduce_local", "fusion")),
  ("codegen matcher", "pm_add_loads", ("reduce_local",)),
  ("codegen step", "add images", ("packed_loads", "wide_loads", "subnormal_dequant")),
  ("codegen step", "final symbolic", ("int_to_float",)),
  # rendering: tinygrad.renderer.cstyle.CStyleLanguage.render_kernel
  ("kernel prologue", "", ("pdl",)),
  # realizing a slice of a buffer: tinygrad.tensor._make_buffer_view
  ("buffer view", "", ("wide_loads",)),
  # a JIT's captured calls as one device graph: tinygrad.runtime.graph.cuda.CUDAGraph.__init__
  ("graph built", "CUDA", ("pdl",)),
)


def point(h:Hook) -> tuple[str, str]:
  if isinstance(h, CodegenStep): return ("codegen step", h.step)
  if isinstance(h, ScheduleStep): return ("schedule step", h.step)
  if isinstance(h, OptHeuristic): return ("opt heuristic", "")
  if isinstance(h, SchedulerOpt): return ("scheduler opt", "")
  if isinstance(h, MatcherRules): return ("codegen matcher", h.attr)
  if isinstance(h, ViewGuard): return ("buffer view", "")
  if isinstance(h, KernelPrologue): return ("kernel prologue", "")
  if isinstance(h, GraphBuilt): return ("graph built", h.device)
  if isinstance(h, TensorCores): return ("tensor cores", "")
  if isinstance(h, ScheduleOrder): return ("schedule order", "")
  raise TypeError(f"not a hook: {h!r}")

def _position(p:Pass, h:Hook) -> tuple[int, int]:
  at = point(h)
  for i, (kind, step, names) in enumerate(PIPELINE):
    if (kind, step) == at: return (i, names.index(p.name) if p.name in names else len(names))
  return (len(PIPELINE), 0)  # a point the table does not use (a user's pass): after all of it

def ordered(hooks:list[tuple[Pass, Hook]]) -> list[tuple[Pass, Hook]]:
  """(pass, hook) pairs in pipeline order: by point, then the table's order of passes there, then registration order
  (Python's sort is stable, and a pass's own hooks keep their declared order)."""
  return sorted(hooks, key=lambda ph: _position(*ph))

def library_passes() -> set[str]: return {n for _, _, names in PIPELINE for n in names}

@functools.cache
def tinygrad_steps(kind:str) -> frozenset[str]:
  """The graph_rewrite step names of the installed tinygrad's codegen or scheduler (read from their source)."""
  import tinygrad.codegen, tinygrad.schedule.rangeify
  module = tinygrad.codegen if kind == "codegen step" else tinygrad.schedule.rangeify
  return frozenset(re.findall(r"""name=["']([^"']+)["']""", inspect.getsource(module)))

@functools.cache
def graph_class(device:str) -> type|None:
  """tinygrad's graph runtime of a device (tinygrad.runtime.graph.cuda.CUDAGraph), or None where it has none."""
  import importlib
  try: return getattr(importlib.import_module(f"tinygrad.runtime.graph.{device.lower()}"), f"{device}Graph", None)
  except ImportError: return None

def tinygrad_has(kind:str, step:str) -> bool:
  if kind in ("codegen step", "schedule step"): return step in tinygrad_steps(kind)
  if kind == "codegen matcher":
    import tinygrad.codegen
    from tinygrad.uop.ops import PatternMatcher
    return isinstance(getattr(tinygrad.codegen, step, None), PatternMatcher)
  if kind == "graph built": return graph_class(step) is not None
  return True  # the other points are attributes that hooks.install() replaces, and checks there

def check(passes:dict[str, Pass]|None=None) -> None:
  """Raises PipelineError unless every point the table and the registered passes use exists in the installed tinygrad,
  and every hook of a pass the table names is placed by it."""
  passes = PASSES if passes is None else passes
  version = installed_tinygrad_version()
  used = {(kind, step): list(names) for kind, step, names in PIPELINE}
  for p in passes.values():
    for h in p.hooks: used.setdefault(point(h), []).append(p.name)
  for (kind, step), names in used.items():
    if not tinygrad_has(kind, step):
      raise PipelineError(f"tinygrad {version} has no {kind} {step!r}, where tinygrad_ext runs {', '.join(dict.fromkeys(names))} "
                          f"(written for tinygrad {SUPPORTED_TINYGRAD}'s pipeline)")
  listed = library_passes()
  for p in passes.values():
    if p.name not in listed: continue
    for h in p.hooks:
      kind, step = point(h)
      if not any((kind, step) == (k, s) and p.name in names for k, s, names in PIPELINE):
        raise PipelineError(f"pass {p.name} hooks {kind} {step!r}, where tinygrad_ext.pipeline.PIPELINE does not place it")

def describe() -> list[str]:
  """The pipeline in the order it runs, a line per point: where, then its passes (user passes after the table's)."""
  lines, seen = [], set()
  for kind, step, names in PIPELINE:
    here = [p.name for p, h in ordered([(p, h) for p in PASSES.values() for h in p.hooks]) if point(h) == (kind, step)]
    seen.add((kind, step))
    lines.append(f"{kind + (' ' + repr(step) if step else ''):<48} {' -> '.join(dict.fromkeys(here)) or '(none registered)'}")
  for p in PASSES.values():
    for h in p.hooks:
      if (at:=point(h)) not in seen: lines.append(f"{at[0] + (' ' + repr(at[1]) if at[1] else ''):<48} {p.name} (not in the table: runs last)")
  return lines
