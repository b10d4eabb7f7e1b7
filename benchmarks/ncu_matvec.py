#!/usr/bin/env python3
"""Runs the passes-on kernel of some targets.md rows a few times, for a profiler to attach to (no timing here):

  ncu --clock-control none -k regex:^r_ --section SpeedOfLight python3 benchmarks/ncu_matvec.py ffn_up moe_gate_up

Each row is built as benchmarks/kernels.py builds it (one weight copy) and realized `--runs` times; the first run also
compiles, so a profiler that skips nothing sees each kernel at least twice.
"""
import argparse, pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo root: benchmarks is a package
from tinygrad import Device  # noqa: E402
from benchmarks.kernels import ROWS, build  # noqa: E402

def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("rows", nargs="+", choices=[r.name for r in ROWS])
  p.add_argument("--runs", type=int, default=3)
  a = p.parse_args()
  for r in [r for r in ROWS if r.name in a.rows]:
    case = build(r)
    for _ in range(a.runs): case.matvec(case.x, 0).realize()
    Device[Device.DEFAULT].synchronize()
    print(f"{r.name}: ran {a.runs} times")

if __name__ == "__main__": main()
