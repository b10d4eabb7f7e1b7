"""The pass registry: what a pass is, and the named passes known to this process."""
from __future__ import annotations
import contextvars
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Union
from tinygrad.uop.ops import UOp
from tinygrad.renderer import Renderer

@dataclass(frozen=True)
class CodegenStep:
  """Runs `rewrite(sink, renderer) -> sink` right after the graph_rewrite step named `step` in
  tinygrad.codegen.full_rewrite_to_sink (the step names are tinygrad 0.14.0's, e.g. "devectorize2", "final rewrite")."""
  step: str
  rewrite: Callable[[UOp, Renderer], UOp]
  def where(self) -> str: return f"tinygrad.codegen.full_rewrite_to_sink: after step '{self.step}'"

@dataclass(frozen=True)
class ScheduleStep:
  """Runs `rewrite(sink) -> sink` right after the graph_rewrite step named `step` in
  tinygrad.schedule.rangeify.get_kernel_graph (tinygrad 0.14.0's names, e.g. "symbolic+reduce_collapse+debuf", after
  which every buffer left is a kernel's output). Its rewrite must return the sink unchanged while its pass is off: the
  schedule is built outside any codegen context, so the hook cannot know which passes the kernels will use."""
  step: str
  rewrite: Callable[[UOp], UOp]
  def where(self) -> str: return f"tinygrad.schedule.rangeify.get_kernel_graph: after step '{self.step}'"

# True while the schedule being built computes a value that another schedule computes too: a live tensor that is not
# realized now still computes from it, or an earlier such schedule did (hooks.py sets it; the schedule cache keys on it).
# Values realized in the two are then mixed (SVD's S now, V with S's sort indices later), so a ScheduleStep must not make
# a value's bits depend on the schedule around it (fusion then recomputes only reproducible intermediates).
shared_values: contextvars.ContextVar[bool] = contextvars.ContextVar("tinygrad_ext_shared_values", default=False)

@dataclass(frozen=True)
class SchedulerOpt:
  """A new Scheduler opt. tinygrad's Scheduler.apply_opt hands Opts whose `op` is this `op` to `apply(scheduler, opt)`
  (which raises KernelOptError where the opt is illegal), and `beam_actions` join BEAM's search space. `guard(scheduler,
  opt)`, if given, sees each of tinygrad's own opts first and raises KernelOptError where one would undo what `apply`
  built (BEAM tries every action on every state)."""
  op: Enum
  apply: Callable[..., object]
  beam_actions: tuple = ()
  guard: Callable[..., None]|None = None
  def where(self) -> str:
    return f"tinygrad.codegen.opt.postrange.Scheduler.apply_opt: Opt({self.op}){' (and a guard on tinygrad opts)' if self.guard else ''}; " \
           f"tinygrad.codegen.opt.search.actions: +{len(self.beam_actions)}"

@dataclass(frozen=True)
class OptHeuristic:
  """Picks the opts of a kernel before tinygrad's hand_coded_optimizations: `choose(scheduler)` applies opts and returns
  the scheduler, or returns None (or raises KernelOptError) to leave the kernel to tinygrad. Not consulted under BEAM,
  NOOPT, or for kernels whose opts are given."""
  choose: Callable[..., object]
  def where(self) -> str: return "tinygrad.codegen.apply_opts: before hand_coded_optimizations"

@dataclass(frozen=True)
class MatcherRules:
  """Rules appended to one of tinygrad's codegen PatternMatchers, `tinygrad.codegen.<attr>` (looked up by
  full_rewrite_to_sink at every call). They must match only UOps their own pass creates, so they are inert while it is off."""
  attr: str
  matcher: object
  def where(self) -> str: return f"tinygrad.codegen.{self.attr}: +{len(self.matcher.patterns)} rule(s)"

@dataclass(frozen=True)
class ViewGuard:
  """tinygrad turns a contiguous slice of a realized buffer (`a[:, 3:].contiguous()`) into a view of that buffer at any
  element offset (tinygrad.tensor._make_buffer_view). While its pass is on, `allow(src)` sees each such slice first; where
  it returns False the slice is copied into a buffer of its own instead (a kernel): a pass whose code needs aligned
  buffers can make that true of every buffer its kernels read. While its pass is off it is not asked."""
  allow: Callable[[UOp], bool]
  def where(self) -> str: return "tinygrad.tensor._make_buffer_view: a view only where allowed, else a copy"

