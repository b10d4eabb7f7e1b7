#!/usr/bin/env python3
"""What-if probes for one Q4_0 decode matvec: hand-edited CUDA variants of the kernel the passes render, timed as
benchmarks/kernels.py times its rows (rotated copies, one CUDA graph of dependent launches, cupy), beside the rendered
kernel itself. Not a way to run the model: each variant asks one question of the hardware before a pass is written
to produce it (does a prefetch of the next step help, does the ALU work matter, what does the access pattern cost).

  DEV=CUDA python benchmarks/probe_matvec.py [--out 10240 --inp 2048] [--json probes.json]

Each variant computes the same matvec as the rendered kernel (checked against float64) but for `alu_light`, which drops
a subtraction per element to price the ALU work, and `loads_only`, which reads the same bytes and computes nothing.
"""
from __future__ import annotations
import argparse, json, math, pathlib, re, sys
import numpy as np
sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1]), str(pathlib.Path(__file__).resolve().parents[1] / "tests")]
from benchmarks.kernels import Row, random_q4_0, ref_matvec, rotation, cupy_graph_us, QBYTES, QK

# The rendered kernel's structure, written out: a warp per ROWS rows (ROWS=2: the policy's row upcast), a quant block per
# 2 lanes (each 8 nibble bytes as 4 ushorts, and the block's fp16 scale), 16 blocks a step, STEPS steps; 4 warps a block.
PROBE_SRC = r"""
#include <cuda_fp16.h>
struct half8v { uint4 u; };
__device__ __forceinline__ float field(unsigned w, unsigned mask, unsigned magic) {
  unsigned d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "r"(mask), "r"(magic)); return __uint_as_float(d);
}
// the 4 nibble fields of a ushort word, as floats q (exact: the field sits in the mantissa of 2^(23-s)), minus 8
#ifdef ALU_LIGHT
#define F(w, s, m, e, c) field(w, m, e)
#else
#define F(w, s, m, e, c) (field(w, m, e) - c)
#endif
template <int ROWS> struct Step {
  unsigned short w[ROWS][4], d[ROWS];
  half8v xa, xb;
  __device__ __forceinline__ void load(const unsigned char* wt, const half* x, int row_byte, int j, int h) {
    #pragma unroll
    for (int r = 0; r < ROWS; r++) {
      const unsigned char* b = wt + row_byte + r * ROW_BYTES + j * 18;
      #pragma unroll
      for (int k = 0; k < 4; k++) w[r][k] = *(const unsigned short*)(b + 2 + 8 * h + 2 * k);
      d[r] = *(const unsigned short*)b;
    }
    xa.u = *(const uint4*)(x + 32 * j + 8 * h);
    xb.u = *(const uint4*)(x + 32 * j + 16 + 8 * h);
  }
  __device__ __forceinline__ void accumulate(float* acc) {
    float2 a[4], b[4];
    #pragma unroll
    for (int k = 0; k < 4; k++) { a[k] = __half22float2(((const half2*)&xa.u)[k]); b[k] = __half22float2(((const half2*)&xb.u)[k]); }
    #pragma unroll
    for (int r = 0; r < ROWS; r++) {
      // one product, then a chain of fused multiply-adds, as the rendered kernel sums its block
      float s = F((unsigned)w[r][0], 0, 15u, 1258291200u, 8388616.0f) * a[0].x;
      #pragma unroll
      for (int k = 0; k < 4; k++) {
        unsigned v = w[r][k];
        if (k) s = fmaf(F(v, 0, 15u, 1258291200u, 8388616.0f), a[k].x, s);
        s = fmaf(F(v, 8, 3840u, 1191182336u, 32776.0f), a[k].y, s);
      }
      #pragma unroll
      for (int k = 0; k < 4; k++) {
        unsigned v = w[r][k];
        s = fmaf(F(v, 4, 240u, 1224736768u, 524296.0f), b[k].x, s);
        s = fmaf(F(v, 12, 61440u, 1157627904u, 2056.0f), b[k].y, s);
      }
      acc[r] += s * __half2float(__ushort_as_half(d[r]));
    }
  }
  // Exact without the per-element subtraction: a nibble masked in place is the subnormal q*2^(s-149), so x is scaled
  // by 2^(111-s) once for all the lane's rows (q*x*2^-38: 15 bits, exact), and the 8 subtracted from each q comes back
  // once per step as -8 * sum(x), shared by the rows too. FFMA takes subnormal inputs at full rate (no flush to zero).
  __device__ __forceinline__ void accumulate_subnormal(float* acc) {
    float2 a[4], b[4];
    float t = 0.f;
    #pragma unroll
    for (int k = 0; k < 4; k++) {
      a[k] = __half22float2(((const half2*)&xa.u)[k]); b[k] = __half22float2(((const half2*)&xb.u)[k]);
      t += (a[k].x + a[k].y) + (b[k].x + b[k].y);
      a[k].x *= 0x1p111f; a[k].y *= 0x1p103f; b[k].x *= 0x1p107f; b[k].y *= 0x1p99f;
    }
    t *= -0x1p-35f;
    #pragma unroll
    for (int r = 0; r < ROWS; r++) {
      float s = t;
      #pragma unroll
      for (int k = 0; k < 4; k++) {
        unsigned v = w[r][k];
        s = fmaf(__uint_as_float(v & 15u), a[k].x, s); s = fmaf(__uint_as_float(v & 3840u), a[k].y, s);
      }
      #pragma unroll
      for (int k = 0; k < 4; k++) {
        unsigned v = w[r][k];
        s = fmaf(__uint_as_float(v & 240u), b[k].x, s); s = fmaf(__uint_as_float(v & 61440u), b[k].y, s);
      }
      acc[r] += s * __half2float(__ushort_as_half(d[r]));
    }
  }
};
// G warps share each row's steps (warp g takes steps g, g+G, ...) and combine through shared memory; RB row groups a block
template <int ROWS, int STEPS, int G, int RB, int SUB>
__device__ __forceinline__ void matvec_grouped(half* out, const half* x, const unsigned char* wt) {
  __shared__ float part[RB][G][ROWS];
  int lane = threadIdx.x, g = threadIdx.y, rb = threadIdx.z, j0 = lane >> 1, h = lane & 1;
  int row0 = (blockIdx.x * RB + rb) * ROWS;
  float acc[ROWS];
  #pragma unroll
  for (int r = 0; r < ROWS; r++) acc[r] = 0.f;
  #pragma unroll
  for (int s = g; s < STEPS; s += G) {
    Step<ROWS> st; st.load(wt, x, row0 * ROW_BYTES, j0 + 16 * s, h);
    if (SUB) st.accumulate_subnormal(acc); else st.accumulate(acc);
  }
  #pragma unroll
  for (int r = 0; r < ROWS; r++) {
    if (SUB) acc[r] *= 0x1p38f;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
  }
  if (G == 1) {
    if (lane == 0) {
      #pragma unroll
      for (int r = 0; r < ROWS; r++) out[row0 + r] = __float2half(acc[r]);
    }
    return;
  }
  if (lane == 0) {
    #pragma unroll
    for (int r = 0; r < ROWS; r++) part[rb][g][r] = acc[r];
  }
  __syncthreads();
  if (g == 0 && lane < ROWS) {
    float v = 0.f;
    #pragma unroll
    for (int i = 0; i < G; i++) v += part[rb][i][lane];
    out[row0 + lane] = __float2half(v);
  }
}
template <int ROWS, int STEPS, int PIPE, int UNROLL>
__device__ __forceinline__ void matvec(half* out, const half* x, const unsigned char* wt) {
  int lane = threadIdx.x, j0 = lane >> 1, h = lane & 1;
  int row0 = (blockIdx.x * blockDim.y + threadIdx.y) * ROWS;
  int row_byte = row0 * ROW_BYTES;
  float acc[ROWS];
  #pragma unroll
  for (int r = 0; r < ROWS; r++) acc[r] = 0.f;
  if (PIPE) {
    Step<ROWS> cur, nxt;
    cur.load(wt, x, row_byte, j0, h);
    #pragma unroll 1
    for (int s = 0; s < STEPS - 1; s++) {
      nxt.load(wt, x, row_byte, j0 + 16 * (s + 1), h);
      cur.accumulate(acc);
      cur = nxt;
    }
    cur.accumulate(acc);
  } else {
    #pragma unroll UNROLL
    for (int s = 0; s < STEPS; s++) { Step<ROWS> st; st.load(wt, x, row_byte, j0 + 16 * s, h); st.accumulate(acc); }
  }
  #pragma unroll
  for (int r = 0; r < ROWS; r++) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
  }
  if (lane == 0) {
    #pragma unroll
    for (int r = 0; r < ROWS; r++) out[row0 + r] = __float2half(acc[r]);
  }
}
// the same loads, no arithmetic: what the access pattern costs
template <int ROWS, int STEPS>
__device__ __forceinline__ void loads_only(half* out, const half* x, const unsigned char* wt) {
  int lane = threadIdx.x, j0 = lane >> 1, h = lane & 1;
  int row0 = (blockIdx.x * blockDim.y + threadIdx.y) * ROWS;
  unsigned acc = 0;
  #pragma unroll 1
  for (int s = 0; s < STEPS; s++) {
    Step<ROWS> st; st.load(wt, x, row0 * ROW_BYTES, j0 + 16 * s, h);
    #pragma unroll
    for (int r = 0; r < ROWS; r++) acc ^= st.w[r][0] ^ st.w[r][1] ^ st.w[r][2] ^ st.w[r][3] ^ st.d[r];
    acc ^= st.xa.u.x ^ st.xa.u.y ^ st.xa.u.z ^ st.xa.u.w ^ st.xb.u.x ^ st.xb.u.y ^ st.xb.u.z ^ st.xb.u.w;
  }
  if (acc == 0x9e3779b9u) out[row0] = __float2half(1.f);
}
#define K(name, ...) extern "C" __global__ void __launch_bounds__(128) name(half* out, const half* x, const unsigned char* wt) { __VA_ARGS__; }
K(base, (matvec<2, STEPS_PER_ROW, 0, 1>(out, x, wt)))
K(pipe, (matvec<2, STEPS_PER_ROW, 1, 1>(out, x, wt)))
// the prefetch's registers capped so that 10 blocks fit an SM: one wave of the 1280 blocks
extern "C" __global__ void __launch_bounds__(128, 10) pipe_capped(half* out, const half* x, const unsigned char* wt) { matvec<2, STEPS_PER_ROW, 1, 1>(out, x, wt); }
K(unrolled, (matvec<2, STEPS_PER_ROW, 0, STEPS_PER_ROW>(out, x, wt)))
K(loads_only_k, (loads_only<2, STEPS_PER_ROW>(out, x, wt)))
// name: rows a lane, warps a row, row groups a block, subnormal; all 128 threads a block
#define KG(name, R, G, RB, SUB, MINB) extern "C" __global__ void __launch_bounds__(128, MINB) name(half* out, const half* x, const unsigned char* wt) { matvec_grouped<R, STEPS_PER_ROW, G, RB, SUB>(out, x, wt); }
KG(g_r2_g1, 2, 1, 4, 0, 10)
KG(g_r2_g1_sub, 2, 1, 4, 1, 10)
KG(g_r4_g1_sub, 4, 1, 4, 1, 10)
KG(g_r4_g1, 4, 1, 4, 0, 10)
KG(g_r4_g2, 4, 2, 2, 0, 10)
KG(g_r4_g2_sub, 4, 2, 2, 1, 10)
KG(g_r8_g4, 8, 4, 1, 0, 10)
KG(g_r8_g4_sub, 8, 4, 1, 1, 10)
KG(g_r4_g4_sub, 4, 4, 1, 1, 10)
KG(g_r4_g2_b1, 4, 2, 1, 0, 10)
KG(g_r4_g2_b1_sub, 4, 2, 1, 1, 10)
"""

