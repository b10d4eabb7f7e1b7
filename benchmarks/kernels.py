#!/usr/bin/env python3
"""GLM-4.7-Flash decode matvecs on GGUF weights: tinygrad with passes off vs on, against the read ceiling.

The rows: targets.md's Q4_0 table (the default), and with --mixes each other (type, shape) that the published Q4_0 and
Q4_K_M mixes give a decode matvec (third_party/llama.cpp/quant-mixes; the model's stacked projections, so attn_q_a+kv_a
and the dense gate+up are one matvec each), with the target 1.5x the row's read floor + 1 us.
Every kernel is built as tinygrad.llm builds it: the weight stays raw GGUF bytes on the device, ggml_data_to_tensor
dequantizes it lazily, and tinygrad fuses that into the matmul with the fp16 activation (one kernel per matvec).
Measuring follows benchmarks/TARGETS.md:
  - per-kernel time: one TinyJit (CUDA graphs on CUDA) runs `launches` matvecs, each on its own weight copy (MoE: its own
    disjoint 4-expert selection of a copy) until --rotate-mb distinct bytes are read, so the 60 MB L2 of an H200 cannot
    serve them, then cycling until --call-mb are read, so the GPU work of one call outweighs its host cost.
    All launches write one output buffer: a CUDA graph orders its kernels only by the buffers they share, and independent
    matvecs would overlap, which decode (each kernel waiting on the last) never sees.
    us = wall time of many calls / (calls * launches). Interleaved rounds of off and on, best of each.
  - the read ceiling, in the same run: the fastest of a few memory-bound sums over a --ceiling-mb buffer.
  - numerics: the JIT's result (the last launch) and the first launch, each setting, against a float64 numpy reference:
    max|a-ref|/max|ref|.
  - torch fp16 (cuBLAS `x @ W.T`; MoE: index the selected experts, then matmul), rotated the same way, one CUDA graph
    timed with CUDA events, where torch has a GPU. It runs first, before tinygrad creates its CUDA context.
  - the read floor (cupy, where it has a GPU; also before tinygrad): a kernel that only reads each row's bytes, with
    16-byte loads, rotated and replayed as the rows are. What a kernel reading those bytes takes, launch included: the
    room a row has left that is not the GPU's.

  DEV=CUDA python benchmarks/kernels.py [--json out.json] [--rows attn_q_a,moe_down] [--mixes] [--iters N]
  DEV=CPU python benchmarks/kernels.py --small        # scaled-down shapes, seconds on a CPU
"""
from __future__ import annotations
import argparse, contextlib, importlib.metadata, json, math, re, sys, time
from dataclasses import dataclass, replace
from typing import Callable
import numpy as np
import gguf
import tinygrad_ext
from tinygrad import Tensor, Device, TinyJit, dtypes
from tinygrad.helpers import Context, prod
from tinygrad.uop.ops import Ops
from tinygrad.llm.gguf import ggml_data_to_tensor
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from examples.glm.synth import random_blocks  # noqa: E402

QK, QBYTES, Q4_0 = 32, 18, 2  # a Q4_0 block: 32 elements in 18 bytes (fp16 scale d, 16 bytes of nibbles); ggml type 2
TOL = 1e-3                    # relative error allowed for fp16 activations (targets.md)

# ***** the rows of targets.md *****

def block_of(qtype:str) -> tuple[int, int]:
  """(elements, bytes) of a GGML type's block."""
  return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]

@dataclass(frozen=True)
class Row:
  name: str
  label: str
  out: int
  inp: int
  target_us: float|None
  experts: int = 0  # MoE (mul_mat_id) when > 0: k of the experts are selected
  k: int = 4
  qtype: str = "Q4_0"
  heads: int = 0    # a matvec per attention head when > 0 (MLA's attn_k_b, attn_v_b): weight (heads, out, in)
  floor_target: bool = False  # the target is 1.5x the read floor + 1 us (issue #32), known once the floor is measured
  @property
  def desc(self) -> str:
    shape = f"{self.k} of {self.experts} x " if self.experts else f"{self.heads} heads x " if self.heads else ""
    return f"{self.label} {'' if self.qtype == 'Q4_0' else self.qtype + ' '}{shape}{self.out}x{self.inp}"
  def weight_bytes(self, elem_bytes:float|None=None) -> int:
    """Bytes of weight one launch must read: the whole weight, or for MoE the k selected experts."""
    if elem_bytes is None: elem_bytes = block_of(self.qtype)[1] / block_of(self.qtype)[0]
    return int((self.k if self.experts else self.heads or 1) * self.out * self.inp * elem_bytes)
  @property
  def nbytes(self) -> int: return self.weight_bytes()

ROWS = [
  Row("attn_q_a", "attn_q_a", 768, 2048, 4),
  Row("attn_q_b", "attn_q_b", 5120, 768, 4),
  Row("attn_output", "attn_output", 2048, 5120, 5),
  Row("shexp_gate_up", "shexp gate+up", 3072, 2048, 4),
  Row("shexp_down", "shexp down", 2048, 1536, 4),
  Row("ffn_up", "dense ffn up", 10240, 2048, 6),
  Row("output", "output head", 154880, 2048, 57),
  Row("moe_gate_up", "MoE gate+up", 3072, 2048, 8, experts=64),
  Row("moe_down", "MoE down", 2048, 1536, 5, experts=64),
]

