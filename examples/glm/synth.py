"""Writes a GLM-4.7-Flash-architecture GGUF (llama.cpp arch `deepseek2`) with random weights, through the `gguf` package.

  python examples/glm/synth.py tiny /tmp/glm-tiny.gguf --type Q4_0 --seed 0
  python examples/glm/synth.py full /tmp/glm-full.gguf           # real dimensions, ~16.9 GB with Q4_0
  python examples/glm/synth.py full /tmp/glm-q4km.gguf --mix Q4_K_M   # the types llama.cpp's quantizer picks per tensor

Tensors follow llama.cpp's converter: matmul weights in the chosen type (--type, every matmul weight) or in the type
llama.cpp's quantizer picks for each tensor of GLM-4.7-Flash (--mix: third_party/llama.cpp/quant-mixes), norms, router
and selection bias in F32, attn_k_b/attn_v_b as llama.cpp splits attn_kv_b for MLA. Rows whose length a type's block
does not divide fall back to Q8_0 (llama.cpp falls back too: GLM's attn_k_b rows are 192 long, not a multiple of 256
for the K-quants; its mixes give them Q5_0).
Weights have std 1/sqrt(fan_in), so activations stay O(1). Large tensors are drawn row by row from a pool of
pre-quantized random blocks (quantizing 16 GB would take minutes): each row starts at its own random block of the pool
and has its own scale (its blocks' scales times a log-normal factor), so no two rows or experts are alike. Tensors are
streamed to disk one at a time into a temp file that is renamed into place when complete.

Well-conditioned, as a trained model is, so that the float64 check measures rounding and not coin flips:
- the router has margins: every token's embedding carries one of TOPICS = n_experts / n_used orthonormal directions
  (token id mod TOPICS), and each MoE block's router gives the n_used experts of a topic (a random assignment per block)
  a row along that direction, so those experts' logits stand several units above the others' at every depth (their own
  random parts and the selection bias order them among themselves). A router whose top-k is decided by less than
  rounding moves it (random rows: the 4th and 5th of 64 Gaussian logits) would flip an expert, and the block's output
  jumps. Embeddings of a type without a quantizer here (Q5_K, Q6_K) have no topics: their routers are random.
- the output head has std HEAD_STD / sqrt(dim): logits spread over several units, the greedy token decided by far more
  than rounding.

Nothing half-written is left: write() refuses to start where the file system lacks the file's size and a margin
(SynthError), and a failed or interrupted write (Ctrl-C, SIGTERM, SIGHUP; a full disk) removes its temp file. From the
command line such an end is one line on stderr: exit status 2 for a refusal, 128 + the signal's number for a signal.
"""
from __future__ import annotations
import argparse, collections, contextlib, functools, json, math, os, pathlib, shutil, signal, sys, tempfile, threading, time
from dataclasses import dataclass, asdict
import numpy as np
import gguf
from tqdm import tqdm

QT = gguf.GGMLQuantizationType
TYPES = {t.name: t for t in (QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.F16, QT.BF16, QT.F32)}
MIX_DIR = pathlib.Path(__file__).resolve().parents[2] / "third_party" / "llama.cpp" / "quant-mixes"
MIXES = ("Q4_0", "Q4_K_M")  # MIX_DIR/types-{name}.json: tensor name -> ggml type name
ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]  # "deepseek2"

@dataclass(frozen=True)
class Dims:
  n_blocks: int; n_dense: int; dim: int; ffn: int; expert_ffn: int; n_experts: int; n_used: int; n_shared: int
  n_heads: int; q_lora: int; kv_lora: int; qk_nope: int; qk_rope: int; v_head: int; vocab: int; context: int
  eps: float = 1e-5; rope_theta: float = 1e6; expert_scale: float = 1.8

