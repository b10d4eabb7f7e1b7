"""GLM-4.7-Flash in plain tinygrad, read from a llama.cpp GGUF (architecture `deepseek2`).

The weights stay on the device as their GGUF bytes; tinygrad.llm's ggml_data_to_tensor turns each into a lazy dequant
expression, and every matmul reads it through `w.cast(act)` (NUMERICS), so tinygrad fuses the dequant into the matmul kernel.
Nothing is dequantized ahead of time and there are no custom kernels or hand-picked opts.

Conventions, as llama.cpp's deepseek2 graph (src/models/deepseek2.cpp) uses them:
- MLA, absorbed: q_nope goes through attn_k_b per head into the kv_lora latent; attention runs over a cache of
  [kv_a_norm(kv_c) ; rope(k_pe)] per position (one shared "KV head", kv_lora + rope wide); the attended latent goes
  through attn_v_b per head. attn_k_b is (n_head, kv_lora, qk_nope) and attn_v_b (n_head, v_head, kv_lora) in numpy
  order (the converter splits HF's kv_b_proj and transposes k_b). Scale 1/sqrt(qk_nope + qk_rope).
- RoPE: llama.cpp runs deepseek2 with LLAMA_ROPE_TYPE_NORM, which rotates pairs of consecutive values (x[2i], x[2i+1])
  with theta_i = freq_base^(-2i/n_rot) on the last qk_rope values of each q head and of kv_a_mqa's output.
- Router: sigmoid scores; the top-k is chosen on score + exp_probs_b, the weights are the chosen scores (no bias),
  normalized to sum 1 (expert_weights_norm) and scaled by expert_weights_scale.
"""
from __future__ import annotations
import math, os, pathlib
from dataclasses import dataclass
from typing import Callable
import numpy as np
from tqdm import tqdm
from tinygrad import Tensor, TinyJit, UOp, Device, dtypes
from tinygrad.dtype import DType
from tinygrad.llm.gguf import ggml_data_to_tensor, readers, read_str, read_int32, read_uint32, read_uint64, read_int64, _GGML_NATIVE, _GGML_QUANT
from examples.glm import weights_io

ARCH = "deepseek2"
SIGMOID = 2  # expert_gating_func (llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID; 1 is softmax)
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
              12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 30: "BF16"}
# block (elements, bytes) of each type tinygrad's ggml_data_to_tensor reads
BLOCKS = {**{t: (1, dt.itemsize) for t, dt in _GGML_NATIVE.items()}, **_GGML_QUANT}

class GGUFError(ValueError):
  """A file this model cannot load; the message is one line for the user."""

# ***** GGUF header *****

@dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]  # numpy order: ggml's ne reversed
  ggml_type: int
  offset: int             # from the file start
  nbytes: int