# each (type, shape) of a decode matvec in the Q4_0 and Q4_K_M mixes that ROWS lacks (types-*.json; the model stacks
# attn_q_a with attn_kv_a_mqa and the dense gate with up; MoE as targets.md's rows: 4 of 64 experts)
MIX_ROWS = [
  Row("attn_k_b", "attn_k_b", 512, 192, None, heads=20, floor_target=True),
  Row("attn_v_b", "attn_v_b", 256, 512, None, heads=20, floor_target=True),
  Row("ffn_down", "dense ffn down", 2048, 10240, None, floor_target=True),
  Row("output_q6_k", "output head", 154880, 2048, None, qtype="Q6_K", floor_target=True),
  Row("attn_q_a_kv_a_q4_k", "attn_q_a+kv_a", 1344, 2048, None, qtype="Q4_K", floor_target=True),
  Row("attn_q_b_q4_k", "attn_q_b", 5120, 768, None, qtype="Q4_K", floor_target=True),
  Row("attn_k_b_q5_0", "attn_k_b", 512, 192, None, qtype="Q5_0", heads=20, floor_target=True),
  Row("attn_v_b_q4_k", "attn_v_b", 256, 512, None, qtype="Q4_K", heads=20, floor_target=True),
  Row("attn_output_q4_k", "attn_output", 2048, 5120, None, qtype="Q4_K", floor_target=True),
  Row("ffn_gate_up_q4_k", "dense ffn gate+up", 20480, 2048, None, qtype="Q4_K", floor_target=True),
  Row("ffn_down_q6_k", "dense ffn down", 2048, 10240, None, qtype="Q6_K", floor_target=True),
  Row("shexp_gate_up_q4_k", "shexp gate+up", 3072, 2048, None, qtype="Q4_K", floor_target=True),
  Row("shexp_down_q4_k", "shexp down", 2048, 1536, None, qtype="Q4_K", floor_target=True),
  Row("shexp_down_q6_k", "shexp down", 2048, 1536, None, qtype="Q6_K", floor_target=True),
  Row("moe_gate_up_q4_k", "MoE gate+up", 3072, 2048, None, experts=64, qtype="Q4_K", floor_target=True),
  Row("moe_down_q4_k", "MoE down", 2048, 1536, None, experts=64, qtype="Q4_K", floor_target=True),
  Row("moe_down_q6_k", "MoE down", 2048, 1536, None, experts=64, qtype="Q6_K", floor_target=True),
]

def small_row(r:Row) -> Row:
  """--small: out/16, in/4 (in stays a multiple of the type's block), 16 experts, heads/4; the targets do not apply."""
  block = block_of(r.qtype)[0]
  return replace(r, out=r.out//16, inp=max(block, r.inp//4//block*block), experts=r.experts//4, heads=r.heads//4 or r.heads,
                 target_us=None, floor_target=False)

# ***** Q4_0 weights and the float64 reference *****

def random_q4_0(n_elements:int, rng:np.random.Generator, scale:float=1.0) -> np.ndarray:
  """Valid Q4_0 bytes for n_elements: random nibbles, random fp16 scales of magnitude in [scale/2, scale], either sign."""
  nb = n_elements // QK
  blocks = rng.integers(0, 256, (nb, QBYTES), dtype=np.uint8)
  d = (rng.uniform(0.5, 1.0, nb) * rng.choice([-1.0, 1.0], nb) * scale).astype(np.float16)
  blocks[:, :2] = d.view(np.uint8).reshape(nb, 2)
  return blocks.reshape(-1)

def dequant_q4_0(raw:np.ndarray) -> np.ndarray:
  """float64 values of Q4_0 bytes, as ggml: (nibble-8)*d, the low nibbles are a block's first 16 elements."""
  b = raw.reshape(-1, QBYTES)
  d = b[:, :2].copy().view(np.float16).astype(np.float64)
  q = np.concatenate([b[:, 2:] & 0xF, b[:, 2:] >> 4], axis=1).astype(np.float64) - 8
  return (q * d).reshape(-1)

def dequant(raw:np.ndarray, qtype:str) -> np.ndarray:
  """float64 values of raw GGML bytes: Q4_0 by dequant_q4_0, other types by gguf (float32, exact: a quant times its
  scales, as ggml computes it)."""
  if qtype == "Q4_0": return dequant_q4_0(raw)
  return gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[qtype]).reshape(-1).astype(np.float64)

