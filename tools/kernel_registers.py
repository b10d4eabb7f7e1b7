#!/usr/bin/env python3
"""Registers, shared memory per thread block (ptxas -v, sm_90) and machine instructions (the kernel's SASS size in the
cubin) of each benchmarks/kernels.py row's matvec, rendered for CUDA here, without a GPU, under matvec policy overrides
or pass settings: the occupancy and instruction side of a change, before device time.

  python tools/kernel_registers.py [ROWS|all] [POLICY ...]   e.g.  all "" reduce_warps=1
  python tools/kernel_registers.py [ROWS|all] [SETTING=VALUE ...]   e.g.  all "" TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT=1
"""
import re, struct, subprocess, sys, tempfile, pathlib
sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1]), str(pathlib.Path(__file__).resolve().parents[1] / "tests")]
import tinygrad_ext  # noqa: F401  (registers the passes)
from tinygrad.helpers import Context
from tinygrad.uop.ops import Ops
from benchmarks.kernels import ROWS, build
from kernels import kernel_asts, render, cuda_renderer

def text_bytes(cubin:bytes) -> int:
  """Size of the cubin's code sections (an ELF64): sm_90 instructions are 16 bytes each."""
  shoff, shentsize, shnum, shstrndx = struct.unpack_from("<Q", cubin, 0x28)[0], *struct.unpack_from("<HHH", cubin, 0x3A)
  sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]  # name, type, flags, addr, offset, size
  names = sections[shstrndx]
  def name(sh) -> bytes: return cubin[names[4] + sh[0]:].split(b"\0", 1)[0]
  return sum(sh[5] for sh in sections if name(sh).startswith(b".text."))

def ptxas_usage(src:str, arch:str="sm_90") -> tuple[int, int, int]:
  """(registers a thread, bytes of shared memory, instructions) of one kernel's source, as ptxas compiles it."""
  with tempfile.TemporaryDirectory() as d:
    (pathlib.Path(d) / "k.cu").write_text(src)
    err = subprocess.run(["nvcc", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", f"{d}/k.cubin", f"{d}/k.cu"],
                         capture_output=True, text=True, check=True).stderr
    instructions = text_bytes((pathlib.Path(d) / "k.cubin").read_bytes()) // 16
  return int(re.search(r"Used (\d+) registers", err).group(1)), int(m.group(1)) if (m:=re.search(r"(\d+) bytes smem", err)) else 0, instructions

def setting_context(spec:str):
  """A pass setting (KEY=VALUE, KEY one of tinygrad_ext.settings()) or else a matvec policy override."""
  key, _, val = spec.partition("=")
  return tinygrad_ext.with_setting(key, val) if key in tinygrad_ext.settings() else Context(TINYGRAD_EXT_MATVEC_POLICY=spec)

def main(argv:list[str]) -> None:
  names, policies = (argv[0] if argv else "all"), (argv[1:] or [""])
  ren = cuda_renderer()
  for r in ROWS:
    if names != "all" and r.name not in names.split(","): continue
    case, cells = build(r), []
    for pol in policies:
      with setting_context(pol):
        ast = [a for a in kernel_asts(lambda: case.matvec(case.x, 0)) if any(u.op is Ops.REDUCE for u in a.toposort())][-1]
        src = render(ast, ren)
      name = re.search(r"void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src).group(1)
      regs, smem, instructions = ptxas_usage(src)
      cells.append(f"{pol or 'defaults'}: {name}, {regs} registers, {smem} B shared, {instructions} instructions")
    print(f"{r.name:14s} " + " | ".join(cells), flush=True)

if __name__ == "__main__": main(sys.argv[1:])