def read_header(path:str|os.PathLike) -> tuple[dict, dict[str, TensorInfo]]:
  """Parses and checks the GGUF header on the host (cheap even for a 17 GB file): kv metadata and tensor infos."""
  path = pathlib.Path(path)
  if not path.is_file(): raise GGUFError(f"{path}: no such file")
  size = path.stat().st_size
  with open(path, "rb") as f:
    if f.read(4) != b"GGUF": raise GGUFError(f"{path}: not a GGUF file (bad magic)")
    try:
      if (version := read_int32(f)) not in (2, 3): raise GGUFError(f"{path}: unsupported GGUF version {version}")
      n_tensors, n_kv = read_int64(f), read_int64(f)
      kv = {}
      for _ in range(n_kv):
        key, typ = read_str(f), read_int32(f)
        kv[key] = readers[typ](f)
      raw = [(read_str(f), tuple(read_uint64(f) for _ in range(read_uint32(f))), read_int32(f), read_uint64(f)) for _ in range(n_tensors)]
      pos = f.tell()
    except GGUFError: raise
    except Exception: raise GGUFError(f"{path}: truncated or corrupt GGUF header") from None
  align = kv.get("general.alignment", 32)
  data_start = (pos + align - 1) // align * align
  infos = {}
  for name, dims, typ, off in raw:
    if typ not in BLOCKS: raise GGUFError(f"{path}: tensor {name} has unsupported type {GGML_TYPES.get(typ, typ)}")
    n, (block, block_bytes) = math.prod(dims), BLOCKS[typ]
    infos[name] = TensorInfo(name, tuple(reversed(dims)), typ, data_start + off, n // block * block_bytes)
  if infos and (end := max(t.offset + t.nbytes for t in infos.values())) > size:
    raise GGUFError(f"{path}: truncated GGUF ({size} bytes, the tensors need {end})")
  return kv, infos

# ***** config *****

@dataclass(frozen=True)
class Config:
  dim: int; n_blocks: int; n_dense: int; ffn: int; expert_ffn: int; n_experts: int; n_used: int; n_shared: int
  n_heads: int; q_lora: int; kv_lora: int; qk_nope: int; qk_rope: int; v_head: int; vocab: int
  eps: float; rope_theta: float; expert_scale: float; expert_norm: bool; gating: int; context: int

  @staticmethod
  def from_gguf(kv:dict, infos:dict[str, TensorInfo]) -> Config:
    if (arch := kv.get("general.architecture")) != ARCH: raise GGUFError(f"architecture {arch!r} is not supported (need {ARCH!r}: GLM-4.7-Flash)")
    def k(key, default=None):
      if (v := kv.get(f"{ARCH}.{key}", default)) is None: raise GGUFError(f"missing metadata key {ARCH}.{key}")
      return v
    rope = k("rope.dimension_count")
    # llama.cpp writes MLA as MQA: key_length = kv_lora + rope is the cache width, *_mla the per-head q.k and v sizes
    # (older conversions wrote the per-head sizes as key/value_length; they also kept attn_kv_b, which this model does not read)
    key_mla = k("attention.key_length_mla", kv.get(f"{ARCH}.attention.key_length"))
    v_mla = k("attention.value_length_mla", kv.get(f"{ARCH}.attention.value_length"))
    if "token_embd.weight" not in infos: raise GGUFError("missing tensor token_embd.weight")
    return Config(dim=k("embedding_length"), n_blocks=k("block_count"), n_dense=k("leading_dense_block_count", 0),
      ffn=k("feed_forward_length"), expert_ffn=k("expert_feed_forward_length"), n_experts=k("expert_count"),
      n_used=k("expert_used_count"), n_shared=k("expert_shared_count", 0), n_heads=k("attention.head_count"),
      q_lora=k("attention.q_lora_rank"), kv_lora=k("attention.kv_lora_rank"), qk_nope=key_mla - rope, qk_rope=rope, v_head=v_mla,
      vocab=infos["token_embd.weight"].shape[0], eps=k("attention.layer_norm_rms_epsilon"), rope_theta=k("rope.freq_base", 10000.0),
      expert_scale=k("expert_weights_scale", 1.0), expert_norm=bool(k("expert_weights_norm", False)), gating=k("expert_gating_func", 1),
      context=k("context_length", 4096))

# ***** weights *****

# Projections that read the same input, stored as one matrix on the device: one matvec where the GGUF has two.
# The stacked rows are those of llama.cpp's fused attn_qkv and of vLLM's merged gate_up / qkv projections; GGML rows
# are whole quant blocks, so stacking two weights' rows is concatenating their bytes (per expert for the _exps ones).
# name of the stacked tensor -> its parts, in row order
STACKED = {"attn_q_a_kv_a.weight": ("attn_q_a.weight", "attn_kv_a_mqa.weight"), "ffn_gate_up.weight": ("ffn_gate.weight", "ffn_up.weight"),
           "ffn_gate_up_shexp.weight": ("ffn_gate_shexp.weight", "ffn_up_shexp.weight"),
           "ffn_gate_up_exps.weight": ("ffn_gate_exps.weight", "ffn_up_exps.weight")}

# The shared expert appended to the routed experts as one more expert (its id n_experts), which every token selects with
# weight 1: the MoE matvecs then compute it with the routed ones, and its own gate+up and down matvecs are gone (one
# kernel a MoE block fewer; the weighted sum left, fusion recomputes it where it is read). SGLang's and vLLM's "shared
# experts fusion" for DeepSeek V3/R1 (sglang#4918, vllm#15502); GGML rows are whole quant blocks, so appending an
# expert is concatenating its bytes.
# routed experts' tensor -> the shared expert's, in the block
SHARED_INTO = {"ffn_gate_up_exps.weight": "ffn_gate_up_shexp.weight", "ffn_gate_exps.weight": "ffn_gate_shexp.weight",
               "ffn_up_exps.weight": "ffn_up_shexp.weight", "ffn_down_exps.weight": "ffn_down_shexp.weight"}

def appendable(exps:TensorInfo, shared:TensorInfo) -> bool:
  # not where their type or one expert's shape differ (DeepSeek-V2-Lite's two shared experts are one matrix twice an
  # expert's width; a quant mix may give the shared down another type than the routed ones)
  return exps.ggml_type == shared.ggml_type and len(exps.shape) == 3 and exps.shape[1:] == shared.shape

# A device tensor's bytes before they are copied: its info and where each range of them is in the file (weights_io).
Raw = tuple[TensorInfo, list[weights_io.Piece]]

def append_expert(exps:Raw, shared:Raw) -> Raw:
  """The shared expert's weight appended to the routed experts': one expert more."""
  (e, e_pieces), (sh, sh_pieces) = exps, shared
  return TensorInfo(e.name, (e.shape[0] + 1, *e.shape[1:]), e.ggml_type, -1, e.nbytes + sh.nbytes), \
    e_pieces + weights_io.byte_range(sh_pieces, 0, sh.nbytes, e.nbytes)

def stack_rows(parts:list[Raw], name:str) -> Raw|None:
  """The parts' rows stacked into one weight, or None where they differ in type or columns."""
  (a, _), rest = parts[0], [t for t, _ in parts[1:]]
  if any(t.ggml_type != a.ggml_type or t.shape[:-2] != a.shape[:-2] or t.shape[-1] != a.shape[-1] for t in rest): return None
  lead = math.prod(a.shape[:-2])  # experts: each expert's rows stay together
  widths = [t.nbytes // lead for t, _ in parts]
  starts = [sum(widths[:i]) for i in range(len(parts))]
  pieces = [p for e in range(lead) for (_, ps), w, s in zip(parts, widths, starts)
            for p in weights_io.byte_range(ps, e * w, w, e * sum(widths) + s)]
  shape = (*a.shape[:-2], sum(t.shape[-2] for t, _ in parts), a.shape[-1])
  return TensorInfo(name, shape, a.ggml_type, -1, sum(t.nbytes for t, _ in parts)), pieces

def stacked(raws:dict[str, Raw], prefix:str) -> dict[str, Raw]:
  """A block's tensors with the projections of STACKED stacked where all their parts are there and alike."""
  out = dict(raws)
  for name, parts in STACKED.items():
    if all(f"{prefix}{p}" in out for p in parts) and (st := stack_rows([out[f"{prefix}{p}"] for p in parts], f"{prefix}{name}")):
      for p in parts: del out[f"{prefix}{p}"]
      out[st[0].name] = st
  return out

def shared_appended(raws:dict[str, Raw], prefix:str) -> dict[str, Raw]:
  """A block's tensors with its shared expert appended to its routed experts (SHARED_INTO): in every projection or in
  none (Block reads one layout)."""
  pairs = [(e, sh) for short, short_sh in SHARED_INTO.items() if (e:=f"{prefix}{short}") in raws and (sh:=f"{prefix}{short_sh}") in raws]
  shared_names = {f"{prefix}{n}" for n in (*SHARED_INTO, *SHARED_INTO.values())}
  if not pairs or len(pairs) * 2 != sum(n in shared_names for n in raws) or not all(appendable(raws[e][0], raws[sh][0]) for e, sh in pairs):
    return raws
  out = dict(raws)
  for e, sh in pairs:
    out[e] = append_expert(out[e], out.pop(sh))
  return out

def block_prefix(name:str) -> str:
  """"blk.N." for a block's tensor, "" for the others."""
  return f"blk.{name.split('.')[1]}." if name.startswith("blk.") else ""

def weight_layout(infos:dict[str, TensorInfo], stack:bool=True, shared_in_experts:bool=True) -> list[dict[str, Raw]]:
  """The device tensors, a group a block: the GGUF's, with stack the projections of STACKED stacked and with
  shared_in_experts the shared expert appended to the routed experts (SHARED_INTO)."""
  blocks: dict[str, dict[str, Raw]] = {}
  for t in infos.values(): blocks.setdefault(block_prefix(t.name), {})[t.name] = (t, [(t.offset, t.nbytes, 0)])
  out = []
  for prefix, block in blocks.items():
    if stack: block = stacked(block, prefix)
    if shared_in_experts: block = shared_appended(block, prefix)
    out.append(block)
  return out

def load_weights(path:str|os.PathLike, infos:dict[str, TensorInfo], device:str|None=None, progress:bool=False,
                 stack:bool=True, shared_in_experts:bool=True) -> dict[str, Tensor]:
  """Copies each device tensor's GGUF bytes (weight_layout) from the disk to the device once (weights_io); returns lazy
  dequant expressions over them. Native types (F32, F16, BF16: norms, biases, the router) are their bytes reinterpreted;
  that reinterpretation is done once here, so kernels read typed values instead of reassembling every float from bytes
  wherever the tensor is used. The dequant expressions are built once every byte is on the device: each realize walks
  every live tensor's graph, so built as each tensor arrived they made the load quadratic (13 s of host time at full
  size, 844 realizes)."""
  device = device or Device.DEFAULT
  groups = weight_layout(infos, stack, shared_in_experts)
  bar = tqdm(total=sum(t.nbytes for t in infos.values()), desc=f"loading {pathlib.Path(path).name}", unit="B", unit_scale=True,
             leave=False, mininterval=1, disable=not progress)
  raws = weights_io.load(path, [{name: (t.nbytes, pieces) for name, (t, pieces) in g.items()} for g in groups], device, bar.update)
  bar.close()
  final = {name: t for g in groups for name, (t, _) in g.items()}
  out = {name: ggml_data_to_tensor(raws[name], math.prod(t.shape), t.ggml_type).reshape(t.shape) for name, t in final.items()}
  native = {name: out[name].contiguous() for name, t in final.items() if t.ggml_type in _GGML_NATIVE}
  if native: Tensor.realize(*native.values())
  return {**out, **native}

# ***** numerics *****

@dataclass(frozen=True)
class Numerics:
  """The dtype of every value in the model, in one place.
  act:   what a matmul's activation is rounded to, once, where it is stored (act_norm's rows, a decode step's
         silu(gate) * up); the weight is read as it dequantizes (float32) and the products summed in out, unless out is
         act (then both are act, summed in float32). An input a matmul reads as a float32 row or computes itself (a MoE
         block's norm, which the router reads too; the q_a norm recomputed in q_b; the absorbed q, 46 KB a block)
         is not rounded: tinygrad's codegen folds x.cast(half).cast(float) back to x. (The absorbed q stored rounded
         took passes on 1.2x further from float64 than off, whose codegen folded that rounding away: LOG.md 2026-12-07d)
  out:   everything else: the residual stream, what each matmul returns, norm outputs, rope, the MoE's expert weights
         and weighted sum. Norm statistics, the router's input, logits and scores, attention's scores and softmax, and
         the output logits are float32 in every policy.
  cache: the KV cache (its rows are read as the attention matmuls' activations)"""
  act: DType; out: DType; cache: DType

NUMERICS = {
  # the default: a float32 residual stream and float32 matmul outputs; fp16 only where a matmul reads its input, rounded
  # once, and the KV cache (llama.cpp keeps activations in float32 and rounds a matvec's input to 8-bit blocks)
  "mixed": Numerics(act=dtypes.float16, out=dtypes.float32, cache=dtypes.float16),
  # everything fp16 (the model up to Dec 2026: it drifts 6-69% from float64 at full size), for comparison
  "float16": Numerics(act=dtypes.float16, out=dtypes.float16, cache=dtypes.float16),
  "float32": Numerics(act=dtypes.float32, out=dtypes.float32, cache=dtypes.float32),
}

# ***** layers *****

def rms_norm(x:Tensor, w:Tensor, eps:float, out:DType|None=None) -> Tensor:
  # in float32: the sum of squares of fp16 activations overflows and loses precision
  xf = x.float()
  return (xf * (xf.square().mean(-1, keepdim=True) + eps).rsqrt() * w.float()).cast(out or x.dtype)

def act_norm(x:Tensor, w:Tensor, eps:float, n:Numerics) -> Tensor:
  """rms_norm for a row only matmuls read: rounded to n.act where it is computed (what they would round it to), so each
  reads act's bytes (realized: tinygrad would store the float32 row and leave the cast to every reader)."""
  return rms_norm(x, w, eps, n.act).contiguous()

def linear(x:Tensor, w:Tensor, n:Numerics, out:DType|None=None) -> Tensor:
  """x @ w.T with x rounded to n.act, returned in out (n.out). Where out is wider than act the products are out's: the
  weight is read as it dequantizes (float32, exact), x widened from its rounded value, so a quant block's scale is a
  factor the hoist pass takes out of the block's sum. Where they agree (all fp16) both are rounded to act."""
  out = out or n.out
  if out == n.act: return x.cast(n.act) @ w.cast(n.act).transpose(-1, -2)
  return x.cast(n.act).cast(out) @ w.cast(out).transpose(-1, -2)

# A product of at least STAGE_ROWS rows (a long prefill chunk) reads its weight dequantized into n.act once, realized:
# the product then has one reduce over the inputs (a quant block's split into blocks x elements keeps tinygrad's tensor
# cores off) and act x act products accumulated in n.out, on the tensor cores. llama.cpp's batched path likewise
# dequantizes to fp16 for cuBLAS. The weight is rounded to act once (a Q4_0 scale times its nibble can need 14 bits).
# Staged, not read as it dequantizes inside the tensor-core tiles (the quant_gemm pass's kernels): a 512-token chunk
# 247 ms against 514 (H100, LOG.md 2026-12-07d)
STAGE_ROWS = 128

def stage(w:Tensor, n:Numerics) -> Tensor: return w.cast(n.act).contiguous()

def staged_linear(x:Tensor, ws:Tensor, n:Numerics, out:DType|None=None) -> Tensor:
  """x @ ws.T for a weight staged in n.act: act x act products summed in out (a half matmul sums in float already)."""
  out = out or n.out
  return x.cast(n.act).matmul(ws.transpose(-1, -2), dtype=None if out == n.act else out)

def matmul_for(rows:int, n:Numerics):
  """linear, or through a staged weight where a product has STAGE_ROWS rows or more: f(x, w, out=None)."""
  if rows >= STAGE_ROWS: return lambda x, w, out=None: staged_linear(x, stage(w, n), n, out)
  return lambda x, w, out=None: linear(x, w, n, out)

def staged_input(x:Tensor, rows:int, n:Numerics) -> Tensor:
  """x as a staged product (rows >= STAGE_ROWS) reads it: rounded to act and realized. Left lazy, its own work is done
  inside the product's tiles, once for every tile of output columns (silu(gate) * up), or its layout keeps the tensor
  cores off (merged_heads)."""
  return x.cast(n.act).contiguous() if rows >= STAGE_ROWS else x

def merged_heads(out:Tensor, n:Numerics) -> Tensor:
  """(B, H, T, v) per-head outputs -> (B, T, H*v), the output projection's input. Staged with the heads side by side:
  left lazy, tinygrad merges the heads into the next product's reduce and the per-head product's columns, where they
  are no batch axis, and neither product gets tensor cores."""
  B, H, T, v = out.shape
  return staged_input(out.transpose(1, 2), T, n).reshape(B, T, H * v)

def rope(x:Tensor, cos:Tensor, sin:Tensor) -> Tensor:
  # NORM (GPT-J style) rotation of consecutive pairs, as llama.cpp's LLAMA_ROPE_TYPE_NORM; cos/sin broadcast over x[..., ::2]
  a, b = (xp := x.float().reshape(*x.shape[:-1], -1, 2))[..., 0], xp[..., 1]
  return Tensor.stack(a * cos - b * sin, a * sin + b * cos, dim=-1).flatten(-2).cast(x.dtype)

def causal_mask(T:int, start_pos:int|UOp, S:int|UOp|None=None) -> Tensor:
  """(T, S): -inf where query t (at position start_pos+t) would see a later position; S (default start_pos+T) and
  start_pos may be symbolic."""
  return (Tensor.arange(T).unsqueeze(-1) + start_pos < Tensor.arange(start_pos + T if S is None else S)).where(float("-inf"), 0.0)

def topk_ids(x:Tensor, k:int) -> Tensor:
  # ids of the k largest along the last axis, largest first, ties to the lower id. Ranks by pairwise comparison (as
  # tinygrad.llm's pairwise_topk): a couple of small fused kernels, where Tensor.topk's sort is a dozen
  i = Tensor.arange(n := x.shape[-1])
  beats = (x.unsqueeze(-2) > x.unsqueeze(-1)) | ((x.unsqueeze(-2) == x.unsqueeze(-1)) & (i.unsqueeze(-1) > i))  # [.., i, j]: j ranks above i
  rank = beats.sum(-1)
  return (rank.unsqueeze(-1) == Tensor.arange(k)).where(i.unsqueeze(-1), 0).sum(-2).cast(dtypes.int32)

def experts(w:Tensor, sel:Tensor, x:Tensor, n:Numerics) -> Tensor:
  # w: (n_experts, out, in), sel: (B, T, k), x: (B, T, 1|k, in) -> (B, T, k, out). As tinygrad.llm's ExpertWeights: the
  # expert id feeds the gather inside the matmul, and the result is its own kernel (not fused with the next matmul)
  return linear(x.unsqueeze(-2), w[sel], n).contiguous().squeeze(-2)

def tile_rows(T:int) -> int:
  """Rows of a grouped expert tile: small for a short chunk (each tile's unused rows are work for nothing)."""
  return 16 if T <= 32 else 64

def group_by_expert(sel:Tensor, n_experts:int, M:int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
  """The A = T*k (token, choice) assignments of sel (T, k) sorted by expert into tiles of M rows on the device: each
  tile holds one expert's assignments (padded), so a tile's matmul reads that expert's weight once for up to M tokens.
  Returns (tile_expert (NT,): n_experts for a tile no assignment needs, slot_token (NT*M,), slot_used (NT*M,) bool,
  slot (A,): where each assignment went)."""
  A = sel.numel()
  NT = (A + M - 1) // M + n_experts  # the most tiles: every expert's last tile part-filled
  flat = sel.reshape(A).contiguous()  # one axis: first[flat] a direct index, the ranks' reduce one axis (long_reduce's lanes)
  hot = flat.unsqueeze(-1) == Tensor.arange(n_experts)                                          # (A, E)
  counts = hot.sum(0)
  tiles = (counts + M - 1) // M                                                                  # (E,)
  first = (tiles.cumsum() - tiles).contiguous()                                                  # each expert's first tile
  # each assignment's rank among its expert's: the earlier ones of the same expert, A x A compares in a kernel of its own
  # (a cumsum of hot down its rows reduced over up to A for each of A x E outputs: 43 us a block at 512 tokens, H100)
  i = Tensor.arange(A)
  rank = ((flat.unsqueeze(0) == flat.unsqueeze(-1)) & (i.unsqueeze(0) < i.unsqueeze(-1))).sum(-1).contiguous()
  slot = (first[flat] * M + rank).cast(dtypes.int32).contiguous()                                # (A,)
  t = Tensor.arange(NT).unsqueeze(-1)
  owner = (first <= t) & (t < first + tiles)                                                     # (NT, E)
  # a tile no assignment needs still runs its product, but reads nothing: its rows' loads are gated off by slot_used,
  # and it names no expert (n_experts: a gather past the end reads zeros, its loads gated off by the index's range check)
  tile_expert = owner.any(-1).where(owner.where(Tensor.arange(n_experts), 0).sum(-1), n_experts).cast(dtypes.int32)
  # each slot's assignment + 1, 0 where none: one reduce over the (NT*M, A) matches gives both the slot's use and token
  filled = ((slot == Tensor.arange(NT * M).unsqueeze(-1)).where(Tensor.arange(1, A + 1), 0).sum(-1)).contiguous()
  slot_used, slot_token = filled > 0, ((filled - 1).maximum(0) // sel.shape[-1]).cast(dtypes.int32)
  return tile_expert.contiguous(), slot_token, slot_used, slot

def grouped_experts(x:Tensor, sel:Tensor, weights:Tensor, gate_up:tuple[Tensor, ...], down:Tensor, ffn:int, n:Numerics) -> Tensor:
  """The MoE of T > 1 tokens, x (T, dim), sel and weights (T, k): grouped by expert (group_by_expert), each tile one
  matmul against its expert's weights, the results gathered back per assignment and weighed."""
  T, k = sel.shape
  M = tile_rows(T)
  tile_expert, slot_token, slot_used, slot = group_by_expert(sel, down.shape[0], M)
  xs = slot_used.unsqueeze(-1).where(x[slot_token], 0).reshape(-1, M, x.shape[-1])               # (NT, M, dim)
  # each tile's expert weight: gathered from the lazy dequant, or from every expert staged once (matmul_for)
  def tiled(x, w): return staged_linear(x, stage(w, n)[tile_expert], n) if T >= STAGE_ROWS else linear(x, w[tile_expert], n)
  gate, up = projections(xs, gate_up, (ffn,) * 2, lambda x, w: tiled(x, w).contiguous())
  ys = tiled(staged_input(gate.silu() * up, T, n), down).reshape(-1, down.shape[1])              # (NT*M, dim)
  return (ys[slot].reshape(T, k, -1) * weights.unsqueeze(-1)).sum(-2)

def projections(x:Tensor, ws:tuple[Tensor, ...], sizes:tuple[int, ...], f) -> list[Tensor]:
  """f(x, w) for each projection, `sizes` wide: one product with the stacked weight (one kernel), split, or one each."""
  return [f(x, w) for w in ws] if len(ws) == len(sizes) else list(f(x, ws[0]).split(list(sizes), dim=-1))

# a projection's output, realized: several consumers read it (each would recompute the matmul), and a stacked product
# is only split after it (as tinygrad.llm's ffn: this keeps gate's and up's matmuls out of one two-reduce kernel)
def linear_out(mm): return lambda x, w: mm(x, w).contiguous()

def ffn(x:Tensor, gate_up:tuple[Tensor, ...], down:Tensor, n:Numerics) -> Tensor:
  mm = matmul_for(x.shape[-2], n)
  gate, up = projections(x, gate_up, (down.shape[-1],) * 2, linear_out(mm))
  return mm(staged_input(gate.silu() * up, x.shape[-2], n), down)

class Block:
  def __init__(self, cfg:Config, w:dict[str, Tensor], i:int, max_context:int, n:Numerics):
    self.cfg, self.n, p = cfg, n, f"blk.{i}."
    def g(name): return w[p + name]
    self.attn_norm, self.ffn_norm = g("attn_norm.weight"), g("ffn_norm.weight")
    # the stacked projections of load_weights where it stacked them (STACKED), else the GGUF's own
    def pair(stacked, a, b): return (w[p + stacked],) if p + stacked in w else (g(a), g(b))
    self.q_a_kv_a = pair("attn_q_a_kv_a.weight", "attn_q_a.weight", "attn_kv_a_mqa.weight")
    self.q_a_norm, self.q_b = g("attn_q_a_norm.weight"), g("attn_q_b.weight")
    self.kv_a_norm, self.attn_out = g("attn_kv_a_norm.weight"), g("attn_output.weight")
    self.k_b, self.v_b = g("attn_k_b.weight"), g("attn_v_b.weight")  # llama.cpp's split of attn_kv_b
    self.moe = i >= cfg.n_dense
    if not self.moe: self.gate_up, self.down = pair("ffn_gate_up.weight", "ffn_gate.weight", "ffn_up.weight"), g("ffn_down.weight")
    else:
      self.router, self.router_bias = g("ffn_gate_inp.weight"), w.get(p + "exp_probs_b.bias")
      self.gate_up_exps = pair("ffn_gate_up_exps.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight")
      self.down_exps = g("ffn_down_exps.weight")
      # load_weights appended the shared expert to the routed ones (SHARED_INTO): it is expert n_experts
      self.shared_in_experts = cfg.n_shared > 0 and self.down_exps.shape[0] == cfg.n_experts + 1
      if cfg.n_shared and not self.shared_in_experts:
        self.gate_up_sh, self.down_sh = pair("ffn_gate_up_shexp.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight"), g("ffn_down_shexp.weight")
    # the compressed KV cache: per position [kv_c (kv_lora, normed) ; k_pe (qk_rope, roped)]
    # (cache_rows: a padded prefill chunk's extra positions past max_context, up to a KV_BLOCK boundary)
    self.cache = Tensor.zeros(1, cache_rows(max_context), cfg.kv_lora + cfg.qk_rope, dtype=n.cache).contiguous().realize()

  def attention(self, x:Tensor, start_pos:int|UOp, cos:Tensor, sin:Tensor, kv_len:UOp|None=None) -> Tensor:
    c, n, (B, T, _) = self.cfg, self.n, x.shape
    mm = matmul_for(T, n)
    q_a, kv = projections(x, self.q_a_kv_a, (c.q_lora, c.kv_lora + c.qk_rope), linear_out(mm))
    q = mm(rms_norm(q_a, self.q_a_norm, c.eps), self.q_b)
    q = q.reshape(B, T, c.n_heads, c.qk_nope + c.qk_rope).transpose(1, 2)                        # (B, H, T, nope+rope)
    q_nope, q_pe = q[..., :c.qk_nope], rope(q[..., c.qk_nope:], cos, sin)
    q = mm(q_nope, self.k_b).cat(q_pe, dim=-1)                                                     # absorbed: (B, H, T, kv_lora+rope)
    kv = rms_norm(kv[..., :c.kv_lora], self.kv_a_norm, c.eps).cat(rope(kv[..., c.kv_lora:], cos, sin), dim=-1)
    self.cache[:, start_pos:start_pos+T].assign(kv.cast(self.cache.dtype))
    S = start_pos + T if kv_len is None else kv_len  # a long chunk's keys: KV_BLOCK-aligned, the rows past it masked
    keys = self.cache[:, :S].unsqueeze(1)                                                          # (B, 1, S, kv_lora+rope)
    # scores come out in float32 (float accumulation): q.k over 576 latent dims can pass fp16's range
    scale = 1.0 / math.sqrt(c.qk_nope + c.qk_rope)
    if kv_len is None:
      scores = linear(q, keys, n, dtypes.float32) * scale                                           # (B, H, T, S)
      if T > 1: scores = scores + causal_mask(T, start_pos)                                         # T > 1 only at prefill
      latent = linear(scores.softmax(-1), keys[..., :c.kv_lora].transpose(-1, -2), n)             # (B, H, T, kv_lora)
    else:  # both products on the tensor cores: act x act summed in float32, the probs rounded to act
      scores = staged_linear(staged_input(q, T, n), keys, n, dtypes.float32) * scale
      probs = staged_input((scores + causal_mask(T, start_pos, S)).softmax(-1), T, n)
      latent = staged_linear(probs, keys[..., :c.kv_lora].transpose(-1, -2), n)
    return mm(merged_heads(mm(latent, self.v_b), n), self.attn_out)                                # heads (B, H, T, v_head)

  def moe_ffn(self, x:Tensor, trace:dict|None=None) -> Tensor:
    """The MoE FFN of x (float32: the router reads it)."""
    c, n = self.cfg, self.n
    logits = x.float() @ self.router.float().T                       # the router in float32: near-ties decide the experts
    scores = logits.sigmoid() if c.gating == SIGMOID else logits.softmax(-1)
    sel = topk_ids(scores if self.router_bias is None else scores + self.router_bias.float(), c.n_used)  # (B, T, k)
    if trace is not None: trace["experts"].append(sel[0, -1])
    weights = scores.gather(-1, sel)
    if c.expert_norm: weights = weights / weights.sum(-1, keepdim=True)
    weights = (weights * c.expert_scale).cast(n.out)
    if self.shared_in_experts:  # every token selects the shared expert too, with weight 1
      # (a pad, not a cat with a constant tensor: tinygrad would realize that constant, a kernel each)
      sel = sel.pad(((0, 0),) * (sel.ndim - 1) + ((0, 1),), value=c.n_experts)
      weights = weights.pad(((0, 0),) * (weights.ndim - 1) + ((0, 1),), value=1.0)
    if x.shape[1] > 1:  # a prefill chunk: its tokens grouped by expert, each expert's weights read once a tile
      out = grouped_experts(x[0], sel[0], weights[0], self.gate_up_exps, self.down_exps, c.expert_ffn, n).unsqueeze(0)
      return out + ffn(x, self.gate_up_sh, self.down_sh, n) if c.n_shared and not self.shared_in_experts else out
    h = x.unsqueeze(-2)                                                                            # (B, T, 1, dim)
    gate, up = projections(h, self.gate_up_exps, (c.expert_ffn,) * 2, lambda x, w: experts(w, sel, x, n))
    # rounded to act once, in one small kernel: read lazily, every row group of the down matvec would recompute its float32
    # silus (H100, Q4_0 mix: decode 338 -> 369 tok/s realized, logits still within 1.5e-3 of float64)
    act = (gate.silu() * up).cast(n.act).contiguous()                                              # (B, T, k, expert_ffn)
    out = (experts(self.down_exps, sel, act, n) * weights.unsqueeze(-1)).sum(-2)                   # (B, T, dim)
    if c.n_shared and not self.shared_in_experts: out = out + ffn(x, self.gate_up_sh, self.down_sh, n)
    return out

  def __call__(self, x:Tensor, start_pos:int|UOp, cos:Tensor, sin:Tensor, trace:dict|None=None, kv_len:UOp|None=None) -> Tensor:
    c, n = self.cfg, self.n
    h = x + self.attention(act_norm(x, self.attn_norm, c.eps, n), start_pos, cos, sin, kv_len)
    # a MoE block's norm stays float32 (the router reads it; so do the experts, see Numerics.act). The experts reading
    # it rounded to act, the router a float32 norm of its own, decoded 5% faster and 1.2x further from float64 (H100,
    # logits 1.5e-3 -> 1.8e-3, LOG.md 2026-12-07d): not taken
    if self.moe: out = h + self.moe_ffn(rms_norm(h, self.ffn_norm, c.eps), trace)
    else: out = h + ffn(act_norm(h, self.ffn_norm, c.eps, n), self.gate_up, self.down, n)
    if trace is not None: trace["hidden"].append(out[0, -1])
    return out

# ***** sampling *****

@dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: greedy (temperature 0: exactly the argmax), else from softmax(logits / temperature)
  restricted to the top_k most likely tokens (0: all) and to the fewest most likely whose probability reaches top_p."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

PROBES, ROUNDS = 32, 5  # a threshold search: 32 candidates a round, each round 32x narrower (32^5: 3e-8 of the range)

def largest_threshold(x:Tensor, reaches) -> Tensor:
  """The largest t (within (max - min) * PROBES^-ROUNDS) with reaches(x >= t) true, where reaches is monotone (true
  at t = min(x)): a few reduces over the vocab instead of a sort (a bitonic sort of 154,880 logits is ~170 kernels)."""
  lo = x.min().contiguous()
  width = (x.max() - lo).contiguous()
  steps = Tensor.arange(1, PROBES + 1, dtype=dtypes.float32) / PROBES
  for _ in range(ROUNDS):
    taus = lo + width * steps                                                # (PROBES,)
    # each probe's verdict realized: its reduce over the vocab is then a kernel of its own, spread over lanes, where
    # inside the count over probes one thread of the combining kernel summed every probe's partial sums in turn
    n_ok = reaches(x.unsqueeze(-2) >= taus.unsqueeze(-1)).contiguous().sum()  # taus are increasing: the first n_ok reach
    # contiguous: else each round's kernel recomputes every earlier round's count (vocab^rounds work)
    lo, width = (lo + width * n_ok.cast(dtypes.float32) / PROBES).contiguous(), width / PROBES
  return lo

# a top-p draw (without top-k) is a rejection: candidates(top_p) draws from the whole softmax, the first inside the nucleus
# taken. Each lands inside with probability >= top_p, so all miss with probability <= P_MISS (then: the most likely
# token, always inside). Where that needs more than MAX_CANDIDATES draws (top_p <= 0.72), the threshold search instead
P_MISS, MAX_CANDIDATES = 1e-9, 16
def candidates(top_p:float) -> int: return max(1, math.ceil(math.log(P_MISS) / math.log1p(-top_p)))

def gumbel(*shape) -> Tensor: return -(-Tensor.rand(*shape).clip(1e-20, 1.0).log()).log()

def nucleus_draw(x:Tensor, top_p:float, k:int) -> Tensor:
  """A draw from softmax(x) within its nucleus (the fewest most likely tokens whose probability reaches top_p), by
  rejection: k draws from the whole softmax at once (Gumbel-max), each kept if the tokens more likely than it hold less
  than top_p. A few reduces over the vocab, where the threshold search takes 5 rounds of 3 kernels."""
  # in unnormalized weights e = exp(x - max): the mass above a draw, below top_p of the whole (no softmax over the
  # vocab is stored: one workgroup would write it)
  e = (x - x.max()).exp()
  draws = (x + gumbel(k, x.shape[0])).argmax(-1)                                        # (k,) independent draws
  # the drawn logits realized first: inside the mass's reduce, each of its workgroups gathered them again (a reduce over
  # the vocab) and then summed its share of the vocab in one serial loop (40 us on an H100, 1.3% of a token)
  chosen = x[draws].contiguous()
  inside = (x > chosen.unsqueeze(-1)).where(e, 0).sum(-1) < top_p * e.sum()            # (k,) the mass above each < top_p
  first = (inside.any()).where(inside.argmax(), -1)
  return (first >= 0).where((first.unsqueeze(-1) == Tensor.arange(k)).where(draws, 0).sum(), x.argmax()).reshape(1, 1).cast(dtypes.int32)

def sample(logits:Tensor, s:Sampling) -> Tensor:
  """logits (1, vocab) float32 -> the chosen token (1, 1) int32, on the device: top-k and top-p as thresholds on the
  scaled logits, then the Gumbel-max trick (argmax of logits / temperature plus Gumbel noise is a draw from the softmax);
  top-p alone by rejection (nucleus_draw)."""
  if s.temperature <= 0: return logits.argmax(-1, keepdim=True).cast(dtypes.int32)
  x = (logits / s.temperature)[0]
  if s.top_k == 0 and s.top_p < 1.0 and (k := candidates(s.top_p)) <= MAX_CANDIDATES: return nucleus_draw(x, s.top_p, k)
  keep = x >= x.min()
  if s.top_k > 0: keep = keep & (x >= largest_threshold(x, lambda m: m.sum(-1) >= s.top_k))
  if s.top_p < 1.0:
    p = x.softmax(-1).contiguous()  # once, not inside every probe's count
    keep = keep & (x >= largest_threshold(x, lambda m: (m.where(p, 0)).sum(-1) >= s.top_p))
  return keep.where(x + gumbel(*x.shape), float("-inf")).argmax(-1).reshape(1, 1).cast(dtypes.int32)

class GLM:
  def __init__(self, cfg:Config, w:dict[str, Tensor], max_context:int|None=None, numerics:str="mixed"):
    self.cfg, self.numerics, self.n = cfg, numerics, NUMERICS[numerics]
    self.max_context = min(max_context or 4096, cfg.context)
    self.token_embd, self.output_norm = w["token_embd.weight"], w["output_norm.weight"]
    self.output = w.get("output.weight", self.token_embd)  # tied embeddings when the GGUF has no output
    self.blk = [Block(cfg, w, i, self.max_context, self.n) for i in range(cfg.n_blocks)]
    # rope tables cos/sin(pos * theta_i), theta_i = base^(-2i/n_rot), computed once on the host in float64 (an arange
    # expression stays lazy in tinygrad: it would be recomputed, with float32 sin, in every kernel that reads it)
    ang = np.arange(self.max_context + max(CHUNKS), dtype=np.float64)[:, None] * cfg.rope_theta ** (-np.arange(0, cfg.qk_rope, 2) / cfg.qk_rope)
    self.cos, self.sin = Tensor(np.cos(ang).astype(np.float32)).realize(), Tensor(np.sin(ang).astype(np.float32)).realize()
    self.start_pos, self.token = UOp.variable("start_pos", 0, self.max_context - 1), UOp.variable("token", 0, cfg.vocab - 1)
    # the decode step's input token: an id the host gives, or -1 for the one the step before it wrote into the ring
    # (ring[p]: the token at position p), so steps can be launched before the host has read their tokens (decode_ahead)
    self.fed = UOp.variable("fed", -1, cfg.vocab - 1)
    # a long chunk's keys: (kv_extra_blocks + 1) * KV_BLOCK rows. Not a kv_blocks >= 1: tinygrad's CUDA graph builds its
    # nodes with every variable at 0, whatever its range, and a kernel over 0 rows is a launch the driver refuses
    self.kv_extra_blocks = UOp.variable("kv_extra_blocks", 0, cache_rows(self.max_context) // KV_BLOCK - 1)
    self.ring = Tensor(np.zeros(self.max_context + 1, np.int32)).realize()
    # how each JIT is made, from what names it ({"jit": its kind, its sampling}) and its step: run.py's JitStore keeps
    # their captures on disk across runs
    self.make_jit: Callable[[dict, Callable], TinyJit] = lambda what, fxn: TinyJit(fxn)

  def state(self) -> dict[str, Tensor]:
    """Every tensor the model holds (weights, KV caches, rope tables) by a name that loading the same file gives it."""
    named = {"token_embd": self.token_embd, "output_norm": self.output_norm, "output": self.output, "rope.cos": self.cos, "rope.sin": self.sin,
             "ring": self.ring}
    for i, b in enumerate(self.blk):
      for k, v in vars(b).items():  # a tensor, or a pair of projections (or their stacked one)
        named.update({f"blk.{i}.{k}#{j}": t for j, t in enumerate(v if isinstance(v, tuple) else (v,)) if isinstance(t, Tensor)})
    return named

  def forward(self, tokens:list[int]|UOp|Tensor, start_pos:int|UOp, trace:dict|None=None, last:int|UOp=-1, kv_len:UOp|None=None) -> Tensor:
    """tokens at positions start_pos.. -> float32 logits of position `last` of them (1, vocab). tokens are python ints,
    one bound Variable (decode: one JIT serves every token; a lookup is a shrink that reads one row), or a (1, T) int32
    Tensor (a prefill chunk: a gather of T rows). With a trace ({"hidden": [], "experts": []}), each block appends the
    last position's hidden state after it, each MoE block its chosen experts (the numerics check; realizing them
    changes the schedule, so a traced step is not the decode step's program). kv_len (a multiple of KV_BLOCK past the
    last position, a long chunk's: prefill) puts attention's products on the tensor cores."""
    if isinstance(tokens, Tensor): x = self.token_embd[tokens[0]].unsqueeze(0).cast(self.n.out)                # (1, T, dim)
    else: x = Tensor.stack(*[self.token_embd[t] for t in (tokens if isinstance(tokens, list) else [tokens])]).unsqueeze(0).cast(self.n.out)
    T = x.shape[1]
    cos, sin = self.cos[start_pos:start_pos+T].unsqueeze(0), self.sin[start_pos:start_pos+T].unsqueeze(0)
    for blk in self.blk: x = blk(x, start_pos, cos, sin, trace, kv_len)
    x = x[:, -1] if isinstance(last, int) and last in (-1, T - 1) else x.shrink((None, (last, last + 1), None))[:, 0]
    x = act_norm(x, self.output_norm, self.cfg.eps, self.n)
    return linear(x, self.output, self.n, dtypes.float32)  # float32 logits: fp16 rounding would decide near-ties

  def step(self, tokens:list[int]|UOp|Tensor, start_pos:int|UOp, sampling:Sampling=Sampling(), last:int|UOp=-1,
           kv_len:UOp|None=None) -> tuple[Tensor, Tensor]:
    """One forward: (next token (1, 1) int32, greedy unless sampling says otherwise; logits (1, vocab) float32)."""
    logits = self.forward(tokens, start_pos, last=last, kv_len=kv_len)
    return sample(logits, sampling), logits

  def decoder(self, sampling:Sampling=Sampling()) -> TinyJit:
    """A fresh TinyJit of the one-token decode step (its sampling inside): call it with (self.fed.bind(id or -1),
    self.start_pos.bind(pos)). It writes its token into ring[pos + 1] as well. A sampling one draws from tinygrad's
    device RNG (Tensor.manual_seed fixes it)."""
    return self.make_jit(jit_name("decode", sampling), lambda fed, start_pos: self.ring_step(fed, start_pos, sampling))

  def ring_token(self, fed:UOp, start_pos:UOp) -> Tensor:
    """The decode step's input token (1, 1): fed, or ring[start_pos] where fed is -1 (lazy)."""
    given = Tensor(fed)
    return (given >= 0).where(given, self.ring[start_pos:start_pos+1].reshape(())).reshape(1, 1)

  def ring_step(self, fed:UOp, start_pos:UOp, sampling:Sampling=Sampling()) -> tuple[Tensor, Tensor]:
    """The decode step: the token at start_pos (fed, or ring[start_pos] where fed is -1) in, the next token out (also
    written into ring[start_pos + 1]) with its logits."""
    nxt, logits = self.step(self.ring_token(fed, start_pos), start_pos, sampling)
    # the ring written after: in the same realize as nxt, tinygrad's schedule computed the whole step twice
    Tensor.realize(nxt, logits)
    self.ring[start_pos+1:start_pos+2].assign(nxt.reshape(1)).realize()
    return nxt, logits

  def prefiller(self, sampling:Sampling=Sampling(), decoder:TinyJit|None=None) -> Prefill:
    """Fresh prefill JITs (one per chunk length, compiled on first use), choosing the next token as sampling says; with
    the decode step's JIT (of the same sampling), a prompt's tokens short of a chunk go through it instead."""
    return Prefill(self, sampling, decoder)

  def prefill(self, tokens:list[int], start_pos:int=0) -> tuple[int, Tensor]:
    """Runs tokens at positions start_pos.. through a fresh prefiller; returns (next token, its logits)."""
    return self.prefiller()(tokens, start_pos)

  def decode(self, jit:TinyJit, token:int, pos:int) -> tuple[int, Tensor]:
    """One decode step of token at pos, waited on: (the next token, its logits)."""
    tok, logits = jit(self.fed.bind(token), self.start_pos.bind(pos))
    return int(tok.item()), logits

  def decode_ahead(self, jit:TinyJit, token:int, pos:int, n:int) -> list[int]:
    """n decode steps from token at pos, each launched without waiting for the one before (its token stays on the
    device, in the ring), then read at once: the tokens at positions pos+1 .. pos+n. The host's work for a step (the
    JIT call, the graph's parameter updates) overlaps the device's work on the steps before it."""
    if not 1 <= n <= self.max_context - pos: raise ValueError(f"{n} steps at {pos} do not fit the context")
    for i in range(n): jit(self.fed.bind(token if i == 0 else -1), self.start_pos.bind(pos + i))
    return [int(t) for t in self.ring.numpy()[pos + 1:pos + n + 1]]

def jit_name(kind:str, sampling:Sampling) -> dict:
  """What names a JIT of the model: its kind and its sampling (baked into its kernels); sampled: it draws from the RNG."""
  return {"jit": kind, "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p, "sampled": sampling.temperature > 0}

# a prompt goes through the model in chunks of these lengths, each a TinyJit compiled once: the largest that the
# remaining tokens fill, else the smallest, padded (its extra positions write KV rows past the prompt, which a later
# step overwrites before any query reads them; the cache has room for them past max_context)
CHUNKS = (32, 512)
# with the decode step at hand, a prompt goes in chunks of the longest length, the last padded where at least PAD_MIN
# tokens are left; fewer go through the decode step, one token a call (H100, Q4_0 mix: a 512-token chunk 0.32 s, a
# decode step 3.1 ms, so ~100 tokens cost one chunk; a 32-token chunk took 0.47 s, more than its 32 decode steps)
PAD_MIN = 96
# a chunk of at least STAGE_ROWS tokens attends to the cache rows up to the next multiple of KV_BLOCK past it (the rest
# masked): a length tinygrad can split into tensor-core tiles, where start_pos + T cannot be (symbolic, any value)
KV_BLOCK = 512

def long_chunk_keys(kv_extra_blocks:UOp) -> UOp:
  """The cache rows a long chunk attends to (model.kv_extra_blocks bound by the host: at least one KV_BLOCK)."""
  return (kv_extra_blocks + 1) * KV_BLOCK

def cache_rows(max_context:int) -> int:
  """The KV cache's rows: max_context, a padded chunk's extra positions past it, and up to a KV_BLOCK boundary."""
  return -(-(max_context + max(CHUNKS)) // KV_BLOCK) * KV_BLOCK

def chunks(n:int) -> list[int]:
  """The chunk lengths that cover n tokens."""
  out = []
  while n > 0:
    out.append(size := max([c for c in CHUNKS if c <= n], default=min(CHUNKS)))
    n -= size
  return out

def plan(n:int) -> tuple[list[int], int]:
  """(chunk lengths, decode steps) for n tokens where the decode step is at hand (see PAD_MIN)."""
  whole, rest = divmod(n, max(CHUNKS))
  return [max(CHUNKS)] * whole + ([max(CHUNKS)] if rest >= PAD_MIN else []), (rest if rest < PAD_MIN else 0)

class Prefill:
  """A prompt's tokens through the model in chunks (CHUNKS): the same JIT for every chunk of a length, its start
  position and the index of its last real token symbolic. With a decoder, chunks of the longest length and fewer than
  PAD_MIN tokens left (a short prompt, a chat turn) through the decode step one at a time (plan): a chunk's JIT takes
  longer to build than the decode step's, and computes a whole chunk for what may be a few tokens."""
  def __init__(self, model:GLM, sampling:Sampling, decoder:TinyJit|None=None):
    self.model, self.sampling, self.decoder, self.jits = model, sampling, decoder, {}
    self.last = {T: UOp.variable(f"last{T}", 0, T - 1) for T in CHUNKS}

  def jit(self, T:int) -> TinyJit:
    """The JIT of T-token chunks, made on first use (a stored one is read only when a prompt needs it)."""
    if T not in self.jits:
      if T >= STAGE_ROWS:
        self.jits[T] = self.model.make_jit(jit_name(f"prefill{T}", self.sampling), lambda tokens, start_pos, last, kv_extra_blocks:
                                           self.model.step(tokens, start_pos, self.sampling, last, long_chunk_keys(kv_extra_blocks)))
      else: self.jits[T] = self.model.make_jit(jit_name(f"prefill{T}", self.sampling), lambda tokens, start_pos, last: self.model.step(tokens, start_pos, self.sampling, last))
    return self.jits[T]

  def args(self, T:int, part:list[int], start_pos:int) -> tuple:
    """What the T-token chunk's JIT is called with for part (at most T tokens, padded) at start_pos."""
    args = (Tensor([part + [0] * (T - len(part))], dtype=dtypes.int32), self.model.start_pos.bind(start_pos), self.last[T].bind(len(part) - 1))
    return args + ((self.model.kv_extra_blocks.bind(-(-(start_pos + T) // KV_BLOCK) - 1),) if T >= STAGE_ROWS else ())

  def __call__(self, tokens:list[int], start_pos:int=0) -> tuple[int, Tensor]:
    """Feeds tokens at positions start_pos..; returns (the token after them, its logits (1, vocab) float32)."""
    if not tokens or start_pos + len(tokens) > self.model.max_context: raise ValueError(f"{len(tokens)} tokens at {start_pos} do not fit the context")
    for T in (plan(len(tokens))[0] if self.decoder is not None else chunks(len(tokens))):
      part, tokens = tokens[:T], tokens[T:]
      tok, logits = self.jit(T)(*self.args(T, part, start_pos))
      start_pos += len(part)
    for t in tokens:  # the rest, through the decode step (its token is read only after the last)
      tok, logits = self.decoder(self.model.fed.bind(t), self.model.start_pos.bind(start_pos))
      start_pos += 1
    return int(tok.item()), logits

def load(path:str|os.PathLike, max_context:int|None=None, numerics:str="mixed", device:str|None=None, progress:bool=False,
         stack:bool=True, shared_in_experts:bool=True) -> tuple[GLM, dict]:
  """Checks the GGUF, copies its tensor bytes to the device and builds the model. Raises GGUFError for files it cannot use."""
  kv, infos = read_header(path)
  cfg = Config.from_gguf(kv, infos)
  # fail before copying gigabytes: the tensors that deepseek2 files of other models (V2-Lite) or older conversions lack
  for name in ("blk.0.attn_q_a.weight", "blk.0.attn_k_b.weight", "output_norm.weight"):
    if name not in infos: raise GGUFError(f"missing tensor {name}")
  w = load_weights(path, infos, device, progress, stack, shared_in_experts)
  try: return GLM(cfg, w, max_context, numerics), kv
  except KeyError as e: raise GGUFError(f"missing tensor {e.args[0]}") from None