def ref_matvec(raw:np.ndarray, out:int, inp:int, x:np.ndarray, chunk:int=4096, qtype:str="Q4_0") -> np.ndarray:
  """float64 x @ W.T for an (out, in) weight of qtype, in row chunks (the whole output head is 2.5 GB in float64)."""
  block, size = block_of(qtype)
  w, x64 = raw.reshape(out, inp // block * size), x.astype(np.float64).reshape(inp)
  return np.concatenate([dequant(w[i:i+chunk], qtype).reshape(-1, inp) @ x64 for i in range(0, out, chunk)])

# ***** the kernels, as tinygrad.llm builds them *****

def gguf_weight(raw:Tensor, *shape:int, qtype:str="Q4_0") -> Tensor:
  """A GGUF weight as tinygrad.llm loads it: raw bytes on the device, dequantized lazily (a float32 expression)."""
  return ggml_data_to_tensor(raw, prod(shape), int(gguf.GGMLQuantizationType[qtype])).reshape(*shape)

def q4_0_weight(raw:Tensor, *shape:int) -> Tensor: return gguf_weight(raw, *shape)

def dense_matvec(raw:Tensor, x:Tensor, out:int, inp:int, qtype:str="Q4_0") -> Tensor:
  """The GLM model's linear (examples/glm/model.py, mixed numerics): x (1, in) fp16, widened, times the weight as it
  dequantizes (float32) -> (1, out) float32. With x (1, heads, 1, in) and a weight (heads, out, in): one matvec a head."""
  w = gguf_weight(raw, *x.shape[1:2] if x.ndim == 4 else (), out, inp, qtype=qtype)
  return x.float() @ w.transpose(-1, -2)

def moe_matvec(raw:Tensor, x:Tensor, sel:Tensor, experts:int, out:int, inp:int, contiguous:bool=True, qtype:str="Q4_0") -> Tensor:
  """The GLM model's experts() (tinygrad.llm's ExpertWeights, mul_mat_id), mixed numerics: x (1,1,1,in) fp16, sel (1,1,k)
  int32 -> (1,1,k,out) float32. contiguous=False leaves out its final .contiguous() for a caller that assigns the result
  into a buffer: the same kernel then writes that buffer instead of one more kernel copying into it."""
  y = x.float().unsqueeze(-2) @ gguf_weight(raw, experts, out, inp, qtype=qtype)[sel].transpose(-1, -2)
  return (y.contiguous() if contiguous else y).squeeze(-2)

def rotation(r:Row, nbytes:int, rotate_bytes:int, call_bytes:int, max_launches:int=1024) -> list[tuple[int, int]]:
  """(copy, group) of each launch of one call. Launches read distinct bytes (nbytes each) until rotate_bytes are covered,
  then cycle until call_bytes are read. A MoE copy serves experts//k launches: group g selects its g-th disjoint k experts."""
  per_copy = r.experts // r.k if r.experts else 1
  distinct = max(2, math.ceil(rotate_bytes / nbytes))
  launches = min(max(distinct, math.ceil(call_bytes / nbytes)), max(max_launches, distinct))
  return [divmod(i % distinct, per_copy) for i in range(launches)]

@dataclass
class Case:
  """One row's data on the device: launch i runs on copies[plan[i][0]] (MoE: with selection sels[i])."""
  row: Row
  x_np: np.ndarray
  raw_np: np.ndarray  # every copy holds these bytes, each at its own address
  x: Tensor
  copies: list[Tensor]
  plan: list[tuple[int, int]]
  sels_np: list[np.ndarray|None]
  sels: list[Tensor|None]

  @property
  def launches(self) -> int: return len(self.plan)

  def matvec(self, x:Tensor, i:int, contiguous:bool=True) -> Tensor:
    r, raw = self.row, self.copies[self.plan[i][0]]
    if r.experts: return moe_matvec(raw, x, self.sels[i], r.experts, r.out, r.inp, contiguous, r.qtype)
    return dense_matvec(raw, x, r.out, r.inp, r.qtype)

  def reference(self, i:int) -> np.ndarray:
    r = self.row
    if r.heads:
      per_head, xs = self.raw_np.reshape(r.heads, -1), self.x_np.reshape(r.heads, r.inp)
      return np.stack([ref_matvec(per_head[h], r.out, r.inp, xs[h], qtype=r.qtype) for h in range(r.heads)])
    if not r.experts: return ref_matvec(self.raw_np, r.out, r.inp, self.x_np, qtype=r.qtype)
    per_expert = self.raw_np.reshape(r.experts, -1)
    return np.stack([ref_matvec(per_expert[e], r.out, r.inp, self.x_np, qtype=r.qtype) for e in self.sels_np[i].reshape(-1)])

def build(r:Row, rotate_bytes:int=0, call_bytes:int=0, seed:int=0) -> Case:
  """Random weights of row r's type on Device.DEFAULT, enough copies to rotate over rotate_bytes; fp16 x in [-1, 1]."""
  rng = np.random.default_rng(seed)
  n = (r.experts or r.heads or 1) * r.out * r.inp
  if r.qtype == "Q4_0": raw_np = random_q4_0(n, rng, scale=0.5 / math.sqrt(r.inp))  # outputs ~N(0, 1/16)
  else: raw_np = random_blocks(gguf.GGMLQuantizationType[r.qtype], n, 1.7 / math.sqrt(r.inp), rng).reshape(-1)
  x_np = rng.uniform(-1, 1, (1, (r.heads or 1) * r.inp)).astype(np.float16)
  plan = rotation(r, r.nbytes, rotate_bytes, call_bytes)
  copies = [Tensor(raw_np, device=Device.DEFAULT).realize() for _ in range(max(c for c, _ in plan) + 1)]
  sels_np: list[np.ndarray|None] = [None] * len(plan)
  if r.experts:
    perms = [rng.permutation(r.experts).astype(np.int32) for _ in copies]
    sels_np = [perms[c][g*r.k:(g+1)*r.k].reshape(1, 1, r.k) for c, g in plan]
  sels = [None if s is None else Tensor(s, device=Device.DEFAULT).realize() for s in sels_np]
  x = Tensor(x_np.reshape((1, 1, 1, r.inp) if r.experts else (1, r.heads, 1, r.inp) if r.heads else (1, r.inp)), device=Device.DEFAULT).realize()
  return Case(r, x_np, raw_np, x, copies, plan, sels_np, sels)

def build_dense(out:int, inp:int, rotate_mb:float=0, seed:int=0) -> Case:
  return build(Row(f"dense_{out}x{inp}", "dense", out, inp, None), int(rotate_mb * 1e6), seed=seed)

def build_moe(experts:int, k:int, out:int, inp:int, rotate_mb:float=0, seed:int=0) -> Case:
  return build(Row(f"moe_{k}of{experts}_{out}x{inp}", "MoE", out, inp, None, experts, k), int(rotate_mb * 1e6), seed=seed)

# ***** timing *****

# passes off: plain tinygrad. on: every active pass (TINYGRAD_EXT_DISABLE still switches single ones off)
SETTINGS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
  "off": tinygrad_ext.passes_off, "on": lambda: Context(TINYGRAD_EXT=1)}

