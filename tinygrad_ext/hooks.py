"""The one place where tinygrad_ext enters tinygrad. Every hook is a module attribute replaced by install() and put back
by uninstall(); while no pass is active each hook calls straight through, so programs are stock tinygrad's.

Hook points (tinygrad 0.14.0):
  tinygrad.codegen.graph_rewrite            CodegenStep passes run after the named step of full_rewrite_to_sink
  tinygrad.codegen.full_rewrite_to_sink     records the renderer of the kernel being compiled, for CodegenStep passes
  tinygrad.codegen.apply_opts                OptHeuristic passes pick a kernel's opts before tinygrad's heuristic
  tinygrad.codegen.opt.postrange.Scheduler.apply_opt   SchedulerOpt passes apply their own opts (refused while off)
  tinygrad.codegen.opt.postrange.Scheduler._apply_tc_opt   TensorCores passes give the TC opt their tensor cores
  tinygrad.codegen.opt.search.actions       BEAM can choose those opts (a list: extended, then shrunk back)
  tinygrad.codegen.<PatternMatcher>          MatcherRules passes append rules to a codegen matcher (e.g. pm_add_loads)
  tinygrad.schedule.rangeify.graph_rewrite  ScheduleStep passes run after the named step of get_kernel_graph
  tinygrad.codegen.to_program_key           the in-memory program cache key gets the active passes' cache_id()
  tinygrad.engine.realize.to_program_key    (realize imported it by name)
  tinygrad.codegen.to_program_context       the switches and pass settings travel with every kernel to the compile workers
  tinygrad.engine.realize.to_program_context
  tinygrad.engine.worker._init_worker       compile workers install these hooks before compiling anything
  tinygrad.codegen.opt.search.diskcache_get/put   BEAM results are stored on disk per cache_id()
  tinygrad.schedule.create_schedule         ScheduleOrder passes reorder the kernels of each schedule it builds
  tinygrad.schedule.schedule_cache          the in-memory schedule cache is keyed per cache_id() and shared_values
  tinygrad.tensor.transform_to_call         records the tensor graph that a realize schedules
  tinygrad.tensor.create_linear_with_vars   schedules it with registry.shared_values set (values another schedule computes)
  tinygrad.tensor._make_buffer_view         ViewGuard passes refuse views of realized buffers (tinygrad then copies)
  tinygrad.renderer.cstyle.CStyleLanguage.render_kernel   KernelPrologue passes put statements first in every kernel
  tinygrad.runtime.graph.cuda.CUDAGraph.__init__          GraphBuilt passes edit a device graph tinygrad built
"""
from __future__ import annotations
import contextvars, hashlib, weakref
import tinygrad.codegen as codegen
import tinygrad.engine.realize as realize
import tinygrad.engine.worker as worker
import tinygrad.codegen.opt.search as search
import tinygrad.schedule as schedule
import tinygrad.schedule.rangeify as rangeify
import tinygrad.tensor as tensor
from tinygrad.codegen.opt import KernelOptError
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.uop.ops import Ops, UOp
from tinygrad.dtype import dtypes
from tinygrad.helpers import NOOPT
from tinygrad.renderer import Renderer
from tinygrad.renderer.cstyle import CStyleLanguage
from tinygrad_ext.registry import shared_values, PASSES, CodegenStep, ScheduleStep, SchedulerOpt, OptHeuristic, MatcherRules, ViewGuard, on_change
from tinygrad_ext.registry import KernelPrologue, GraphBuilt, TensorCores, ScheduleOrder
from tinygrad_ext.config import SWITCHES, is_active, cache_id
from tinygrad_ext import pipeline
from tinygrad_ext.internals import live_tensor_uops
from tinygrad_ext.passes.shared import out_of_range_consts

# captured at import, before install() replaces them: a spawned compile worker imports this module fresh, and
# tinygrad's compiled PatternMatchers keep the graph_rewrite they first saw (so the replacement outlives uninstall())
_tinygrad_init_worker = worker._init_worker
_tinygrad_schedule_graph_rewrite = rangeify.graph_rewrite
_tinygrad_create_schedule = schedule.create_schedule
_originals: dict[tuple[object, str], object] = {}

def _replace(module:object, attr:str, new:object) -> None:
  if not hasattr(module, attr):
    name = f"{module.__module__}.{module.__qualname__}" if isinstance(module, type) else module.__name__
    raise pipeline.PipelineError(f"tinygrad {pipeline.installed_tinygrad_version()} has no {name}.{attr}, a hook point of tinygrad_ext")
  _originals[(module, attr)] = getattr(module, attr)
  setattr(module, attr, new)