def rendered_source(out:int, inp:int) -> tuple[str, str, tuple[int, int, int], tuple[int, int, int]]:
  """The passes' CUDA kernel for this matvec as tinygrad renders it, its name, grid and block."""
  import tinygrad_ext  # noqa: F401
  from tinygrad.uop.ops import Ops
  from benchmarks.kernels import build, Row as R
  from kernels import kernel_asts, render, cuda_renderer
  from tinygrad import Tensor
  case = build(R("probe", "", out, inp, None))
  ast = [a for a in kernel_asts(lambda: case.matvec(case.x, 0)) if any(u.op is Ops.REDUCE for u in a.toposort())][-1]
  src = render(ast, cuda_renderer())
  name = re.search(r"void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src).group(1)
  dims = [int(d) for d in re.findall(r"/\* (\d+) \*/", src)]
  grid, block = (dims[0], 1, 1), tuple(dims[1:]) + (1,) * (4 - len(dims))
  return src, name, grid, block[:3]

def module(src:str, *flags:str):
  """A cupy module compiled by nvcc for this GPU: cupy's own NVRTC path forces -ftz=true, which flushes the subnormals
  the subnormal variants multiply (and tinygrad compiles without it)."""
  import cupy as cp, subprocess, tempfile
  cc = "".join(map(str, cp.cuda.Device().compute_capability))
  d = pathlib.Path(tempfile.mkdtemp())
  (d / "k.cu").write_text(src)
  subprocess.run(["nvcc", "-std=c++17", f"-arch=sm_{cc}", "-cubin", *flags, "-o", str(d / "k.cubin"), str(d / "k.cu")], check=True)
  return cp.RawModule(path=str(d / "k.cubin"))

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", type=int, default=10240)
  p.add_argument("--inp", type=int, default=2048)
  p.add_argument("--rotate-mb", type=float, default=256)
  p.add_argument("--call-mb", type=float, default=1024)
  p.add_argument("--iters", type=int, default=100)
  p.add_argument("--budget", type=float, default=0.5)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--json", type=str, default=None)
  args = p.parse_args(argv)
  args.rotate_bytes, args.call_bytes = int(args.rotate_mb * 1e6), int(args.call_mb * 1e6)
  import cupy as cp
  r = Row("probe", "", args.out, args.inp, None)
  nbytes, steps = r.nbytes, args.inp // QK // 16
  rng = np.random.default_rng(0)
  raw = random_q4_0(args.out * args.inp, rng, scale=0.5 / math.sqrt(args.inp))
  x_np = rng.uniform(-1, 1, args.inp).astype(np.float16)
  ref = ref_matvec(raw, args.out, args.inp, x_np)
  plan = rotation(r, nbytes, args.rotate_bytes, args.call_bytes)
  ncopies = max(c for c, _ in plan) + 1
  pool = cp.asarray(np.tile(raw, ncopies))
  x, out = cp.asarray(x_np), cp.zeros(args.out, dtype=cp.float16)
  src, name, grid, block = rendered_source(args.out, args.inp)
  kernels = {"rendered": (module(src).get_function(name), grid, block)}
  mod = module(PROBE_SRC, f"-DROW_BYTES={args.inp // QK * QBYTES}", f"-DSTEPS_PER_ROW={steps}")
  for k in ("base", "pipe", "pipe_capped", "unrolled"): kernels[k] = (mod.get_function(k), (args.out // 8, 1, 1), (32, 4, 1))
  light = module(PROBE_SRC, "-DALU_LIGHT", f"-DROW_BYTES={args.inp // QK * QBYTES}", f"-DSTEPS_PER_ROW={steps}")
  kernels["alu_light"] = (light.get_function("base"), (args.out // 8, 1, 1), (32, 4, 1))
  kernels["loads_only"] = (mod.get_function("loads_only_k"), (args.out // 8, 1, 1), (32, 4, 1))
  # grouped: (rows a lane, warps a row, row groups a block)
  for k, (rows, g, rb) in {"g_r2_g1": (2, 1, 4), "g_r2_g1_sub": (2, 1, 4), "g_r4_g1": (4, 1, 4), "g_r4_g1_sub": (4, 1, 4),
                           "g_r4_g2": (4, 2, 2), "g_r4_g2_sub": (4, 2, 2), "g_r8_g4": (8, 4, 1), "g_r8_g4_sub": (8, 4, 1),
                           "g_r4_g4_sub": (4, 4, 1), "g_r4_g2_b1": (4, 2, 1), "g_r4_g2_b1_sub": (4, 2, 1)}.items():
    kernels[k] = (mod.get_function(k), (args.out // (rows * rb), 1, 1), (32, g, rb))
  res = {}
  for kname, (fn, g, b) in kernels.items():
    # the rendered kernel's signature is (out, x, weight) as well: data0 is the output, data1 the activation, data2 the bytes
    out.fill(0)
    fn(g, b, (out, x, pool))
    cp.cuda.runtime.deviceSynchronize()
    err = float(np.abs(out.get().astype(np.float64) - ref).max() / np.abs(ref).max())
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
      stream.begin_capture()
      for c, _ in plan: fn(g, b, (out, x, pool[c * nbytes:]))
      graph = stream.end_capture()
      us = cupy_graph_us(graph, stream, len(plan), args)
    res[kname] = {"us": us, "gbs": nbytes / us / 1e3, "rel_err": err}
    print(f"  {kname:12s} {us:6.2f} us  {nbytes / us / 1e3:6.0f} GB/s  rel err {err:.1e}", flush=True)
  if args.json: pathlib.Path(args.json).write_text(json.dumps({"out": args.out, "in": args.inp, "launches": len(plan), "kernels": res}, indent=1))
  return res

if __name__ == "__main__": main()