def sync() -> None: Device[Device.DEFAULT].synchronize()

def time_calls(fn:Callable[[], object], iters:int, budget_s:float, sync_fn:Callable[[], None]=sync) -> dict:
  """Times calls of a warm fn: the call count comes from one timed call, so slow kernels cost no more than budget_s."""
  def timed(n:int) -> float:
    sync_fn()
    st = time.perf_counter()
    for _ in range(n): fn()
    sync_fn()
    return (time.perf_counter() - st) / n
  n = max(2, min(iters, int(budget_s / max(timed(1), 1e-9))))
  return {"s": timed(n), "calls": n}

def jit_calls(linear) -> tuple[int, int]:
  """(kernels, graphs) a captured TinyJit runs per call: its graphs (CUDA graphs on CUDA) hold most of the kernels."""
  kernels, graphs = 0, 0
  for call in linear.src:
    if call.src[0].op is Ops.CUSTOM_FUNCTION: kernels, graphs = kernels + jit_calls(call.src[0].src[0])[0], graphs + 1
    else: kernels += call.src[0].op is Ops.PROGRAM
  return kernels, graphs

def rel_err(a:np.ndarray, ref:np.ndarray) -> float: return float(np.abs(a - ref).max() / np.abs(ref).max())

def bench_setting(case:Case, setting:str, args) -> tuple[Callable[[], dict], dict]:
  """Compiles and captures case's TinyJit under `setting` and checks its numerics; returns a timer and the results."""
  probe = case.matvec(case.x, 0)
  out = Tensor.empty(*probe.shape, dtype=probe.dtype, device=Device.DEFAULT).realize()
  # x is no input of the JIT but a buffer it holds: every graph node reading an input would be re-patched each call
  @TinyJit
  def run() -> Tensor:
    # every launch writes `out`, so each waits for the last (write after write), as the kernels of a decode step do
    for i in range(case.launches): out.assign(case.matvec(case.x, i, contiguous=False)).realize()
    return out
  # capture on the first call: an uncaptured first call would schedule every launch once more (seconds for ~1000)
  run.cnt = 1
  with SETTINGS[setting]():
    run()  # compiles, captures and runs
    last = run().numpy()  # the first replay of the graph
    first = case.matvec(case.x, 0).numpy()
  errs = [rel_err(a.astype(np.float64).reshape(-1), case.reference(i).reshape(-1)) for a, i in ((first, 0), (last, case.launches-1))]
  def timer() -> dict:
    with SETTINGS[setting](): return time_calls(run, args.iters, args.budget)
  kernels, graphs = jit_calls(run.captured.linear)
  return timer, {"rel_err": max(errs), "numerics_ok": max(errs) <= TOL, "kernels_per_matvec": kernels / case.launches, "graphs": graphs}

# memory-bound reads of a uint32 buffer. A column sum is coalesced (a thread per column) and writes 1/rows of what it reads.
CEILING_KERNELS: dict[str, Callable[[Tensor], Tensor]] = {
  "colsum256": lambda b: b.reshape(256, -1).sum(axis=0, dtype=dtypes.uint32),
  "colsum64": lambda b: b.reshape(64, -1).sum(axis=0, dtype=dtypes.uint32),
  "sum": lambda b: b.sum(dtype=dtypes.uint32)}  # tinygrad splits a full reduce into two kernels

