#!/usr/bin/env python3
"""Registers and shared memory per thread block (ptxas -v, sm_90) of each benchmarks/kernels.py row's matvec, rendered for
CUDA here, without a GPU, under matvec policy overrides: the occupancy side of a policy change, before device time.

  python tools/kernel_registers.py [ROWS|all] [POLICY ...]   e.g.  all "" reduce_warps=1
"""
import re, subprocess, sys, tempfile, pathlib
sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1]), str(pathlib.Path(__file__).resolve().parents[1] / "tests")]
import tinygrad_ext  # noqa: F401  (registers the passes)
from tinygrad.helpers import Context
from tinygrad.uop.ops import Ops
from benchmarks.kernels import ROWS, build
from kernels import kernel_asts, render, cuda_renderer

def ptxas_usage(src:str, arch:str="sm_90") -> tuple[int, int]:
  """(registers a thread, bytes of shared memory) of one kernel's source, as ptxas reports them."""
  with tempfile.TemporaryDirectory() as d:
    (pathlib.Path(d) / "k.cu").write_text(src)
    err = subprocess.run(["nvcc", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", f"{d}/k.cubin", f"{d}/k.cu"],
                         capture_output=True, text=True, check=True).stderr
  return int(re.search(r"Used (\d+) registers", err).group(1)), int(m.group(1)) if (m:=re.search(r"(\d+) bytes smem", err)) else 0

def main(argv:list[str]) -> None:
  names, policies = (argv[0] if argv else "all"), (argv[1:] or [""])
  ren = cuda_renderer()
  for r in ROWS:
    if names != "all" and r.name not in names.split(","): continue
    case, cells = build(r), []
    for pol in policies:
      with Context(TINYGRAD_EXT_MATVEC_POLICY=pol):
        ast = [a for a in kernel_asts(lambda: case.matvec(case.x, 0)) if any(u.op is Ops.REDUCE for u in a.toposort())][-1]
        src = render(ast, ren)
      name = re.search(r"void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src).group(1)
      regs, smem = ptxas_usage(src)
      cells.append(f"{pol or 'policy in force'}: {name}, {regs} registers, {smem} B shared")
    print(f"{r.name:14s} " + " | ".join(cells), flush=True)

if __name__ == "__main__": main(sys.argv[1:])