PRESETS = {
  # every tensor kind, row lengths multiples of 256 so the K-quants apply (attn_k_b falls back, as in the real model)
  "tiny": Dims(n_blocks=3, n_dense=1, dim=256, ffn=512, expert_ffn=256, n_experts=8, n_used=2, n_shared=1, n_heads=4,
               q_lora=256, kv_lora=256, qk_nope=64, qk_rope=32, v_head=64, vocab=512, context=4096),
  # between the two: 8 blocks at dim 512, 16 experts (4 used), enough to show the fp16 drift (tests/test_numerics.py)
  "deep": Dims(n_blocks=8, n_dense=1, dim=512, ffn=1024, expert_ffn=256, n_experts=16, n_used=4, n_shared=1, n_heads=4,
               q_lora=256, kv_lora=256, qk_nope=64, qk_rope=32, v_head=64, vocab=1024, context=4096),
  # GLM-4.7-Flash (Glm4MoeLiteForCausalLM)
  "full": Dims(n_blocks=47, n_dense=1, dim=2048, ffn=10240, expert_ffn=1536, n_experts=64, n_used=4, n_shared=1, n_heads=20,
               q_lora=768, kv_lora=512, qk_nope=192, qk_rope=64, v_head=256, vocab=154880, context=202752),
}

def tensor_table(d:Dims) -> list[tuple[str, tuple[int, ...], bool]]:
  """(name, numpy shape (rows last = ggml ne0), is a matmul weight) in llama.cpp's names; numpy shape is ggml's reversed."""
  T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
  out = [(N[T.TOKEN_EMBD] + ".weight", (d.vocab, d.dim), True)]
  for i in range(d.n_blocks):
    def b(t:gguf.MODEL_TENSOR, shape, mm=True, suffix="weight"): out.append((N[t].format(bid=i) + "." + suffix, shape, mm))
    b(T.ATTN_NORM, (d.dim,), False)
    b(T.ATTN_Q_A, (d.q_lora, d.dim))
    b(T.ATTN_Q_A_NORM, (d.q_lora,), False)
    b(T.ATTN_Q_B, (d.n_heads * (d.qk_nope + d.qk_rope), d.q_lora))
    b(T.ATTN_KV_A_MQA, (d.kv_lora + d.qk_rope, d.dim))
    b(T.ATTN_KV_A_NORM, (d.kv_lora,), False)
    b(T.ATTN_K_B, (d.n_heads, d.kv_lora, d.qk_nope))  # q_nope (qk_nope) -> latent (kv_lora), per head
    b(T.ATTN_V_B, (d.n_heads, d.v_head, d.kv_lora))   # latent (kv_lora) -> v (v_head), per head
    b(T.ATTN_OUT, (d.dim, d.n_heads * d.v_head))
    b(T.FFN_NORM, (d.dim,), False)
    if i < d.n_dense:
      b(T.FFN_GATE, (d.ffn, d.dim)); b(T.FFN_UP, (d.ffn, d.dim)); b(T.FFN_DOWN, (d.dim, d.ffn))
    else:
      b(T.FFN_GATE_INP, (d.n_experts, d.dim), False)  # the router stays F32, as llama-quantize leaves it
      b(T.FFN_EXP_PROBS_B, (d.n_experts,), False, suffix="bias")
      b(T.FFN_GATE_EXP, (d.n_experts, d.expert_ffn, d.dim)); b(T.FFN_UP_EXP, (d.n_experts, d.expert_ffn, d.dim))
      b(T.FFN_DOWN_EXP, (d.n_experts, d.dim, d.expert_ffn))
      sh = d.expert_ffn * d.n_shared
      b(T.FFN_GATE_SHEXP, (sh, d.dim)); b(T.FFN_UP_SHEXP, (sh, d.dim)); b(T.FFN_DOWN_SHEXP, (d.dim, sh))
  out += [(N[T.OUTPUT_NORM] + ".weight", (d.dim,), False), (N[T.OUTPUT] + ".weight", (d.vocab, d.dim), True)]
  return out

@functools.cache
def mix_types(mix:str) -> dict[str, QT]:
  """Tensor name -> type llama.cpp's quantizer picks for GLM-4.7-Flash (47 blocks) in this mix."""
  return {name: QT[t.upper()] for name, t in json.loads((MIX_DIR / f"types-{mix}.json").read_text()).items()}

def mix_type(mix:str, name:str) -> QT:
  """The mix's type for a tensor; for a block the full model lacks (a preset of other depth), the type it gives that
  tensor in most blocks."""
  types = mix_types(mix)
  if name in types: return types[name]
  kind = name.split(".", 2)[-1]
  return collections.Counter(t for n, t in types.items() if n.startswith("blk.") and n.split(".", 2)[-1] == kind).most_common(1)[0][0]