def read_ceiling(mb:float, iters:int, budget_s:float, names:tuple[str, ...]=tuple(CEILING_KERNELS)) -> dict:
  """GB/s of the fastest of a few memory-bound reads of one mb-sized buffer (its contents do not matter)."""
  n = int(mb * 1e6) // 4 // 4096 * 4096
  buf = Tensor.empty(n, dtype=dtypes.uint32, device=Device.DEFAULT).realize()
  res = {}
  for name in names:
    jit = TinyJit(lambda fn=CEILING_KERNELS[name]: fn(buf).realize())
    for _ in range(3): jit()
    res[name] = n * 4 / time_calls(jit, iters, budget_s)["s"] / 1e9
  return {"gbs": max(res.values()), "kernel": max(res, key=res.get), "mb": n * 4 / 1e6, "all_gbs": res}

# ***** torch fp16 (cuBLAS) *****

def torch_cuda():
  try:
    import torch
    return torch if torch.cuda.is_available() else None
  except Exception: return None

def replay_us(timed:Callable[[int], float], launches:int, args) -> float:
  """us per launch of a CUDA graph of `launches` launches, from timed(n) (seconds per replay over n replays): the replay
  count from one timed replay after a warm one, so slow graphs cost no more than args.budget; best of args.rounds."""
  timed(1)
  n = max(2, min(args.iters, int(args.budget / max(timed(1), 1e-9))))
  return min(timed(n) for _ in range(args.rounds)) / launches * 1e6

def torch_us(r:Row, args) -> float:
  """us per launch of torch fp16 `x @ W.T` (MoE: index the k selected experts, then matmul), rotated over fp16 copies as
  the tinygrad kernels are, replayed as one CUDA graph and timed with CUDA events."""
  import torch
  dev = torch.device("cuda")
  plan = rotation(r, r.weight_bytes(2), args.rotate_bytes, args.call_bytes)
  shape = (r.experts, r.out, r.inp) if r.experts else (r.out, r.inp)
  ws = [torch.randn(shape, dtype=torch.float16, device=dev) / math.sqrt(r.inp) for _ in range(max(c for c, _ in plan) + 1)]
  x = torch.rand(1, r.inp, dtype=torch.float16, device=dev) * 2 - 1
  if r.experts:
    perms = [torch.randperm(r.experts, device=dev) for _ in ws]
    sels = [perms[c][g*r.k:(g+1)*r.k] for c, g in plan]
    fn = lambda: [x @ ws[c][sel].transpose(-1, -2) for (c, _), sel in zip(plan, sels)]
  else: fn = lambda: [x @ ws[c].T for c, _ in plan]
  stream = torch.cuda.Stream()
  stream.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(stream):
    for _ in range(3): fn()  # cuBLAS picks and loads its kernels outside the capture
  torch.cuda.current_stream().wait_stream(stream)
  graph = torch.cuda.CUDAGraph()
  with torch.cuda.graph(graph): fn()
  def timed(n:int) -> float:
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(n): graph.replay()
    en.record()
    torch.cuda.synchronize()
    return st.elapsed_time(en) * 1e-3 / n
  us = replay_us(timed, len(plan), args)
  del graph, ws, fn
  torch.cuda.empty_cache()
  return us

# ***** read floor (cupy) *****

# reads 16-byte words once, N a thread at a stride of the grid, all in flight. The words are zeros: the guarded store
# never happens, and the compiler cannot drop the loads. (A runtime count and a bounds check per load read 0.2-0.6 us
# slower on the H200.)
FLOOR_SRC = r"""
template <int N> __device__ void read_words(const uint4* __restrict__ p, unsigned* out) {
  long i = (long)blockIdx.x * blockDim.x + threadIdx.x, t = (long)gridDim.x * blockDim.x;
  unsigned acc = 0;
  #pragma unroll
  for (int j = 0; j < N; j++) { uint4 v = p[i + j * t]; acc += v.x ^ v.w; }
  if (acc == 0x9e3779b9u) out[i] = acc;
}
extern "C" __global__ void read_words_1(const uint4* p, unsigned* out) { read_words<1>(p, out); }
extern "C" __global__ void read_words_4(const uint4* p, unsigned* out) { read_words<4>(p, out); }
"""

def cupy_cuda():
  try:
    import cupy
    return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
  except Exception: return None

def cupy_graph_us(graph, stream, launches:int, args) -> float:
  """us per launch of a captured cupy CUDA graph of `launches` launches, its replays timed with CUDA events."""
  import cupy as cp
  def timed(n:int) -> float:
    st, en = cp.cuda.Event(), cp.cuda.Event()
    st.record(stream)
    for _ in range(n): graph.launch(stream)
    en.record(stream)
    en.synchronize()
    return cp.cuda.get_elapsed_time(st, en) * 1e-3 / n
  return replay_us(timed, launches, args)