@dataclass(frozen=True)
class KernelPrologue:
  """`lines(renderer)` are the first statements of every kernel a C-style renderer renders (inside the function, before
  its body); an empty list where they do not apply to that renderer. While its pass is off it is not asked."""
  lines: Callable[[Renderer], list[str]]
  def where(self) -> str: return "tinygrad.renderer.cstyle.CStyleLanguage.render_kernel: statements first in the kernel"

@dataclass(frozen=True)
class GraphBuilt:
  """`apply(graph)` runs on each device graph of `device` (tinygrad.runtime.graph.<device>.<Device>Graph) right after
  tinygrad builds and instantiates it: a JIT's captured calls, replayed as one graph launch. The graph runtime is not a
  codegen step: what apply may change must follow from the programs in the graph (their source), since a graph can be
  built long after they were compiled (a stored JIT). While its pass is off it is not asked."""
  device: str
  apply: Callable[[object], object]
  def where(self) -> str: return f"tinygrad.runtime.graph.{self.device.lower()}.{self.device}Graph.__init__: after the graph is instantiated"

@dataclass(frozen=True)
class TensorCores:
  """`choose(renderer, tensor_cores) -> tensor_cores`: the tensor cores tinygrad's TC opt (Scheduler._apply_tc_opt)
  picks from in place of the renderer's. As many, in the same order (BEAM's TC actions and an opt's tc_select index
  them), each computing the same product. While its pass is off it is not asked."""
  choose: Callable[[Renderer, list], list]
  def where(self) -> str: return "tinygrad.codegen.opt.postrange.Scheduler._apply_tc_opt: the tensor cores it picks from"

@dataclass(frozen=True)
class ScheduleOrder:
  """`reorder(linear) -> linear`: the kernels of a schedule tinygrad built (tinygrad.schedule.create_schedule's LINEAR
  of kernel CALLs) in another order, every kernel after each one it reads from, writes after, or must not overwrite
  first. A JIT's memory planner gives buffers memory by this order. While its pass is off it is not asked."""
  reorder: Callable[[UOp], UOp]
  def where(self) -> str: return "tinygrad.schedule.create_schedule: the order of a schedule's kernels"

Hook = Union[CodegenStep, ScheduleStep, SchedulerOpt, OptHeuristic, MatcherRules, ViewGuard, KernelPrologue, GraphBuilt, TensorCores, ScheduleOrder]

@dataclass(frozen=True)
class Pass:
  """A named compiler pass. `doc` says what it rewrites and why; `hooks` say where it enters tinygrad. `settings` are
  tinygrad ContextVars that tune it (e.g. a policy override for A/B runs): they travel to the compile workers with every
  kernel, and a set one is part of cache_id(), so programs compiled under different settings are never confused."""
  name: str
  doc: str
  hooks: tuple[Hook, ...]
  settings: tuple = ()
  def where(self) -> list[str]: return [h.where() for h in self.hooks]

# name -> Pass, in registration order (pipeline.py orders their hooks at a shared hook point)
PASSES: dict[str, Pass] = {}

# called after every register/unregister (the installed hooks keep BEAM's action list in step)
on_change: list[Callable[[], None]] = []

def register(p:Pass) -> Pass:
  if not p.name.isidentifier(): raise ValueError(f"pass name {p.name!r} must be an identifier")
  if p.name in PASSES: raise ValueError(f"a pass named {p.name!r} is already registered")
  PASSES[p.name] = p
  for f in on_change: f()
  return p

def unregister(name:str) -> Pass:
  p = PASSES.pop(name)
  for f in on_change: f()
  return p

def check_pass_names(names) -> list[str]:
  names = list(names)
  if unknown := [n for n in names if n not in PASSES]:
    raise ValueError(f"unknown tinygrad_ext pass(es): {', '.join(unknown)}; registered: {', '.join(PASSES) or '(none)'}")
  return names