def installed() -> bool: return bool(_originals)

def hook_points() -> list[str]:
  return [f"{m.__module__}.{m.__qualname__}.{a}" if isinstance(m, type) else f"{m.__name__}.{a}" for m, a in _originals] + \
         (["tinygrad.codegen.opt.search.actions"] if _beam_actions else [])

_in_order: dict[tuple, list] = {}
def registered_hooks(kind:type, active_only:bool=False) -> list:
  """Every registered pass's hooks of this kind, in pipeline order (pipeline.py; only those of active passes, if asked)."""
  # ordered once per set of registered passes: codegen asks at every one of its rewrite steps
  if (key:=tuple(map(id, PASSES.values()))) not in _in_order:
    _in_order.clear()
    _in_order[key] = pipeline.ordered([(p, h) for p in PASSES.values() for h in p.hooks])
  return [h for p, h in _in_order[key] if isinstance(h, kind) and (not active_only or is_active(p.name))]

# *** codegen steps ***

_current_renderer: contextvars.ContextVar[Renderer|None] = contextvars.ContextVar("tinygrad_ext_renderer", default=None)

def active_codegen_steps(step:str) -> list[CodegenStep]: return [h for h in registered_hooks(CodegenStep, True) if h.step == step]

def _graph_rewrite_with_steps(sink:UOp, pm, *args, name:str|None=None, **kwargs) -> UOp:
  ret = _originals[(codegen, "graph_rewrite")](sink, pm, *args, name=name, **kwargs)
  if name is None or (ren:=_current_renderer.get()) is None: return ret
  for step in active_codegen_steps(name): ret = step.rewrite(ret, ren)
  return ret

def _full_rewrite_to_sink(ast:UOp, ren:Renderer, optimize:bool=True) -> UOp:
  token = _current_renderer.set(ren)
  try: return _originals[(codegen, "full_rewrite_to_sink")](ast, ren, optimize)
  finally: _current_renderer.reset(token)

# *** schedule steps ***

def _schedule_graph_rewrite_with_steps(sink:UOp, pm, *args, name:str|None=None, **kwargs) -> UOp:
  ret = _tinygrad_schedule_graph_rewrite(sink, pm, *args, name=name, **kwargs)
  if name is None or not installed(): return ret
  for step in [h for h in registered_hooks(ScheduleStep, True) if h.step == name]: ret = step.rewrite(ret)
  return ret

# *** values that more than one schedule computes ***

# what a partial realize computed that live tensors still compute from: a later schedule computing one of them again
# must give it the same bits (weak: a value no tensor can reach again is forgotten)
_computed_twice: weakref.WeakSet[UOp] = weakref.WeakSet()
_realizing: list[UOp] = []

def order_dependent(u:UOp) -> bool:
  """A float sum or product: its bits depend on the order a kernel adds in, which a ScheduleStep may change (a max, or
  elementwise work such as a weight's dequant, which every schedule recomputes, comes out the same in any kernel)."""
  return u.op is Ops.REDUCE and u.arg[0] is not Ops.MAX and dtypes.is_float(u.dtype)

def shares_values(realized:UOp) -> bool:
  """The realize of this tensor graph computes a value that another schedule computes too: one that an earlier partial
  realize computed, or one that a live tensor, left unrealized (its graph already rewritten to the realized buffers),
  will compute again. Every such value is remembered."""
  if not (values := {u for u in realized.toposort() if order_dependent(u)}): return False  # (loading weights: no sums)
  seen: set[UOp] = set()
  for root in live_tensor_uops(): seen |= set(root.toposort(gate=lambda u: u not in seen))
  again = values & seen
  earlier = any(u in _computed_twice for u in values)
  _computed_twice.update(again)
  return bool(again) or earlier

def _transform_to_call(big_sink:UOp):
  _realizing[:] = [big_sink]
  return _originals[(tensor, "transform_to_call")](big_sink)

def _create_linear_with_vars(big_sink:UOp):
  # transform_to_call ran first and the realized tensors now point at their buffers (Tensor.linear_with_vars)
  realized = _realizing.pop() if _realizing else None
  shared = realized is not None and bool(registered_hooks(ScheduleStep, True)) and shares_values(realized)
  token = shared_values.set(shared)
  try: return _originals[(tensor, "create_linear_with_vars")](big_sink)
  finally: shared_values.reset(token)