def floor_us(nbytes:int, args, block:int=256) -> float:
  """us per launch of a kernel that only reads nbytes (16-byte loads, 1 or 4 a thread: the faster; rounded down to whole
  thread blocks, at most 16 KB less), replayed as one CUDA graph of dependent launches rotated over distinct copies as
  the rows are (cupy): what a kernel reading a row's bytes takes on this GPU, launch included."""
  import cupy as cp
  words = nbytes // 16
  plan = rotation(Row("floor", "", 1, 1, None), words * 16, args.rotate_bytes, args.call_bytes)
  pool, out = cp.zeros(len({c for c, _ in plan}) * words * 4, dtype=cp.uint32), cp.zeros(1, dtype=cp.uint32)
  mod, best = cp.RawModule(code=FLOOR_SRC), float("inf")
  for per_thread in (1, 4):
    fn, grid = mod.get_function(f"read_words_{per_thread}"), words // (per_thread * block)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
      fn((grid,), (block,), (pool, out))  # loads the module outside the capture
      stream.begin_capture()
      for c, _ in plan: fn((grid,), (block,), (pool[c * words * 4:], out))
      graph = stream.end_capture()
      best = min(best, cupy_graph_us(graph, stream, len(plan), args))
  del graph, pool
  cp.get_default_memory_pool().free_all_blocks()
  return best

# ***** the run *****

def device_name() -> str:
  if (torch := torch_cuda()) is not None and Device.DEFAULT.split(":")[0] in ("CUDA", "NV"): return torch.cuda.get_device_name()
  dev = Device[Device.DEFAULT]
  return f"{Device.DEFAULT} {getattr(dev, 'arch', None) or type(dev.renderer).__name__}"

def bench_row(r:Row, args, ceiling_gbs:float, settings:list[str]) -> dict:
  st = time.perf_counter()
  case = build(r, args.rotate_bytes, args.call_bytes)
  res: dict = {"name": r.name, "desc": r.desc, "out": r.out, "in": r.inp, "experts": r.experts, "k": r.k if r.experts else 0,
               "qtype": r.qtype, "heads": r.heads, "weight_bytes": r.nbytes, "launches": case.launches, "copies": len(case.copies),
               "rotation_mb": len({p for p in case.plan}) * r.nbytes / 1e6, "target_us": r.target_us}
  sync()  # also makes tinygrad's CUDA context current again
  timers = {}
  for s in settings: timers[s], res[s] = bench_setting(case, s, args)
  # interleaved rounds, best of each: the GPU is shared and noisy, and drift should not favour one setting
  best: dict[str, dict] = {}
  for _ in range(args.rounds):
    for s, timer in timers.items():
      if (t := timer())["s"] < best.get(s, t)["s"] or s not in best: best[s] = t
  for s, t in best.items():
    us = t["s"] / case.launches * 1e6
    gbs = r.nbytes / (us * 1e-6) / 1e9
    res[s].update(us=us, gbs=gbs, frac=gbs / ceiling_gbs, calls=t["calls"])
  res["speedup"] = res["off"]["us"] / res["on"]["us"] if "off" in res else None
  res["torch_us"] = args.torch_us.get(r.name)
  res["floor_us"] = args.floor_us.get(r.name)
  if r.floor_target and res["floor_us"] is not None: res["target_us"] = 1.5 * res["floor_us"] + 1
  res["met"] = None if res["target_us"] is None else res["on"]["us"] <= res["target_us"]
  res["wall_s"] = time.perf_counter() - st
  return res

def fmt(v, spec:str) -> str: return "-" if v is None else format(v, spec)
def fmt_num(v:float) -> str: return f"{v:.0f}" if v >= 100 else f"{v:.3g}"  # CPU runs have GB/s and % well below 1

