"""What a captured TinyJit launches: the kernel count of one call and a per-kernel timing of one call.

Both read the JIT's own captured program list (tinygrad_ext.internals.captured_calls), expanding the batches the JIT
turns into device graphs (CUDA graphs), so a count is of GPU kernels, not of graph launches. The timing replays the
captured kernels one at a time through tinygrad's executor (internals.execute). Where the device has graphs, a kernel's
time is one device graph of `graph_launches` launches of it, timed as a whole and divided: that is its time inside the
decode graph, launch gap included, without the submit latency a single waited launch adds (several us, more than a
small kernel runs). Without graphs each launch is waited on, as DEBUG=2 times kernels. Median of a few replays; bytes
are the kernel's Estimates.mem, as DEBUG=2's GB/s.
"""
from __future__ import annotations
import statistics
from dataclasses import dataclass
from tinygrad import Tensor
from tinygrad.device import Buffer, Device
from tinygrad.engine.realize import estimate_uop
from tinygrad_ext.internals import captured_calls, replay_context, execute, graph_of, call_buffers, graph_runners
from tinygrad.helpers import ansistrip
from tinygrad.uop.ops import Ops, UOp, sym_infer

KINDS = ("matmul", "attention", "norm", "softmax", "activation", "rope", "routing", "other")

def jit_calls(jit) -> list[UOp]:
  """The CALLs one replay of the captured jit runs, in order, with graph batches expanded."""
  out = []
  for call in captured_calls(jit):
    ast = call.src[0]
    out.extend(ast.src[0].src if ast.op is Ops.CUSTOM_FUNCTION and ast.arg == "graph" else [call])
  return out

def kernel_calls(jit) -> list[UOp]: return [c for c in jit_calls(jit) if c.src[0].op is Ops.PROGRAM]

@dataclass
class KernelTime:
  name: str
  kind: str
  seconds: float
  nbytes: int
  ops: int = 0  # tinygrad's estimate of the kernel's arithmetic (a fused dequant's work counted per product)

def time_kernels(jit, args:tuple, classify=None, repeats:int=3, graph_launches:int=20) -> list[KernelTime]:
  """Replays the captured kernels of jit; a kernel's time is its median over `repeats` replays after one untimed replay
  (clocks, first launches). Where the device has graphs, one replay of a kernel is a graph of `graph_launches` launches
  of it (they write one buffer, so they run one after another, as in decode), timed whole and divided; else one waited
  launch. args are what the jit is called with (they set the inputs and the symbolic variables). classify(call, bufs)
  -> kind. A replay writes the KV cache row of the position it is given, as the jit itself would."""
  ctx, calls = replay_context(args), kernel_calls(jit)
  graphed = has_graph() and graph_launches > 1
  def timed(call:UOp) -> float:
    run = graph_of([call] * graph_launches) if graphed else call
    times = [sum(e or 0.0 for e in execute(run, ctx)) for _ in range(repeats + 1)][1:]
    return statistics.median(times) / (graph_launches if graphed else 1)
  out = []
  for call in calls:
    bufs = call_buffers(call, ctx)
    est = estimate_uop(call)
    out.append(KernelTime(ansistrip(call.src[0].arg.name), classify(call, bufs) if classify else "other", timed(call),
                          int(sym_infer(est.mem, ctx.var_vals)), int(sym_infer(est.ops, ctx.var_vals))))
  return out

def step_device_seconds(jit, args:tuple, repeats:int=3) -> float:
  """The device's own time for one replay of the captured jit: each of its graph batches (or, without graphs, each
  kernel) launched and waited on, timed by the device, summed; median of `repeats` after one untimed replay. The host's
  work per call (the jit's argument handling, the graph's parameter updates, the token's readback) is not in it, so
  ms/token minus this is what the host adds to a token."""
  ctx, calls = replay_context(args), captured_calls(jit)
  return statistics.median([sum(e or 0.0 for c in calls for e in execute(c, ctx)) for _ in range(repeats + 1)][1:])

def programmatic_edges(jit) -> int|None:
  """How many edges of the jit's device graphs let a kernel launch while its predecessor drains (the pdl pass), or None
  where it runs no graph."""
  return sum(getattr(g, "programmatic_edges", 0) for g in runners) if (runners := graph_runners(jit)) else None

def has_graph() -> bool: return Device[Device.DEFAULT].graph is not None

def timing_method() -> str:
  """How time_kernels times on the default device, for reports."""
  return "in a device graph" if has_graph() else "one waited launch each"

def kernel_ops(call:UOp) -> set[Ops]:
  """The ops of the kernel's lowered AST, e.g. SQRT (an rsqrt: a norm) or EXP2 (an exp: a softmax)."""
  return {u.op for u in call.src[0].src[0].toposort()}

def buffers_of(tensors:dict[str, Tensor]) -> dict[Buffer, str]:
  """The device buffers behind realized tensors (weights as their GGUF bytes, the KV caches, tables), for classify."""
  out = {}
  for name, t in tensors.items():
    for u in t.uop.toposort():
      if u.op is Ops.BUFFER and u.is_realized: out[u.buffer] = name
  return out

def summarize(times:list[KernelTime]) -> dict:
  """Per-kernel-name rows (us, GB/s, calls, share), kernels by kind, totals."""
  total = sum(t.seconds for t in times) or 1e-12
  rows: dict[str, dict] = {}
  for t in times:
    r = rows.setdefault(t.name, {"name": t.name, "kind": t.kind, "us": 0.0, "bytes": 0, "ops": 0, "calls": 0})
    r["us"] += t.seconds * 1e6; r["bytes"] += t.nbytes; r["ops"] += t.ops; r["calls"] += 1
  for r in rows.values():
    r["gb_s"], r["tflop_s"], r["share"] = r["bytes"] / max(r["us"], 1e-9) / 1e3, r["ops"] / max(r["us"], 1e-9) / 1e6, r["us"] / (total * 1e6)
  by_kind = {k: sum(1 for t in times if t.kind == k) for k in KINDS}
  us_by_kind = {k: sum(t.seconds for t in times if t.kind == k) * 1e6 for k in KINDS}
  return {"kernels": sorted(rows.values(), key=lambda r: -r["us"]), "kernels_by_kind": by_kind, "us_by_kind": us_by_kind,
          "total_us": total * 1e6, "n_kernels": len(times), "timing": timing_method(),
          "launches": [{"name": t.name, "kind": t.kind, "us": t.seconds * 1e6, "bytes": t.nbytes} for t in times]}

def format_table(s:dict, top:int=40, what:str="decode token") -> str:
  lines = [f"{'kernel':<44} {'kind':<9} {'us':>10} {'GB/s':>8} {'TFLOP/s':>8} {'calls':>6} {'share':>6}"]
  for r in s["kernels"][:top]:
    lines.append(f"{r['name'][:44]:<44} {r['kind']:<9} {r['us']:10.1f} {r['gb_s']:8.1f} {r.get('tflop_s', 0):8.2f} {r['calls']:6d} {r['share']*100:5.1f}%")
  if len(s["kernels"]) > top: lines.append(f"... {len(s['kernels']) - top} more kernel names")
  lines.append(f"{'total':<54} {s['total_us']:10.1f} {'':>17} {s['n_kernels']:6d} 100.0%  (timed {s['timing']})")
  kinds = [f"{k} {n} ({s['us_by_kind'][k]:.0f} us)" for k, n in s["kernels_by_kind"].items() if n]
  lines.append(f"kernels per {what} by kind: " + ", ".join(kinds))
  return "\n".join(lines)