def _create_schedule(sched_sink:UOp) -> UOp:
  linear = _tinygrad_create_schedule(sched_sink)
  if not installed(): return linear
  for h in registered_hooks(ScheduleOrder, True): linear = h.reorder(linear)
  return linear

# *** buffer views ***

def _make_buffer_view(src:UOp) -> UOp|None:
  # tinygrad's contiguous_mops_to_view looks this up by name at every call: None leaves the slice to be copied
  if not all(h.allow(src) for h in registered_hooks(ViewGuard, True)): return None
  return _originals[(tensor, "_make_buffer_view")](src)

# *** rendering and device graphs ***

def _render_kernel(self:CStyleLanguage, function_name, kernel, bufs, uops, prefix=None) -> str:
  first = [line for h in registered_hooks(KernelPrologue, True) for line in h.lines(self)]
  return _originals[(CStyleLanguage, "render_kernel")](self, function_name, first + kernel if first else kernel, bufs, uops, prefix)

def _cuda_graph_init(self, *args, **kwargs):
  _originals[(pipeline.graph_class("CUDA"), "__init__")](self, *args, **kwargs)
  for h in registered_hooks(GraphBuilt, True):
    if h.device == "CUDA": h.apply(self)

# *** scheduler opts ***

def scheduler_opt(op) -> tuple[str, SchedulerOpt]|None:
  return next(((p.name, h) for p in PASSES.values() for h in p.hooks if isinstance(h, SchedulerOpt) and h.op is op), None)

def _apply_opt(self:Scheduler, opt, append_opt:bool=True):
  if (found:=scheduler_opt(opt.op)) is None:
    for h in registered_hooks(SchedulerOpt, True):
      if h.guard is not None: h.guard(self, opt)
    return _originals[(Scheduler, "apply_opt")](self, opt, append_opt)
  name, ext = found
  if not is_active(name): raise KernelOptError(f"{opt.op} needs the {name} pass, which is off")
  ret = ext.apply(self, opt)
  if append_opt: self.applied_opts.append(opt)
  return ret

class _WithTensorCores:
  """A renderer as the TC opt sees it, its tensor cores replaced (a view: the renderer itself is shared by every kernel)."""
  def __init__(self, ren:Renderer, tensor_cores:list): self._ren, self.tensor_cores = ren, tensor_cores
  def __getattr__(self, name): return getattr(self._ren, name)

def _apply_tc_opt(self:Scheduler, *args, **kwargs):
  tensor_cores = self.ren.tensor_cores
  for h in registered_hooks(TensorCores, True): tensor_cores = h.choose(self.ren, tensor_cores)
  if tensor_cores == self.ren.tensor_cores: return _originals[(Scheduler, "_apply_tc_opt")](self, *args, **kwargs)
  ren, self.ren = self.ren, _WithTensorCores(self.ren, tensor_cores)
  try: return _originals[(Scheduler, "_apply_tc_opt")](self, *args, **kwargs)
  finally: self.ren = ren

def _heuristic_may_choose(ast:UOp, beam:int) -> bool:
  # exactly where tinygrad's own apply_opts would run hand_coded_optimizations, but for a kernel whose result depends on
  # how its opts make it fold a constant its dtype cannot hold (shared.out_of_range_consts): tinygrad's own opts then
  return ast.tag is None and beam < 1 and not NOOPT and (ast.arg is None or (ast.arg.opts_to_apply is None and ast.arg.applied_opts == ())) \
    and not any(u.op is Ops.STAGE for u in ast.backward_slice) and not out_of_range_consts(ast)

def _apply_opts(ast:UOp, ren:Renderer, beam:int=0) -> UOp:
  if _heuristic_may_choose(ast, beam):
    for h in registered_hooks(OptHeuristic, True):
      k = Scheduler(ast, ren)
      k.convert_loop_to_global()
      try: chosen = h.choose(k)
      except KernelOptError: chosen = None
      if chosen is not None: return chosen.get_optimized_ast(name_override=ast.arg.name if ast.arg is not None and ast.arg.name != "test" else None)
  return _originals[(codegen, "apply_opts")](ast, ren, beam)