def storage_type(qtype:QT|str, shape:tuple[int, ...], matmul:bool, name:str="") -> QT:
  """A matmul weight's type: qtype, or a mix's type for this tensor (qtype a name of MIXES); Q8_0 where the type's block
  does not divide the rows. Everything else is F32."""
  if not matmul: return QT.F32
  t = mix_type(qtype, name) if isinstance(qtype, str) else qtype
  return t if shape[-1] % gguf.GGML_QUANT_SIZES[t][0] == 0 else QT.Q8_0

def nbytes(qtype:QT, shape:tuple[int, ...]) -> int:
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  return math.prod(shape) // block * size

# ***** random blocks *****

# K-quant block layouts: (offset of fp16 d, offset of fp16 dmin or None); the rest of the block is random bytes
_KQ_SCALES = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208, None)}

def _random_kquant(qtype:QT, n_blocks:int, std:float, rng:np.random.Generator) -> np.ndarray:
  # gguf 0.19 has no K-quant quantizer: draw random quants with small sub-block scales and mins (1..8, so the fp16
  # super-block scale d stays a normal number: some devices flush fp16 subnormals), then set d so the dequantized
  # values have mean ~0 and the wanted std
  size, (d_off, m_off) = gguf.GGML_QUANT_SIZES[qtype][1], _KQ_SCALES[qtype]
  blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
  def small(k:int) -> np.ndarray: return rng.integers(1, 9, (n_blocks, k), dtype=np.uint8)
  if m_off is not None:  # Q4_K/Q5_K: 8 6-bit scales and mins packed in bytes 4..16; below 16 the high bits are 0
    sc, m = small(8), small(8)
    blocks[:, 4:16] = np.concatenate([sc[:, :4], m[:, :4], sc[:, 4:] | (m[:, 4:] << 4)], axis=1)
  else: blocks[:, 192:208] = small(16)  # Q6_K: 16 int8 scales
  def set_scales(d:float):
    blocks[:, d_off:d_off+2] = np.full((n_blocks, 1), d, np.float16).view(np.uint8)
    # mins cancel the mean of the unsigned quants: E[sc*q] = E[sc]*(qmax/2) and E[m] = E[sc], so dmin = d*qmax/2
    if m_off is not None: blocks[:, m_off:m_off+2] = np.full((n_blocks, 1), d * (7.5 if qtype == QT.Q4_K else 15.5), np.float16).view(np.uint8)
  set_scales(1.0)
  measured = float(gguf.quants.dequantize(blocks[:256], qtype).std())
  set_scales(std / measured)
  return blocks

def quantize_q4_k(x:np.ndarray) -> np.ndarray:
  """float32 values (a multiple of 256) as Q4_K blocks (144 bytes; gguf has no K-quant quantizer): each 32-value
  sub-block's range mapped onto 16 levels, value = d*sc*q - dmin*m with 6-bit sc, m and fp16 d, dmin per block."""
  x = x.reshape(-1, 8, 32).astype(np.float32)
  lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
  scale, mins = (hi - lo) / 15, -lo                                            # x ~ scale*q - mins, q in 0..15
  d, dmin = (scale.max(-1) / 63).astype(np.float16), (mins.max(-1) / 63).astype(np.float16)
  sc = np.clip(np.rint(scale / np.maximum(d.astype(np.float32), 1e-30)[:, None]), 1, 63).astype(np.uint8)
  m = np.clip(np.rint(mins / np.maximum(dmin.astype(np.float32), 1e-30)[:, None]), 0, 63).astype(np.uint8)
  step, offset = d.astype(np.float32)[:, None] * sc, dmin.astype(np.float32)[:, None] * m
  q = np.clip(np.rint((x + offset[..., None]) / step[..., None]), 0, 15).astype(np.uint8).reshape(-1, 4, 2, 32)
  out = np.zeros((len(x), 144), np.uint8)
  out[:, 0:2], out[:, 2:4] = d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2)
  # ggml's packing: 6-bit scales and mins of sub-blocks 0-3 in bytes 4-11, 4-7's low nibbles in 12-15, high bits on top
  out[:, 4:8], out[:, 8:12] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6)
  out[:, 12:16] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
  out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)            # per 64 values: the first 32 in low nibbles
  return out