def table(rows:list[dict], ceiling:dict) -> str:
  head = ["kernel", "weight MB", "launches", "off us", "off GB/s", "off %ceil", "on us", "on GB/s", "on %ceil", "on/off speedup",
          "torch fp16 us", "read floor us", "target us", "met", "rel err off/on"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  def us(t:dict) -> str: return f"{t['us']:.1f}"
  for r in rows:
    off, on = r.get("off"), r["on"]  # no off with --no-off
    err = ("-" if off is None else f"{off['rel_err']:.1e}") + f"/{on['rel_err']:.1e}" + ("" if (off is None or off["numerics_ok"]) and on["numerics_ok"] else " FAIL")
    lines.append("| " + " | ".join([r["desc"], f"{r['weight_bytes']/1e6:.2f}", str(r["launches"]),
      *(("-",) * 3 if off is None else (us(off), fmt_num(off["gbs"]), fmt_num(off["frac"]*100))), us(on), fmt_num(on["gbs"]), fmt_num(on["frac"]*100),
      fmt(r["speedup"], ".2f"), fmt(r["torch_us"], ".1f"), fmt(r["floor_us"], ".1f"), fmt(r["target_us"], ".3g"),
      "-" if r["met"] is None else ("yes" if r["met"] else "no"), err]) + " |")
  lines.append(f"read ceiling: {ceiling['gbs']:.0f} GB/s ({ceiling['kernel']} over {ceiling['mb']:.0f} MB); met = passes on "
               f"within target; read floor = a kernel that only reads the row's bytes, same rotation and graph (cupy); rel err = max|a-ref|/max|ref| vs float64, tolerance {TOL:g}")
  return "\n".join(lines)

class OneLineParser(argparse.ArgumentParser):
  def error(self, message):  # a bad argument is one line and exit status 2 (--help shows the usage)
    self.exit(2, f"kernels.py: error: {message}\n")

def parse_args(argv:list[str]|None=None):
  p = OneLineParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="scaled-down shapes, rotation and timing: seconds on DEV=CPU")
  p.add_argument("--rows", type=str, default="", help="comma-separated row names: " + ",".join(r.name for r in ROWS + MIX_ROWS) + ", or dense_OUTxIN / moe_KofE_OUTxIN")
  p.add_argument("--mixes", action="store_true", help="also the rows of the Q4_0 and Q4_K_M mixes' other types (MIX_ROWS)")
  p.add_argument("--iters", type=int, default=None, help="at most this many timed JIT calls per measurement")
  p.add_argument("--budget", type=float, default=None, help="seconds per measurement: fewer calls when a call is slow")
  p.add_argument("--rounds", type=int, default=None, help="interleaved off/on timing rounds, best of each")
  p.add_argument("--rotate-mb", type=float, default=None, help="distinct weight bytes each call reads (>= 256 beats L2)")
  p.add_argument("--call-mb", type=float, default=None, help="weight bytes each call reads (cycling over the distinct ones)")
  p.add_argument("--ceiling-mb", type=float, default=None, help="buffer size of the read-ceiling kernels")
  p.add_argument("--no-torch", action="store_true", help="skip the torch fp16 column")
  p.add_argument("--no-floor", action="store_true", help="skip the read floor column (cupy)")
  p.add_argument("--no-off", action="store_true", help="skip the passes-off column: a sweep of passes-on settings (plain tinygrad's kernels compile and run slowest)")
  p.add_argument("--json", type=str, default=None, help="write all results here")
  p.add_argument("--without", type=str, default="", help="comma-separated passes: also time passes on without each, in the same run")
  p.add_argument("--policy", action="append", default=[], metavar="NAME=FIELD=V,...",
                 help="also time passes on with this matvec policy override (TINYGRAD_EXT_MATVEC_POLICY), e.g. l64=lanes=64; repeatable")
  p.add_argument("--variant", action="append", default=[], metavar="NAME=SETTING=VALUE",
                 help="also time passes on with this pass setting (tinygrad_ext.settings()), e.g. kept=TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT=1; repeatable")
  args = p.parse_args(argv)
  args.variants = {}  # name -> (setting, value)
  for v in args.variant:
    name, _, spec = v.partition("=")
    key, _, val = spec.partition("=")
    if not name or key not in tinygrad_ext.settings() or not val:
      p.error(f"--variant {v}: need NAME=SETTING=VALUE, SETTING one of {', '.join(tinygrad_ext.settings())}")
    try: tinygrad_ext.with_setting(key, val)
    except tinygrad_ext.SettingError as e: p.error(f"--variant {v}: {e}")
    args.variants[name] = (key, val)
  for spec in args.policy:  # checked here, not in a compile worker after minutes of timing
    name, _, fields = spec.partition("=")
    try: tinygrad_ext.with_setting("TINYGRAD_EXT_MATVEC_POLICY", fields)
    except tinygrad_ext.SettingError as e: p.error(f"--policy {spec}: {e}")
    if not name or not fields: p.error(f"--policy {spec}: need NAME=FIELD=V,...")
  try: tinygrad_ext.check_pass_names([n for n in args.without.split(",") if n])
  except ValueError as e: p.error(f"--without: {e}")
  defaults = dict(iters=3, budget=0.05, rounds=1, rotate_mb=0.25, call_mb=0, ceiling_mb=16) if args.small else \
             dict(iters=100, budget=0.5, rounds=2, rotate_mb=256, call_mb=1024, ceiling_mb=1024)
  for k, v in defaults.items():
    if getattr(args, k) is None: setattr(args, k, v)
  args.rotate_bytes, args.call_bytes = int(args.rotate_mb * 1e6), int(args.call_mb * 1e6)
  return args

def shape_row(name:str) -> Row|None:
  """A row of any shape, outside targets.md: dense_OUTxIN or moe_KofE_OUTxIN (a tiny one prices a launch)."""
  if m := re.fullmatch(r"dense_(\d+)x(\d+)", name): return Row(name, "dense", int(m[1]), int(m[2]), None)
  if m := re.fullmatch(r"moe_(\d+)of(\d+)_(\d+)x(\d+)", name): return Row(name, "MoE", int(m[3]), int(m[4]), None, int(m[2]), int(m[1]))
  return None

def select_rows(names:str, small:bool, mixes:bool=False) -> list[Row]:
  rows = {r.name: small_row(r) if small else r for r in ROWS + MIX_ROWS}
  if not names: return [rows[r.name] for r in ROWS + (MIX_ROWS if mixes else [])]
  picked = [rows.get(n) or shape_row(n) for n in names.split(",")]
  if (bad := [n for n, r in zip(names.split(","), picked) if r is None or r.inp % QK]):
    raise SystemExit(f"unknown rows {bad}: have {list(rows)}, or dense_OUTxIN / moe_KofE_OUTxIN with IN a multiple of {QK}")
  return picked