_beam_actions: list = []
def _sync_registered() -> None:
  """Follows the registry: BEAM's action list holds the opts of every registered SchedulerOpt (an opt of a pass that
  is off is refused), each extended codegen matcher is tinygrad's plus every registered MatcherRules for it, and the
  compile workers receive the switches and every registered pass's settings."""
  for m in (codegen, realize):
    m.to_program_context = (*_originals[(m, "to_program_context")], *SWITCHES, *(v for p in PASSES.values() for v in p.settings))
  for a in _beam_actions: search.actions.remove(a)
  _beam_actions[:] = [a for h in registered_hooks(SchedulerOpt) for a in h.beam_actions]
  search.actions.extend(_beam_actions)
  rules = registered_hooks(MatcherRules)
  for attr in {h.attr for h in rules} | {a for m, a in _originals if m is codegen and a.startswith("pm_")}:
    if (codegen, attr) not in _originals: _originals[(codegen, attr)] = getattr(codegen, attr)
    setattr(codegen, attr, sum((h.matcher for h in rules if h.attr == attr), _originals[(codegen, attr)]))

# *** cache isolation ***

def _to_program_key(ast:UOp, renderer:Renderer) -> tuple: return (*_originals[(codegen, "to_program_key")](ast, renderer), cache_id())

def _disk_table(table:str) -> str:
  # passes off shares stock tinygrad's table; each set of active passes gets its own
  return f"{table}_ext_{hashlib.sha256(cid.encode()).hexdigest()[:12]}" if table == "beam_search" and (cid:=cache_id()) else table
def _diskcache_get(table:str, key): return _originals[(search, "diskcache_get")](_disk_table(table), key)
def _diskcache_put(table:str, key, val, prepickled=False):
  return _originals[(search, "diskcache_put")](_disk_table(table), key, val, prepickled)

class PassKeyedCache(dict):
  """A dict that files every key under the cache_id() and registry.shared_values current at the time of the lookup."""
  @staticmethod
  def filed(key): return (cache_id(), shared_values.get(), key)
  def get(self, key, default=None): return super().get(self.filed(key), default)
  def __getitem__(self, key): return super().__getitem__(self.filed(key))
  def __setitem__(self, key, val): super().__setitem__(self.filed(key), val)
  def __contains__(self, key): return super().__contains__(self.filed(key))

def _init_worker_with_ext() -> None:
  install()
  _tinygrad_init_worker()

# *** install / uninstall ***

def install() -> None:
  """Idempotent. The hooks do nothing while no pass is active. Refuses (PipelineError) a tinygrad that lacks a step or
  attribute the pipeline hooks, replacing nothing."""
  if installed(): return
  pipeline.check()
  try: _install()
  except pipeline.PipelineError:
    uninstall()
    raise

def _install() -> None:
  _replace(codegen, "graph_rewrite", _graph_rewrite_with_steps)
  _replace(codegen, "full_rewrite_to_sink", _full_rewrite_to_sink)
  _replace(rangeify, "graph_rewrite", _schedule_graph_rewrite_with_steps)
  _replace(codegen, "to_program_key", _to_program_key)
  _replace(realize, "to_program_key", _to_program_key)
  _replace(codegen, "to_program_context", codegen.to_program_context)
  _replace(realize, "to_program_context", realize.to_program_context)
  _replace(worker, "_init_worker", _init_worker_with_ext)
  _replace(search, "diskcache_get", _diskcache_get)
  _replace(search, "diskcache_put", _diskcache_put)
  _replace(schedule, "schedule_cache", PassKeyedCache())
  _replace(schedule, "create_schedule", _create_schedule)
  _replace(Scheduler, "apply_opt", _apply_opt)
  _replace(Scheduler, "_apply_tc_opt", _apply_tc_opt)
  _replace(codegen, "apply_opts", _apply_opts)
  _replace(tensor, "_make_buffer_view", _make_buffer_view)
  _replace(tensor, "transform_to_call", _transform_to_call)
  _replace(tensor, "create_linear_with_vars", _create_linear_with_vars)
  _replace(CStyleLanguage, "render_kernel", _render_kernel)
  if (cuda_graph := pipeline.graph_class("CUDA")) is not None: _replace(cuda_graph, "__init__", _cuda_graph_init)
  _sync_registered()
  on_change.append(_sync_registered)

def uninstall() -> None:
  """Puts every replaced attribute back (programs already cached stay cached under their own keys)."""
  for (module, attr), orig in reversed(list(_originals.items())): setattr(module, attr, orig)
  _originals.clear()
  for a in _beam_actions: search.actions.remove(a)
  _beam_actions.clear()
  if _sync_registered in on_change: on_change.remove(_sync_registered)
