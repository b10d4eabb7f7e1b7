"""An independent float64 numpy forward pass of GLM-4.7-Flash (GGUF arch deepseek2), from the GGUF through the `gguf`
package (GGUFReader + gguf.quants.dequantize): nothing is shared with examples/glm/model.py. Every product and sum is
float64; the weights are their exact dequantized values.

It runs MLA the textbook (non-absorbed) way: per-head keys k_nope = attn_k_b^T kv_c and values v = attn_v_b kv_c are
expanded from the cached latent, so it also checks the model's absorbed form. RoPE is llama.cpp's NORM rope (pairs of
consecutive values). The router takes the top-k of sigmoid(logits) + exp_probs_b and weights the chosen experts by
their sigmoid scores, normalized to sum 1 and scaled by expert_weights_scale.
"""
from __future__ import annotations
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import gguf

class Weights(dict):
  """Whole tensors by name, each dequantized at its first use and kept in float64 (numpy would convert a float32 matrix
  at every product; ~15 GB for the full model). The experts are read by Reference.expert."""
  def __init__(self, ref:Reference): super().__init__(); self.ref = ref
  def __missing__(self, name:str) -> np.ndarray:
    self[name] = self.ref.rows(name).astype(np.float64)
    return self[name]

class Reference:
  """Weights are dequantized as they are first used (a full-size model's experts only as they are selected, and not
  kept), so a 17 GB GGUF runs in a few GB of host memory. After each forward, `trace` holds per block the hidden state
  of the last position after the block and the experts it chose (None for a dense block)."""
  def __init__(self, path:str):
    r = gguf.GGUFReader(path)
    self.kv = {k: f.contents() for k, f in r.fields.items()}
    self.tensors = {t.name: t for t in r.tensors}
    self.w = Weights(self)
    a = self.kv["general.architecture"]
    def k(name, default=None): return self.kv.get(f"{a}.{name}", default)
    self.n_blocks, self.n_dense, self.eps = k("block_count"), k("leading_dense_block_count"), k("attention.layer_norm_rms_epsilon")
    self.n_heads, self.kv_lora, self.rope_dim = k("attention.head_count"), k("attention.kv_lora_rank"), k("rope.dimension_count")
    self.qk_nope = k("attention.key_length_mla") - self.rope_dim
    self.theta, self.n_used = k("rope.freq_base"), k("expert_used_count")
    self.scale, self.norm_w = k("expert_weights_scale"), k("expert_weights_norm")
    self.trace: list[tuple[np.ndarray, np.ndarray|None]] = []
    self.reset()

  def rows(self, name:str, index=None) -> np.ndarray:
    """Tensor `name` in numpy order (dequantized to float32, exact for every GGML type), or its slice [index] along the
    first axis (experts, embedding rows), dequantized alone."""
    t = self.tensors[name]
    shape = tuple(reversed(t.shape.tolist()))  # tensor.shape is ggml's ne (fastest first): numpy order is the reverse
    if index is None: return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    return gguf.quants.dequantize(t.data[index], t.tensor_type).reshape(np.shape(index) + shape[1:])

  def expert(self, name:str, e:int) -> np.ndarray: return self.rows(name, int(e))

  def reset(self):
    self.kv_c = [np.zeros((0, self.kv_lora)) for _ in range(self.n_blocks)]
    self.k_pe = [np.zeros((0, self.rope_dim)) for _ in range(self.n_blocks)]

  def norm(self, x, w): return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

  def rope(self, x, pos):
    # x (..., T, [H,] R): rotate (x[2i], x[2i+1]) by pos * theta^(-2i/R)
    ang = pos[:, None] * self.theta ** (-np.arange(0, self.rope_dim, 2) / self.rope_dim)
    if x.ndim == 3: ang = ang[:, None, :]
    cos, sin, out = np.cos(ang), np.sin(ang), np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out

  def attention(self, i:int, x, pos):
    w, p, H = self.w, f"blk.{i}.", self.n_heads
    q = self.norm(x @ w[p+"attn_q_a.weight"].T, w[p+"attn_q_a_norm.weight"]) @ w[p+"attn_q_b.weight"].T
    q = q.reshape(len(x), H, -1)
    q_nope, q_pe = q[..., :self.qk_nope], self.rope(q[..., self.qk_nope:], pos)
    kv = x @ w[p+"attn_kv_a_mqa.weight"].T
    self.kv_c[i] = np.concatenate([self.kv_c[i], self.norm(kv[:, :self.kv_lora], w[p+"attn_kv_a_norm.weight"])])
    self.k_pe[i] = np.concatenate([self.k_pe[i], self.rope(kv[:, self.kv_lora:], pos)])
    k_nope = np.einsum("hcd,sc->hsd", w[p+"attn_k_b.weight"], self.kv_c[i])  # (H, S, qk_nope)
    v = np.einsum("hvc,sc->hsv", w[p+"attn_v_b.weight"], self.kv_c[i])       # (H, S, v_head)
    scores = (np.einsum("thd,hsd->hts", q_nope, k_nope) + np.einsum("thr,sr->hts", q_pe, self.k_pe[i])) / np.sqrt(q.shape[-1])
    scores = np.where(np.arange(len(self.kv_c[i]))[None, None, :] <= pos[None, :, None], scores, -np.inf)  # causal
    prob = np.exp(scores - scores.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    out = np.einsum("hts,hsv->thv", prob, v).reshape(len(x), -1)
    return out @ w[p+"attn_output.weight"].T

  def mlp(self, x, gate, up, down): return ((s := x @ gate.T) / (1 + np.exp(-s)) * (x @ up.T)) @ down.T

  def moe(self, i:int, x):
    w, p = self.w, f"blk.{i}."
    scores = 1 / (1 + np.exp(-(x @ w[p+"ffn_gate_inp.weight"].T)))                   # (T, n_experts)
    sel = np.argsort(-(scores + w[p+"exp_probs_b.bias"]), axis=-1, kind="stable")[:, :self.n_used]
    # each selected expert's three matrices dequantized once for all tokens, in threads (numpy's work releases the GIL)
    needed = [(m, int(e)) for e in np.unique(sel) for m in ("gate", "up", "down")]
    with ThreadPoolExecutor() as pool: mats = dict(zip(needed, pool.map(lambda me: self.expert(p+f"ffn_{me[0]}_exps.weight", me[1]), needed)))
    out = []
    for xt, st, sc in zip(x, sel, scores):
      wt = sc[st] / (sc[st].sum() if self.norm_w else 1) * self.scale
      out.append(sum(wj * self.mlp(xt, mats[("gate", e)], mats[("up", e)], mats[("down", e)]) for wj, e in zip(wt, st.tolist())))
    return np.stack(out) + self.mlp(x, w[p+"ffn_gate_shexp.weight"], w[p+"ffn_up_shexp.weight"], w[p+"ffn_down_shexp.weight"]), sel[-1]

  def forward(self, tokens:list[int], start_pos:int) -> np.ndarray:
    """Logits (vocab,) of the last of tokens, placed at start_pos..; appends to the cache (positions must follow on)."""
    assert start_pos == len(self.kv_c[0]), "the reference cache holds positions 0..start_pos-1"
    w, pos = self.w, np.arange(start_pos, start_pos + len(tokens), dtype=np.float64)
    x, self.trace = self.rows("token_embd.weight", np.array(tokens)).astype(np.float64), []
    for i in range(self.n_blocks):
      p = f"blk.{i}."
      x = x + self.attention(i, self.norm(x, w[p+"attn_norm.weight"]), pos)
      h = self.norm(x, w[p+"ffn_norm.weight"])
      if i < self.n_dense: f, sel = self.mlp(h, w[p+"ffn_gate.weight"], w[p+"ffn_up.weight"], w[p+"ffn_down.weight"]), None
      else: f, sel = self.moe(i, h)
      x = x + f
      self.trace.append((x[-1].copy(), sel))
    return self.norm(x[-1], w["output_norm.weight"]) @ w["output.weight"].T
