"""The tinygrad internals that the passes and the example use apart from the hook points (hooks.py): private names,
numbering conventions and the JIT's captured program. Each is written against tinygrad 0.14.0; if tinygrad changes one,
this module (with hooks.py) is what to fix."""
from __future__ import annotations
from tinygrad.uop.ops import UOp

# *** the Scheduler and UOps ***

def output_ranges(k) -> list[UOp]:
  """A Scheduler's ranges that index its outputs (Scheduler._output_rngs)."""
  return k._output_rngs()

def shape_or_none(u:UOp):
  """u's shape, or None where it has none (UOp._shape: UOp.shape raises there)."""
  return u._shape

def live_tensor_uops() -> list[UOp]:
  """The graph of every Tensor alive in the process (tinygrad.tensor.all_tensors, weak references)."""
  from tinygrad.tensor import all_tensors
  return [t.uop for ref in list(all_tensors) if (t:=ref()) is not None]

# Range ids tinygrad never hands out: it numbers ranges from 0, and its tensor-core opt's warp range is -1. REDUCE_LOCAL's
# lane and warp ranges take these, so they sort before every other local dim (the lanes become the fastest thread index).
LANE_RANGE_ID, WARP_RANGE_ID = -3, -2

# *** the JIT's captured program ***

def captured_calls(jit) -> tuple[UOp, ...]:
  """The CALLs (kernels, or device graph batches) that one replay of a captured TinyJit runs (CapturedJit.linear)."""
  assert jit.captured is not None, "the jit has not captured yet (call it twice)"
  return jit.captured.linear.src

def graph_runners(jit) -> list:
  """The device graph runners (tinygrad.runtime.graph.*) a captured TinyJit's replays launch (realize.graph_cache)."""
  from tinygrad.engine.realize import graph_cache
  from tinygrad.uop.ops import Ops
  return [g for c in captured_calls(jit) if c.src[0].op is Ops.CUSTOM_FUNCTION and (g:=graph_cache.get(c.src[0])) is not None]

def replay_context(args:tuple):
  """An executor context that replays a captured jit on these call arguments (its inputs and symbolic variables), each
  launch waited on and timed, nothing counted in tinygrad's global stats."""
  from tinygrad.engine.jit import _prepare_jit_inputs
  from tinygrad.engine.realize import ExecContext
  input_uops, var_vals, _, _ = _prepare_jit_inputs(args, {})
  return ExecContext(var_vals, tuple(input_uops), update_stats=False, wait=True)

def execute(call:UOp, ctx) -> list[float|None]:
  """Runs one CALL through tinygrad's executor (realize.pm_exec): the device seconds of each launch where timed."""
  from tinygrad.engine.realize import pm_exec
  return pm_exec.rewrite(call, ctx) or []

def graph_of(calls:list[UOp]) -> UOp:
  """One device graph (a CUDA graph) that launches these CALLs in order (jit.create_graph_call)."""
  from tinygrad.engine.jit import create_graph_call
  return create_graph_call(calls)

def call_buffers(call:UOp, ctx) -> list:
  """The device Buffers a CALL reads and writes in this replay context (realize.resolve_params)."""
  from tinygrad.engine.realize import resolve_params
  return [b.buffer for b in resolve_params(call, ctx.input_uops)]
