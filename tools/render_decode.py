#!/usr/bin/env python3
"""Renders every kernel of one decode step of the tiny synthetic GLM for CUDA (sm_90) with passes on, without a GPU, and
prints one line per kernel (its name and a digest of its source) and a digest of them all. Two trees whose outputs are
identical compile the GLM decode into the same CUDA programs, so their decode speed is the same:

  python tools/render_decode.py --out /tmp/a.txt            # in one tree
  python tools/render_decode.py --out /tmp/b.txt; diff /tmp/a.txt /tmp/b.txt
  python tools/render_decode.py --sources DIR               # also each kernel's source, DIR/kNN.cu"""
from __future__ import annotations
import argparse, hashlib, pathlib, re, sys, tempfile
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", type=pathlib.Path, help="write the listing here too")
  ap.add_argument("--sources", type=pathlib.Path, help="write each kernel's CUDA source into this folder")
  ap.add_argument("--dtype", default="mixed", help="the model's numerics policy (examples/glm/model.py: NUMERICS)")
  args = ap.parse_args(argv)
  import tinygrad_ext  # noqa: F401
  from examples.glm import model as glm, synth
  if args.dtype not in glm.NUMERICS: ap.error(f"--dtype must be one of {', '.join(glm.NUMERICS)}")
  from kernels import kernel_asts, render, cuda_renderer
  with tempfile.TemporaryDirectory() as tmp:
    model = glm.load(synth.write(pathlib.Path(tmp) / "tiny.gguf", "tiny", "Q4_0", seed=0), max_context=32, numerics=args.dtype)[0]
    asts = kernel_asts(lambda: model.forward([5], model.start_pos.bind(3)))
  ren = cuda_renderer()
  lines, total = [], hashlib.sha256()
  for i, ast in enumerate(asts):
    src = render(ast, ren)
    total.update(src.encode())
    name = m[1] if (m:=re.search(r"void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\(", src)) else "?"
    lines.append(f"k{i:02d} {name} {hashlib.sha256(src.encode()).hexdigest()[:16]}")
    if args.sources:
      args.sources.mkdir(parents=True, exist_ok=True)
      (args.sources / f"k{i:02d}.cu").write_text(src)
  lines.append(f"{len(asts)} kernels, sha256 {total.hexdigest()[:16]}")
  print("\n".join(lines))
  if args.out: args.out.write_text("\n".join(lines) + "\n")
  return 0

if __name__ == "__main__": sys.exit(main())