QUANTIZABLE = {QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.F16, QT.BF16, QT.F32}

def quantized(qtype:QT, x:np.ndarray) -> np.ndarray:
  """float32 values (n_elems,) in qtype as raw bytes (n_blocks, block bytes), for the QUANTIZABLE types."""
  if qtype == QT.Q4_K: return quantize_q4_k(x)
  block = gguf.GGML_QUANT_SIZES[qtype][0]
  row = block * 128 if x.size % (block * 128) == 0 else block  # gguf.quants quantizes row by row: long rows are fast
  return gguf.quants.quantize(x.reshape(-1, row), qtype).view(np.uint8).reshape(x.size // block, -1)

def random_blocks(qtype:QT, n_elems:int, std:float, rng:np.random.Generator, mean:float=0.0) -> np.ndarray:
  """n_elems random values N(mean, std) in qtype as raw bytes (n_blocks, block bytes)."""
  if qtype in _KQ_SCALES: return _random_kquant(qtype, n_elems // gguf.GGML_QUANT_SIZES[qtype][0], std, rng)
  return quantized(qtype, rng.standard_normal(n_elems, dtype=np.float32) * np.float32(std) + np.float32(mean))

POOL_ELEMS = 1 << 24  # tensors larger than this are drawn row by row from a pool of this many random values
ROW_SCALE_STD = 0.2   # each such row's scale: exp(N(0, ROW_SCALE_STD))
# where each type's block keeps its fp16 scales (multiplying them scales the block's values); native types are the values
_SCALE_FIELDS = {QT.Q4_0: (0,), QT.Q8_0: (0,), QT.Q5_0: (0,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}

def scale_rows(blocks:np.ndarray, qtype:QT, scales:np.ndarray) -> None:
  """blocks (rows, blocks per row, block bytes): each row's values times its scale, in place."""
  if qtype == QT.F32 or qtype == QT.F16:
    v = blocks.view(np.float32 if qtype == QT.F32 else np.float16)
    v *= scales[:, None, None].astype(v.dtype)
  for off in _SCALE_FIELDS.get(qtype, ()):
    d = blocks[..., off:off+2].view(np.float16)
    d[:] = (d.astype(np.float32) * scales[:, None, None]).astype(np.float16)

class Rows:
  """A tensor of n_rows rows, row i being row_blocks consecutive blocks of pool from offsets[i] on, scaled by scales[i].
  GGUFWriter.write_tensor_data calls .tofile, which writes it a few MB at a time (a 180 MB tensor is never assembled)."""
  CHUNK_BYTES = 16 << 20
  def __init__(self, pool:np.ndarray, qtype:QT, row_blocks:int, offsets:np.ndarray, scales:np.ndarray):
    self.pool, self.qtype, self.row_blocks, self.offsets, self.scales = pool, qtype, row_blocks, offsets, scales
    self.nbytes = len(offsets) * row_blocks * pool.shape[1]
  def tofile(self, f):
    step = max(1, self.CHUNK_BYTES // (self.row_blocks * self.pool.shape[1]))
    for i in range(0, len(self.offsets), step):
      blocks = self.pool[self.offsets[i:i+step, None] + np.arange(self.row_blocks)]
      scale_rows(blocks, self.qtype, self.scales[i:i+step])
      f.write(blocks.data)

class Pools:
  """Large tensors: each row from its own random offset into a shared random pool (one per type and std) and with its
  own scale."""
  def __init__(self, rng:np.random.Generator): self.rng, self.pools = rng, {}
  def tensor(self, qtype:QT, shape:tuple[int, ...], std:float) -> np.ndarray|Rows:
    n_elems = math.prod(shape)
    if n_elems <= POOL_ELEMS: return random_blocks(qtype, n_elems, std, self.rng)
    if (pool := self.pools.get((qtype, std))) is None: pool = self.pools[(qtype, std)] = random_blocks(qtype, POOL_ELEMS, std, self.rng)
    row_blocks, n_rows = shape[-1] // gguf.GGML_QUANT_SIZES[qtype][0], n_elems // shape[-1]
    return Rows(pool, qtype, row_blocks, self.rng.integers(0, len(pool) - row_blocks + 1, n_rows),
                np.exp(self.rng.normal(0, ROW_SCALE_STD, n_rows)).astype(np.float32))

# ***** routing topics (see the module's docstring) *****

HEAD_STD = 3.0        # the output head's std times sqrt(dim): logits spread over several units
# a topic's experts' logit where TOPIC_SHARE of the normed hidden state's norm lies along the token's topic direction (the
# share left at the last of 47 blocks, estimated; shallower it is more). Other topics' experts then have logits
# ~N(0, TOPIC_LOGIT / (TOPIC_SHARE sqrt(dim))): in the sigmoid's slope, not saturated with the topic's, so the score gap
# (~0.1) is far above both rounding and the selection bias
TOPIC_LOGIT, TOPIC_SHARE = 2.5, 0.1

def topics(d:Dims, rng:np.random.Generator) -> np.ndarray:
  """(TOPICS, dim) orthonormal directions, TOPICS = n_experts // n_used."""
  return np.linalg.qr(rng.standard_normal((d.dim, d.n_experts // d.n_used)))[0].T.astype(np.float32)

def embedding(d:Dims, qtype:QT, dirs:np.ndarray, rng:np.random.Generator) -> np.ndarray:
  """Token rows N(0, 1) plus their topic's direction (token id mod TOPICS) at the same norm, sqrt(dim)."""
  rows = rng.standard_normal((d.vocab, d.dim), dtype=np.float32)
  rows += dirs[np.arange(d.vocab) % len(dirs)] * np.float32(math.sqrt(d.dim))
  return quantized(qtype, rows.reshape(-1))

def router(d:Dims, dirs:np.ndarray, rng:np.random.Generator) -> np.ndarray:
  """(n_experts, dim) float32: the experts of topic k (a random assignment) read direction k (gain TOPIC_LOGIT /
  (TOPIC_SHARE sqrt(dim))), plus a random row (logits ~N(0, 0.3)) that orders them among themselves."""
  gain = TOPIC_LOGIT / (TOPIC_SHARE * math.sqrt(d.dim))
  rows = rng.standard_normal((d.n_experts, d.dim), dtype=np.float32) * np.float32(0.3 / math.sqrt(d.dim))
  rows[rng.permutation(d.n_experts)] += np.repeat(dirs, d.n_used, axis=0) * np.float32(gain)
  return rows

# ***** tokenizer *****

VOCAB_SOURCE = pathlib.Path(__file__).resolve().parents[2] / "third_party" / "llama.cpp" / "vocab" / "ggml-vocab-llama-bpe.gguf"
TEMPLATE = pathlib.Path(__file__).resolve().parents[2] / "third_party" / "llama.cpp" / "templates" / "GLM-4.7-Flash.jinja"
# GLM-4.7-Flash's special tokens (its tokenizer_config.json), control tokens at the end of the vocab as in the real one
GLM_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
                "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"]

def add_tokenizer(w:gguf.GGUFWriter, vocab:int):
  """A real byte-level BPE vocabulary with GLM-4's pre-tokenizer (llama.cpp's llama-bpe test vocab, which GLM-4 shares
  it with: its first tokens and the merges among them, then unused control tokens up to the size), GLM-4.7-Flash's
  special tokens and chat template, so the tokenizer's and the chat's real code paths run on a synthetic model."""
  from examples.glm.model import read_header
  kv = read_header(VOCAB_SOURCE)[0]
  n_bpe = min(vocab - len(GLM_SPECIALS), 128000)  # llama-bpe's ordinary tokens: bytes first, then one a merge
  tokens = kv["tokenizer.ggml.tokens"][:n_bpe]
  known = set(tokens)
  merges = [m for m in kv["tokenizer.ggml.merges"] if (a_b := m.split(" ", 1)) and {a_b[0], a_b[1], a_b[0] + a_b[1]} <= known]
  tokens += [f"<|unused_{i}|>" for i in range(vocab - len(GLM_SPECIALS) - n_bpe)] + GLM_SPECIALS
  assert len(tokens) == vocab and n_bpe >= 256, "the vocab must hold the 256 byte tokens and GLM's special tokens"
  w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("glm4")
  w.add_token_list(tokens); w.add_token_merges(merges)
  w.add_token_types([gguf.TokenType.NORMAL] * n_bpe + [gguf.TokenType.CONTROL] * (vocab - n_bpe))
  special = {t: i for i, t in enumerate(tokens) if i >= vocab - len(GLM_SPECIALS)}
  w.add_eos_token_id(special["<|endoftext|>"]); w.add_eot_token_id(special["<|user|>"])
  w.add_bos_token_id(special["[gMASK]"]); w.add_add_bos_token(False)
  w.add_chat_template(TEMPLATE.read_text())

# ***** writer *****

class SynthError(ValueError):
  """A write that write() refuses before starting (too little free space); the message is one line for the user."""

class Terminated(BaseException):
  """SIGTERM or SIGHUP as an exception (as SIGINT is KeyboardInterrupt): it unwinds through finally clauses, so temp files
  are removed, and `except Exception` does not catch it. exit_status: 128 + the signal's number, as a shell reports it."""
  def __init__(self, signum:int):
    super().__init__(signal.Signals(signum).name)
    self.signum, self.exit_status = signum, 128 + signum

_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

def _as_exception(signum:int) -> BaseException: return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

# the signals received and not yet handled: an exception raised inside a __del__ (tinygrad frees buffers there) is
# printed and dropped by Python, so the signal is also kept here for the command line to act on (raise_if_signalled)
_pending: list[int] = []

def _raise_signal(signum, frame):
  _pending.append(signum)
  raise _as_exception(signum)

def handled() -> None:
  """The signal's exception reached the command line's handler: nothing is pending."""
  _pending.clear()

def raise_if_signalled() -> None:
  """Raises (KeyboardInterrupt, Terminated) for a signal whose exception was dropped (raised inside a __del__)."""
  if _pending: raise _as_exception(_pending[0])

def _quiet_when_pending(hook):
  def unraisable(u):
    # a signal's exception dropped inside a __del__: kept in _pending for the command line, not printed as a traceback
    if not (_pending and isinstance(u.exc_value, (KeyboardInterrupt, Terminated))): hook(u)
  return unraisable

def raise_on_termination() -> None:
  """For a command line's main: SIGTERM and SIGHUP raise Terminated in the main thread from now on (their default ends
  the process where it stands, leaving what it was writing); one that is ignored (nohup) stays ignored. A signal whose
  exception Python drops (raised inside a __del__) stays pending for raise_if_signalled, without a traceback."""
  for s in _SIGNALS:
    if s != signal.SIGINT and signal.getsignal(s) == signal.SIG_DFL: signal.signal(s, _raise_signal)
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler: signal.signal(signal.SIGINT, _raise_signal)
  sys.unraisablehook = _quiet_when_pending(sys.unraisablehook)

def interrupted_message(e:BaseException) -> tuple[str, int]:
  """(one line, exit status) for a KeyboardInterrupt or Terminated that ends a command line."""
  if isinstance(e, Terminated): return f"terminated ({e})", e.exit_status
  return "interrupted (SIGINT)", 128 + signal.SIGINT

class _SignalGuard:
  """While a file is written (main thread only: elsewhere signals cannot be handled): SIGINT, SIGTERM and SIGHUP raise
  (KeyboardInterrupt, Terminated) so the writer's finally removes its temp file. Inside hold() one is kept until the
  hold ends, so the temp file's creation (its name not yet known) and its removal are never cut in half. A handler that
  is neither the default nor raise_on_termination's (a caller's own, or SIG_IGN) is left as it is."""
  def __init__(self): self.held, self.pending, self.old = 0, None, {}
  def _handler(self, signum, frame):
    if self.held: self.pending = self.pending or signum
    else: raise _as_exception(signum)
  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in _SIGNALS:
        if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler, _raise_signal): self.old[s] = signal.signal(s, self._handler)
    return self
  def __exit__(self, *exc):
    for s, h in self.old.items(): signal.signal(s, h)
  @contextlib.contextmanager
  def hold(self):
    self.held += 1
    try: yield
    finally:
      self.held -= 1
      if not self.held and (s := self.pending) is not None:
        self.pending = None
        raise _as_exception(s)

def _size(n:int) -> str: return f"{n/1e9:,.1f} GB" if n >= 1e9 else f"{n/1e6:,.1f} MB"

def file_size(d:Dims, qtype:QT|str) -> int:
  """The GGUF's size in bytes, near enough: the tensors (each aligned to 32 bytes) and the header (the tokenizer's
  strings are most of it: ~30 bytes a token)."""
  table = tensor_table(d)
  return sum(-(-nbytes(storage_type(qtype, shape, mm, name), shape) // 32) * 32 for name, shape, mm in table) + (64 << 10) + 32 * d.vocab

def check_free_space(path:pathlib.Path, need:int) -> None:
  """SynthError unless path's file system has need bytes free and a margin (64 MB and 1%: the header's estimate, and
  room left for everything else on the disk)."""
  where = path.parent.resolve()
  while not where.exists(): where = where.parent  # the folder may not exist yet: its file system is its first existing ancestor's
  free, margin = shutil.disk_usage(where).free, (64 << 20) + need // 100
  if free < need + margin:
    raise SynthError(f"{path}: needs {_size(need)} and a {_size(margin)} margin, {where} has {_size(free)} free; nothing written")

def add_metadata(w:gguf.GGUFWriter, d:Dims, name:str):
  # the keys llama.cpp's convert_hf_to_gguf.py writes for GLM-4.7-Flash (DeepseekV2Model: MLA served as MQA)
  w.add_name(name)
  w.add_context_length(d.context); w.add_embedding_length(d.dim); w.add_block_count(d.n_blocks)
  w.add_feed_forward_length(d.ffn); w.add_head_count(d.n_heads); w.add_head_count_kv(1)
  w.add_rope_freq_base(d.rope_theta); w.add_layer_norm_rms_eps(d.eps); w.add_vocab_size(d.vocab)
  w.add_q_lora_rank(d.q_lora); w.add_kv_lora_rank(d.kv_lora)
  w.add_key_length(d.kv_lora + d.qk_rope); w.add_value_length(d.kv_lora)
  w.add_key_length_mla(d.qk_nope + d.qk_rope); w.add_value_length_mla(d.v_head)
  w.add_rope_dimension_count(d.qk_rope)
  w.add_leading_dense_block_count(d.n_dense); w.add_expert_feed_forward_length(d.expert_ffn)
  w.add_expert_count(d.n_experts); w.add_expert_used_count(d.n_used); w.add_expert_shared_count(d.n_shared)
  w.add_expert_weights_scale(d.expert_scale); w.add_expert_weights_norm(True)
  w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)

def tensor_data(name:str, shape:tuple[int, ...], matmul:bool, qtype:QT, pools:Pools, rng:np.random.Generator, d:Dims,
                dirs:np.ndarray|None) -> np.ndarray|Rows:
  n = math.prod(shape)
  # weights std 1/sqrt(fan_in) keep activations O(1); the embedding rows are O(1), each block's input is normed anyway
  if name.startswith("token_embd"):
    return embedding(d, qtype, dirs, rng) if dirs is not None else pools.tensor(qtype, shape, 1.0)
  if name.startswith("output."): return pools.tensor(qtype, shape, HEAD_STD * shape[-1] ** -0.5)
  if matmul: return pools.tensor(qtype, shape, shape[-1] ** -0.5)
  if "norm" in name: return random_blocks(QT.F32, n, 0.1, rng, mean=1.0)
  # the selection bias orders a topic's experts (their scores are all near 1), not the topics (their score gaps are ~0.02)
  if name.endswith("exp_probs_b.bias"): return random_blocks(QT.F32, n, 0.01, rng)
  if dirs is not None: return router(d, dirs, rng).view(np.uint8).reshape(n, 4)
  return random_blocks(QT.F32, n, shape[-1] ** -0.5, rng)  # a random router

@contextlib.contextmanager
def replacing(path:pathlib.Path):
  """`with replacing(path) as tmp:` the block writes the temp file tmp (in path's folder), renamed to path when the block
  ends without an exception and removed when it ends with one. SIGINT, SIGTERM and SIGHUP during the block raise
  (_SignalGuard), so they remove it too; path is never seen half-written."""
  with _SignalGuard() as guard:
    tmp = None
    try:
      with guard.hold():  # a signal here would leave a temp file whose name is not known yet
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
      yield tmp
      os.chmod(tmp, 0o644)  # mkstemp makes it private
      os.replace(tmp, path)
    finally:
      with guard.hold():  # a second signal does not cut the removal short
        if tmp is not None:
          with contextlib.suppress(FileNotFoundError): os.unlink(tmp)

def write(path:str|os.PathLike, preset:str|Dims="tiny", qtype:str|QT="Q4_0", seed:int=0, progress:bool=False, mix:str|None=None) -> pathlib.Path:
  """Writes the synthetic GGUF to path (atomically: a temp file in the same folder, renamed when complete), its matmul
  weights in qtype, or with a mix (a name of MIXES) in the mix's type for each tensor. SynthError,
  before anything is written, where path's file system has too little free space; a write that fails or is ended by
  SIGINT, SIGTERM or SIGHUP (raised as KeyboardInterrupt or Terminated) removes its temp file."""
  d = PRESETS[preset] if isinstance(preset, str) else preset
  qtype, path = TYPES[qtype] if isinstance(qtype, str) else qtype, pathlib.Path(path)
  if mix is not None and mix not in MIXES: raise SynthError(f"unknown mix {mix!r} (one of {', '.join(MIXES)})")
  types_of = mix or qtype
  rng, table = np.random.default_rng(seed), tensor_table(d)
  check_free_space(path, file_size(d, types_of))
  # testing: seconds to wait after each tensor, so a test's signal arrives mid-write however fast the disk is
  delay = float(os.environ.get("GLM_SYNTH_TEST_DELAY") or 0)
  path.parent.mkdir(parents=True, exist_ok=True)
  with replacing(path) as tmp:
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
      add_metadata(w, d, f"synthetic-glm-{preset if isinstance(preset, str) else 'custom'}" + (f"-{mix}" if mix else ""))
      add_tokenizer(w, d.vocab)
      types = [storage_type(types_of, shape, mm, name) for name, shape, mm in table]
      for (name, shape, _), t in zip(table, types): w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(t, shape), raw_dtype=t)
      w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
      pools, total = Pools(rng), sum(nbytes(t, shape) for (_, shape, _), t in zip(table, types))
      embd_type = types[[name for name, _, _ in table].index("token_embd.weight")]
      dirs = topics(d, rng) if embd_type in QUANTIZABLE else None
      with tqdm(total=total, desc=f"writing {path.name}", unit="B", unit_scale=True, disable=not progress) as bar:
        for (name, shape, mm), t in zip(table, types):
          data = tensor_data(name, shape, mm, t, pools, rng, d, dirs)
          w.write_tensor_data(data, tensor_endianess=gguf.GGUFEndian.LITTLE)  # type: ignore[arg-type]
          bar.update(data.nbytes)
          if delay: time.sleep(delay)
    finally: w.close()
  return path

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("preset", choices=sorted(PRESETS))
  p.add_argument("out", help="output .gguf path")
  types = p.add_mutually_exclusive_group()
  types.add_argument("--type", default="Q4_0", choices=list(TYPES), help="type of every matmul weight (default Q4_0)")
  types.add_argument("--mix", choices=MIXES, help="each tensor in the type llama.cpp's quantizer picks for GLM-4.7-Flash (third_party/llama.cpp/quant-mixes)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--blocks", type=int, help=argparse.SUPPRESS)  # testing: fewer blocks at the preset's dimensions
  a = p.parse_args(argv)
  dims = PRESETS[a.preset]
  if a.blocks is not None: dims = Dims(**{**asdict(dims), "n_blocks": a.blocks, "n_dense": min(dims.n_dense, a.blocks)})
  try: out = write(a.out, dims if a.blocks is not None else a.preset, a.type, a.seed, progress=sys.stderr.isatty(), mix=a.mix)
  except SynthError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a folder that cannot be made, no permission, a disk that fills up: the temp file is gone
    print(f"error: {a.out}: cannot write: {e.strerror or e}; nothing written", file=sys.stderr)
    return 2
  except (KeyboardInterrupt, Terminated) as e:
    line, status = interrupted_message(e)
    print(f"{line}: {a.out} not written", file=sys.stderr)
    return status
  print(f"wrote {out} ({out.stat().st_size/1e6:,.0f} MB)")
  return 0

if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo root: add_tokenizer reads through examples.glm
  raise_on_termination()
  sys.exit(main())