def main(argv:list[str]|None=None) -> dict:
  args = parse_args(argv)
  # each --without pass: one more setting, every pass on but that one
  without = [n for n in args.without.split(",") if n]
  for n in tinygrad_ext.check_pass_names(without):
    SETTINGS[f"without_{n}"] = lambda n=n: tinygrad_ext.without(n)
  # each --policy: one more setting, every pass on with the matvec policy overridden
  from tinygrad_ext.passes.matvec import parse_override
  policies = dict(p.split("=", 1) for p in args.policy)
  for name, spec in policies.items():
    parse_override(spec)  # a bad field fails here, before any compile
    SETTINGS[f"policy_{name}"] = lambda spec=spec: Context(TINYGRAD_EXT_MATVEC_POLICY=spec)
  # each --variant: one more setting, every pass on with that pass setting
  variants = args.variants
  for name, (key, val) in variants.items():
    SETTINGS[f"variant_{name}"] = lambda key=key, val=val: tinygrad_ext.with_setting(key, val)
  extra = [f"without_{n}" for n in without] + [f"policy_{n}" for n in policies] + [f"variant_{n}" for n in variants]
  rows, st = select_rows(args.rows, args.small, args.mixes), time.perf_counter()
  # torch first: once tinygrad's CUDA context is current, the CUDA runtime would run torch in it
  args.torch_us = {}
  if not args.no_torch and (torch := torch_cuda()) is not None:
    for r in rows:
      args.torch_us[r.name] = torch_us(r, args)
      print(f"  torch {r.name}: {args.torch_us[r.name]:.1f} us", flush=True)
  args.floor_us = {}
  if not args.no_floor and Device.DEFAULT.split(":")[0] in ("CUDA", "NV") and cupy_cuda() is not None:
    for r in rows:
      args.floor_us[r.name] = floor_us(r.nbytes, args)
      print(f"  read floor {r.name}: {args.floor_us[r.name]:.1f} us", flush=True)
  tinygrad_ext.enable()  # installs the hooks even under TINYGRAD_EXT=0; each setting is a Context around its compiles
  with SETTINGS["on"](): active, cid = list(tinygrad_ext.active_passes()), tinygrad_ext.cache_id()
  # the ceiling kernels take seconds to compile on a CPU: --small measures only the first
  ceiling = read_ceiling(args.ceiling_mb, args.iters, args.budget, tuple(CEILING_KERNELS)[:1] if args.small else tuple(CEILING_KERNELS))
  print(f"device {device_name()}  tinygrad {importlib.metadata.version('tinygrad')}  tinygrad_ext {tinygrad_ext.__version__}  "
        f"passes on: {','.join(active) or '(none registered)'}  read ceiling {ceiling['gbs']:.0f} GB/s", flush=True)
  results, settings = [], [s for s in SETTINGS if not (args.no_off and s == "off")]
  for r in rows:
    results.append(res := bench_row(r, args, ceiling["gbs"], settings))
    # every setting's time as soon as its row is done: a run cut short keeps what it measured
    others = "".join(f", {e} {res[e]['us']:.1f}{'' if res[e]['numerics_ok'] else ' FAIL'}" for e in extra)
    off = f"off {res['off']['us']:.1f} us, " if "off" in res else ""
    print(f"  {r.name}: {off}on {res['on']['us']:.1f} us{others}, "
          f"rel err {max(res[s]['rel_err'] for s in ('off', 'on') if s in res):.1e} ({res['wall_s']:.1f} s)", flush=True)
  print(table(results, ceiling))
  if extra:
    # without_X: every pass on but X; policy_X: every pass on, matvec policy X; variant_X: a pass setting (specs in the JSON's args)
    print("| kernel | on us | " + " | ".join(f"{e.replace('_', ' ', 1)} us | on speedup vs {e.replace('_', ' ', 1)}" for e in extra) + " |")
    print("|" + "---|" * (2 + 2 * len(extra)))
    for r in results:
      # a setting whose numerics fail says so beside its time: a wrong kernel's speed is no result
      print(f"| {r['desc']} | {r['on']['us']:.1f} | " + " | ".join(f"{r[e]['us']:.1f}{'' if r[e]['numerics_ok'] else ' FAIL'} | "
                                                                   f"{r[e]['us']/r['on']['us']:.2f}" for e in extra) + " |")
  out = {"device": device_name(), "dev": Device.DEFAULT, "small": args.small, "tinygrad": importlib.metadata.version("tinygrad"),
         "tinygrad_ext": tinygrad_ext.__version__, "active_passes": active, "cache_id": cid, "tolerance": TOL,
         "torch": torch.__version__ if args.torch_us else None, "ceiling": ceiling, "rows": results,
         "args": {k: v for k, v in vars(args).items() if k not in ("json", "torch_us", "floor_us")}, "wall_s": time.perf_counter() - st}
  if args.json:
    with open(args.json, "w") as f: json.dump(out, f, indent=1)
  return out

if __name__ == "__main__":
  out = main()
  sys.exit(0 if all(r[s]["numerics_ok"] for r in out["rows"] for s in SETTINGS if s in r) else 1)
