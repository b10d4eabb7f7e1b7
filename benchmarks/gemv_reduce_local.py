#!/usr/bin/env python3
"""Plain fp16 GEMV (x @ W.T, fp16 weight) at the GLM-4.7-Flash decode shapes: tinygrad's default opts vs hand-picked
REDUCE_LOCAL opts, in one run, timed as benchmarks/kernels.py times (one TinyJit over weight copies of >= --rotate-mb,
read ceiling measured in the same run, numerics against numpy float64).

Each launch writes one shared output, so a CUDA graph runs them in order, as in a decode step. The hand-picked opts: UNROLL 8 (each lane reads 8 contiguous halves), REDUCE_LOCAL 32 (a warp per row, lane innermost),
LOCAL 4 (four rows per block). A benchmark-only OptHeuristic applies them to the GEMV kernels.

  DEV=CUDA python benchmarks/gemv_reduce_local.py [--json out.json]
  DEV=CL python benchmarks/gemv_reduce_local.py --small
"""
from __future__ import annotations
import argparse, json, math, pathlib, sys
import numpy as np
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script: the repo's benchmarks package
import tinygrad_ext
from tinygrad import Tensor, Device, TinyJit, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.uop.ops import AxisType, Ops
from tinygrad_ext.passes.reduce_local import OptOpsExt
from benchmarks.kernels import ROWS, time_calls, read_ceiling, rel_err, device_name, sync, TOL

HAND_PICKED = (Opt(OptOps.UNROLL, 0, 8), Opt(OptOpsExt.REDUCE_LOCAL, 0, 32), Opt(OptOps.LOCAL, 0, 4))

def choose_gemv_opts(k):
  """The hand-picked opts for a (out, in) GEMV kernel, or None for any other kernel."""
  if k.axis_types != [AxisType.GLOBAL, AxisType.REDUCE] or k.reduceop is None or k.reduceop.arg[0] is not Ops.ADD: return None
  for o in HAND_PICKED: k.apply_opt(o)
  return k

FORCED = tinygrad_ext.Pass("bench_gemv_opts", "benchmark only: hand-picked REDUCE_LOCAL opts for fp16 GEMV",
                           (tinygrad_ext.OptHeuristic(choose_gemv_opts),))
SETTINGS = {"default": tinygrad_ext.passes_off, "reduce_local": lambda: tinygrad_ext.only("reduce_local", FORCED.name)}

def bench(out:int, inp:int, args, ceiling_gbs:float) -> dict:
  nbytes = out * inp * 2
  copies = max(2, math.ceil(args.rotate_mb * 1e6 / nbytes))
  rng = np.random.default_rng(0)
  w0 = (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float16)
  x_np = rng.uniform(-1, 1, (1, inp)).astype(np.float16)
  ws = [Tensor(w0, device=Device.DEFAULT).realize() for _ in range(copies)]
  x = Tensor(x_np, device=Device.DEFAULT).realize()
  ref = (x_np.astype(np.float64) @ w0.astype(np.float64).T).reshape(-1)
  res: dict = {"shape": f"{out}x{inp}", "mb": nbytes / 1e6, "copies": copies}
  for name, setting in SETTINGS.items():
    # every launch writes the same buffer, so the graph runs them one after another, as in a decode step (independent
    # kernels of a tinygrad CUDA graph may overlap and would look faster than they are)
    out_buf = Tensor.empty(1, out, dtype=dtypes.float16, device=Device.DEFAULT).realize()
    def run():
      for w in ws: out_buf.assign(x @ w.T).realize()
      return out_buf
    jit = TinyJit(run)
    with setting():
      for _ in range(3): jit()
      sync()
      err = rel_err(out_buf.numpy().astype(np.float64).reshape(-1), ref)
      t = time_calls(jit, args.iters, args.budget)
    us = t["s"] / copies * 1e6
    res[name] = {"us": us, "gbs": nbytes / us / 1e3, "frac": nbytes / us / 1e3 / ceiling_gbs, "rel_err": err, "numerics_ok": err <= TOL}
  res["speedup"] = res["default"]["us"] / res["reduce_local"]["us"]
  return res

def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="shapes / 16, seconds on a CPU device")
  p.add_argument("--json", type=str, default=None)
  p.add_argument("--iters", type=int, default=None)
  args = p.parse_args(argv)
  args.budget, args.rotate_mb = (0.05, 1) if args.small else (0.5, 256)
  args.iters = args.iters or (3 if args.small else 200)
  tinygrad_ext.register(FORCED)
  shapes = [(r.out, r.inp) for r in ROWS if not r.experts]
  if args.small: shapes = [(o // 16, i // 4) for o, i in shapes if o // 16 >= 4]
  ceiling = read_ceiling(16 if args.small else 1024, args.iters, args.budget, ("colsum256",) if args.small else ("colsum256", "colsum64"))
  print(f"device {device_name()}  read ceiling {ceiling['gbs']:.0f} GB/s  hand-picked: {HAND_PICKED}", flush=True)
  rows = [bench(o, i, args, ceiling["gbs"]) for o, i in shapes]
  lines = ["| fp16 GEMV out x in | MB | default us | GB/s | %ceil | REDUCE_LOCAL us | GB/s | %ceil | speedup | rel err default/RL |",
           "|" + "---|" * 10]
  for r in rows:
    d, rl = r["default"], r["reduce_local"]
    lines.append(f"| {r['shape']} | {r['mb']:.2f} | {d['us']:.1f} | {d['gbs']:.0f} | {d['frac']*100:.0f} | {rl['us']:.1f} | {rl['gbs']:.0f} | "
                 f"{rl['frac']*100:.0f} | {r['speedup']:.2f} | {d['rel_err']:.1e}/{rl['rel_err']:.1e} |")
  print("\n".join(lines))
  out = {"device": device_name(), "ceiling": ceiling, "opts": [str(o) for o in HAND_PICKED], "rows": rows}
  if args.json:
    with open(args.json, "w") as f: json.dump(out, f, indent=1)
  return out

if __name__ == "__main__":
  out = main()
  sys.exit(0 if all(r[s]["numerics_ok"] for r in out["rows"] for s in SETTINGS) else 1)
