"""examples/glm: the tinygrad GLM against an independent float64 numpy forward pass (tests/glm_reference.py) on the tiny
synthetic GGUF, passes on vs off, every weight type's dequantization, the full-size shape table, and run.py's errors."""
import json, math, pathlib, subprocess, sys
from functools import partial
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
import gguf
import tinygrad_ext
from tinygrad import Tensor, TinyJit, Device, dtypes
from tinygrad.helpers import Context
from tinygrad.uop.ops import Ops, UOp
from tinygrad_ext.internals import captured_calls
from tinygrad.llm.gguf import ggml_data_to_tensor

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.glm import model as glm, synth  # noqa: E402
from glm_reference import Reference  # noqa: E402
from helpers import need_tool, need_dtype  # noqa: E402

RUN = [sys.executable, str(ROOT / "examples" / "glm" / "run.py")]
PROMPT = [1, 17, 300, 42, 256, 7]

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
  return synth.write(tmp_path_factory.mktemp("glm") / "tiny.gguf", "tiny", "Q4_0", seed=0)

@pytest.fixture(scope="module")
def model(tiny): return glm.load(tiny, max_context=32)[0]

def rel_err(a, b) -> float: return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())

def test_matches_reference(model, tiny):
  ref = Reference(str(tiny))
  tok, logits = model.prefill(PROMPT)
  want = ref.forward(PROMPT, 0)
  assert rel_err(logits.numpy()[0], want) <= 1e-2 and tok == int(want.argmax())
  jit, pos = model.decoder(), len(PROMPT)
  for _ in range(4):  # the jit runs, captures, then replays; the KV cache carries the positions
    want = ref.forward([tok], pos)
    nxt, logits = model.decode(jit, tok, pos)
    err = rel_err(logits.numpy()[0], want)
    assert err <= 1e-2, f"pos {pos}: logits rel err {err:.2e}"
    assert nxt == int(want.argmax()), f"pos {pos}: greedy token {nxt} != reference {int(want.argmax())}"
    tok, pos = nxt, pos + 1
  assert jit.captured is not None

def test_prefill_chunks_cover_the_prompt():
  for n in range(1, 1200, 7):
    cs = glm.chunks(n)
    assert all(c in glm.CHUNKS for c in cs) and sum(cs) - max(glm.CHUNKS) < n <= sum(cs)
    assert sum(cs) - n < min(glm.CHUNKS)  # only the last chunk is padded

def test_prefill_in_padded_chunks_at_any_start_matches_reference(tiny):
  # 40 tokens: a chunk of 32 and one of 8 padded to 32; then the same 40 fed as two turns of 20 (a chat: the second
  # starts at position 20, its JIT replayed with another start and last index). Each compares with float64.
  model = glm.load(tiny, max_context=64)[0]
  prompt = [(7 * i + 3) % model.cfg.vocab for i in range(40)]
  want = Reference(str(tiny)).forward(prompt, 0)
  pf = model.prefiller()
  for _ in range(3):  # the chunk JITs run, capture, then replay
    tok, logits = pf(prompt)
    assert rel_err(logits.numpy()[0], want) <= 1e-2 and tok == int(want.argmax())
  assert pf.jits[32].captured is not None
  pf(prompt[:20])
  tok, logits = pf(prompt[20:], 20)
  assert rel_err(logits.numpy()[0], want) <= 1e-2 and tok == int(want.argmax())
  with pytest.raises(ValueError): pf(prompt, 30)  # past max_context

def test_prefill_plan_pads_a_long_rest_and_decodes_a_short_one():
  L = max(glm.CHUNKS)
  for n in range(1, 3 * L, 7):
    cs, steps = glm.plan(n)
    assert set(cs) <= {L} and steps < glm.PAD_MIN and sum(cs) - L < n - steps <= sum(cs)
    assert steps == 0 or n - steps == sum(cs)  # only where no chunk is padded do decode steps follow

def test_tokens_short_of_a_chunk_go_through_the_decode_step(tiny, monkeypatch):
  # with the decode JIT, a prompt is whole chunks, then a padded chunk where PAD_MIN tokens or more are left, else single
  # decode steps (chunks of 32 and PAD_MIN 16 here, for the CPU): 40 tokens are a chunk and 8 steps, 50 two chunks (the
  # second padded), 10 no chunk at all (no chunk JIT is built); each matches the float64 reference
  monkeypatch.setattr(glm, "CHUNKS", (32,))
  monkeypatch.setattr(glm, "PAD_MIN", 16)
  model = glm.load(tiny, max_context=64)[0]
  prompt = [(7 * i + 3) % model.cfg.vocab for i in range(50)]
  decoder = model.decoder()
  for n, jits in ((40, [32]), (50, [32]), (10, [])):
    want = Reference(str(tiny)).forward(prompt[:n], 0)
    pf = model.prefiller(decoder=decoder)
    calls = []
    pf.jit = lambda T, jit=pf.jit: calls.append(T) or jit(T)
    tok, logits = pf(prompt[:n])
    assert sorted(pf.jits) == jits and len(calls) == len(glm.plan(n)[0]), n
    assert rel_err(logits.numpy()[0], want) <= 1e-2 and tok == int(want.argmax()), n

@pytest.fixture(scope="module")
def chat(tiny):
  """The tiny model with room for a chat, and its decode step's JIT (compiled once for the module)."""
  model = glm.load(tiny, max_context=96)[0]
  return model, model.decoder(), {}

# chunk lengths (the longest goes first, the last may be padded) and PAD_MIN: fewer tokens left than this go through the
# decode step where the prefill has it (run.py), else a padded chunk
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.sampled_from([(8,), (8, 24)]), pad_min=st.integers(1, 24), start=st.integers(0, 9), n=st.integers(1, 40),
       through_decoder=st.booleans())
def test_prefill_then_decode_gives_the_logits_of_decoding_token_by_token(chat, lengths, pad_min, start, n, through_decoder):
  # a prompt of n tokens after `start` tokens already in the cache (a chat's next turn) read by the chunked prefill, then
  # one decode step, against the same tokens fed one by one through the decode step: the same logits within fp16
  # rounding, at the prompt's last token and at the step after it
  model, decoder, prefillers = chat
  tokens = [(11 * i + 5) % model.cfg.vocab for i in range(start + n)]
  def one_by_one(upto:int) -> tuple[int, Tensor]:
    for pos in range(upto):
      tok, logits = model.decode(decoder, tokens[pos], pos)
    return tok, logits
  want_tok, want = one_by_one(start + n)
  want = want.numpy()[0]
  after_tok, after = model.decode(decoder, want_tok, start + n)
  after = after.numpy()[0]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(glm, "CHUNKS", lengths)
    mp.setattr(glm, "PAD_MIN", pad_min)
    if start: one_by_one(start)
    # one prefiller (its chunk JITs) per kind for the module: later examples replay them at other starts and lengths
    key = (lengths, through_decoder)
    pf = prefillers[key] = prefillers.get(key) or model.prefiller(decoder=decoder if through_decoder else None)
    tok, logits = pf(tokens[start:], start)
  got = logits.numpy()[0]
  # 40 examples on the CPU were at most 4.4e-4 apart; a greedy flip is allowed only between near-equal logits
  assert rel_err(got, want) <= 5e-3 and (tok == want_tok or got[want_tok] >= got.max() - 1e-2 * np.abs(want).max())
  nxt, logits = model.decode(decoder, want_tok, start + n)
  got = logits.numpy()[0]
  assert rel_err(got, after) <= 5e-3 and (nxt == after_tok or got[after_tok] >= got.max() - 1e-2 * np.abs(after).max())

@pytest.mark.parametrize("T, k, E, M", [(12, 2, 5, 4), (40, 3, 8, 16), (33, 5, 9, 8)])
def test_group_by_expert_puts_each_assignment_in_a_tile_of_its_expert(T, k, E, M):
  # the device-side grouping of a chunk's MoE: every (token, choice) gets its own slot, in a tile of its expert, and the
  # tile reads that token; the tiles no assignment needs name no expert (E: their weight's loads are gated off)
  r = np.random.default_rng(T * k)
  sel = np.stack([r.choice(E - 1, k - 1, replace=False) for _ in range(T)]).astype(np.int32)
  sel = np.concatenate([sel, np.full((T, 1), E - 1, np.int32)], 1)  # the shared expert last, in every token's choices
  tile_expert, slot_token, slot_used, slot = [x.numpy() for x in glm.group_by_expert(Tensor(sel), E, M)]
  flat = sel.reshape(-1)
  assert len(set(slot.tolist())) == T * k and slot_used.sum() == T * k and slot_used[slot].all()
  assert (tile_expert[slot // M] == flat).all() and (slot_token[slot] == np.arange(T * k) // k).all()
  used = sum(-(-int((flat == e).sum()) // M) for e in range(E))
  assert not slot_used[used * M:].any() and (tile_expert[used:] == E).all() and len(tile_expert) > used

def test_a_long_chunk_reads_staged_fp16_weights_and_matches_reference(tiny):
  # a 512-token chunk (STAGE_ROWS or more rows) reads each weight dequantized to fp16 once (one reduce: tensor cores on
  # CUDA); its logits still within 1e-2 of float64
  model = glm.load(tiny, max_context=520)[0]
  prompt = [(5 * i + 1) % model.cfg.vocab for i in range(512)]
  assert glm.chunks(len(prompt)) == [512] and 512 >= glm.STAGE_ROWS
  ref = Reference(str(tiny))
  tok, logits = model.prefill(prompt)
  want = ref.forward(prompt, 0)
  assert rel_err(logits.numpy()[0], want) <= 1e-2 and tok == int(want.argmax())

def test_a_long_chunk_at_any_start_attends_over_whole_kv_blocks_and_matches_reference(tiny):
  # a 512-token chunk attends to the cache up to the next KV_BLOCK boundary past it, the rows beyond its last position
  # masked (their tensor-core tiles need a length a block divides): at start 40 that is 1024 rows, 472 of them not yet
  # written; the logits still within 1e-2 of float64
  model = glm.load(tiny, max_context=600)[0]
  prompt = [(5 * i + 1) % model.cfg.vocab for i in range(552)]
  pf = model.prefiller()
  pf(prompt[:40])  # a 32-token chunk and a padded one
  assert pf.args(512, prompt[40:], 40)[-1].unbind()[1] == 1 and glm.cache_rows(600) >= 2 * glm.KV_BLOCK
  tok, logits = pf(prompt[40:], 40)
  want = Reference(str(tiny)).forward(prompt, 0)
  assert rel_err(logits.numpy()[0], want) <= 1e-2 and tok == int(want.argmax())

def test_a_long_chunks_attention_renders_tensor_cores(tiny):
  # q.k and probs @ latent of a 512-token chunk over KV_BLOCK-aligned keys: both render CUDA mma (over start_pos + T
  # positions, a length no tile divides, neither did; long_reduce leaves tensor-core kernels to tinygrad)
  from kernels import kernel_asts, render, cuda_renderer
  m = glm.load(tiny, max_context=64)[0]
  toks, T = Tensor.empty(1, 512, dtype=dtypes.int32), 512
  step = lambda: m.step(toks, m.start_pos.bind(0), last=UOp.variable("last512", 0, T - 1).bind(T - 1), kv_len=glm.long_chunk_keys(m.kv_extra_blocks.bind(0)))[0]
  attention = [render(a, cuda_renderer()) for a in kernel_asts(step) if any(u.op is Ops.REDUCE for u in a.toposort())
               and "kv_extra_blocks" in {getattr(u.arg, "name", None) for u in a.toposort()}]
  products = [s for s in attention if "exp2" not in s and "(int* data0" not in s]  # not the softmax, not the causal mask
  assert len(products) == 2 * m.cfg.n_blocks and all("mma" in s for s in products), [s[:200] for s in products]

def test_every_kernel_of_a_jitted_step_launches_with_its_variables_at_zero(tiny):
  # tinygrad's CUDA graph builds each node with every variable at 0, whatever its range, and the driver refuses a grid
  # of 0 (the H100 run of 2026-12-07: a 512 chunk over kv_blocks * KV_BLOCK rows, kv_blocks >= 1, failed so)
  from kernels import kernel_asts, launch_dims_at_zero, cuda_renderer
  m, ren = glm.load(tiny, max_context=64)[0], cuda_renderer()
  def chunk(T:int) -> Tensor:  # as Prefill.jit builds it
    keys = glm.long_chunk_keys(m.kv_extra_blocks.bind(0)) if T >= glm.STAGE_ROWS else None
    return m.step(Tensor.empty(1, T, dtype=dtypes.int32), m.start_pos.bind(0), last=UOp.variable(f"last{T}", 0, T - 1).bind(T - 1), kv_len=keys)[0]
  decode = lambda: m.step(m.ring_token(m.fed.bind(5), m.start_pos.bind(3)), m.start_pos.bind(3))[0]  # ring_step's, unrealized
  for name, make in {"decode": decode, **{f"prefill{T}": partial(chunk, T) for T in glm.CHUNKS}}.items():
    dims = [launch_dims_at_zero(a, ren) for a in kernel_asts(make)]
    assert len(dims) > 10 and not [(i, d) for i, d in enumerate(dims) if 0 in d[0] or 0 in (d[1] or ())], (name, dims)

@pytest.mark.parametrize("numerics,act", [("mixed", "half"), ("float32", "float")])
def test_matvecs_read_a_norm_output_in_the_policys_act_dtype(tiny, numerics, act):
  # a norm whose row only matmuls read is stored rounded to act (act_norm): the decode step's matvecs of it (the attention's
  # q_a+kv_a in every block, the dense FFN's gate+up, the output head) read act's bytes, not the float32 row (under the
  # mixed policy a float32 row read through x.cast(half).cast(float) was never rounded: tinygrad folds that round trip)
  import re
  from kernels import kernel_asts, render, cuda_renderer
  m = glm.load(tiny, max_context=32, numerics=numerics)[0]
  m.prefill(PROMPT)  # the weights realized: the step's kernels are its own
  srcs = [render(a, cuda_renderer()) for a in kernel_asts(lambda: m.step(m.token.bind(5), m.start_pos.bind(len(PROMPT)))[0])]
  def params(src): return re.search(r"void\s+(?:__launch_bounds__\(\d+\)\s+)?\w+\(([^)]*)\)", src)[1]
  head = [p for p in map(params, srcs) if f"data0_{m.cfg.vocab}" in p]
  assert len(head) == 1 and re.search(rf"{act}\* data1_{m.cfg.dim}\b", head[0]), head
  # the attention's first projection in every block: q_a+kv_a stacked, q_lora + kv_lora + qk_rope outputs from a dim row
  c = m.cfg
  qa = [p for p in map(params, srcs) if re.match(rf"float\* data0_{c.q_lora + c.kv_lora + c.qk_rope}\b", p)]
  assert len(qa) == c.n_blocks and all(re.search(rf"{act}\* data1_{c.dim}\b", p) for p in qa), qa

def test_staged_products_have_one_reduce_and_render_tensor_cores():
  # what staging is for: the product of a 512-row chunk and a Q4_0 weight, read through the weight staged in fp16,
  # renders CUDA mma; read through the lazy dequant (a reduce split into blocks x elements) it does not
  from kernels import kernel_asts, render, cuda_renderer
  raw = Tensor.empty(256 * 512 // 32 * 18, dtype=dtypes.uint8)
  w = ggml_data_to_tensor(raw, 256 * 512, 2).reshape(256, 512)
  x = Tensor.empty(1, 512, 512, dtype=dtypes.float32)
  n = glm.NUMERICS["mixed"]
  def mma(make): return ["mma" in render(a, cuda_renderer()) for a in kernel_asts(make) if any(u.op is Ops.REDUCE for u in a.toposort())]
  assert mma(lambda: glm.matmul_for(512, n)(x, w)) == [True]
  assert mma(lambda: glm.matmul_for(32, n)(x[:, :32], w)) == [False]

def test_a_long_chunks_per_head_products_render_tensor_cores():
  # MLA's value path over a 512-token chunk: the attended latent through attn_v_b per head, then attn_output over the
  # merged heads. Both products render CUDA mma (merged lazily, the heads were no batch axis: neither did)
  from kernels import kernel_asts, render, cuda_renderer
  H, L, V, D, T = 4, 256, 64, 256, 512
  def q4_0(*shape):
    return ggml_data_to_tensor(Tensor.empty(math.prod(shape) // 32 * 18, dtype=dtypes.uint8), math.prod(shape), 2).reshape(*shape)
  v_b, attn_out, latent = q4_0(H, V, L), q4_0(D, H * V), Tensor.empty(1, H, T, L, dtype=dtypes.float32)
  n, mm = glm.NUMERICS["mixed"], glm.matmul_for(T, glm.NUMERICS["mixed"])
  srcs = [render(a, cuda_renderer()) for a in kernel_asts(lambda: mm(glm.merged_heads(mm(latent, v_b), n), attn_out))
          if any(u.op is Ops.REDUCE for u in a.toposort())]
  assert len(srcs) == 2 and all("mma" in s for s in srcs)

def test_stacked_projections(model, tiny):
  # load_weights stacks the projections that share an input (STACKED): same logits as the GGUF's separate weights, and
  # one kernel less per stacked pair in a decode step (q_a+kv_a and gate+up in every block, the experts' in MoE blocks)
  separate = glm.load(tiny, max_context=32, stack=False)[0]
  assert [len(b.q_a_kv_a) for b in model.blk] == [1] * 3 and [len(b.q_a_kv_a) for b in separate.blk] == [2] * 3
  # (the shared expert is the routed experts' ninth: test_shared_expert_in_experts)
  assert model.blk[1].gate_up_exps[0].shape == (8 + 1, 2 * 256, 256) and len(separate.blk[1].gate_up_exps) == 2
  (tok, stacked_logits), (tok_sep, separate_logits) = model.prefill(PROMPT), separate.prefill(PROMPT)
  # fp16 rounding differs (the shared expert's gate is stored before its silu, not after): 1.5e-3 measured
  assert rel_err(stacked_logits.numpy()[0], separate_logits.numpy()[0].astype(np.float64)) <= 5e-3 and tok == tok_sep
  from kernels import kernel_asts
  def count(m): return len(kernel_asts(lambda: m.step(m.token.bind(5), m.start_pos.bind(len(PROMPT)))[0]))
  pairs = sum(2 + (b.moe and not b.shared_in_experts) for b in model.blk)  # q_a+kv_a, gate+up, the shared expert's gate+up
  # each pair is one kernel stacked; separate, a normed row that two matmuls read is also kept a kernel of its own
  # where recomputing it in both would give them different bits (fusion's legality), so stacking saves at least the pairs
  assert count(model) <= count(separate) - pairs

def test_shared_expert_in_experts(model, tiny):
  # load_weights appends each MoE block's shared expert to its routed experts (SHARED_INTO), and every token selects it
  # with weight 1: the logits of the separate shared expert, and one kernel less per MoE block in a decode step (the
  # shared expert's gate+up; its down matvec goes into the routed experts' and the weighted sum keeps its own kernel)
  separate = glm.load(tiny, max_context=32, shared_in_experts=False)[0]
  moe = [b for b in model.blk if b.moe]
  assert moe and all(b.shared_in_experts for b in moe) and not any(b.shared_in_experts for b in separate.blk if b.moe)
  c = model.cfg
  assert all(b.down_exps.shape[0] == c.n_experts + 1 and b.gate_up_exps[0].shape[0] == c.n_experts + 1 for b in moe)
  assert all(b.down_exps.shape[0] == c.n_experts for b in separate.blk if b.moe)
  (tok, logits), (tok_sep, separate_logits) = model.prefill(PROMPT), separate.prefill(PROMPT)
  # fp16 rounding differs: the shared expert's down row is stored in fp16 before the sum, as the routed ones are
  assert rel_err(logits.numpy()[0], separate_logits.numpy()[0].astype(np.float64)) <= 5e-3 and tok == tok_sep
  from kernels import kernel_asts
  def count(m): return len(kernel_asts(lambda: m.step(m.token.bind(5), m.start_pos.bind(len(PROMPT)))[0]))
  # (at least: the last block's MoE output may be recomputed in the output norm, where the separate one keeps its kernel)
  assert count(model) <= count(separate) - len(moe)
  # the projections kept separate (--separate-projections) join the routed experts one by one
  both = glm.load(tiny, max_context=32, stack=False)[0]
  assert all(b.shared_in_experts and [w.shape[0] for w in b.gate_up_exps] == [c.n_experts + 1] * 2 for b in both.blk if b.moe)
  assert both.prefill(PROMPT)[0] == tok

def test_shared_expert_stays_separate_where_it_cannot_join():
  # a shared expert whose type differs from the routed experts' (a quant mix) keeps its own matvecs, in every projection
  from examples.glm.model import appendable, TensorInfo
  e = TensorInfo("blk.1.ffn_down_exps.weight", (8, 256, 256), 2, 0, 8 * 256 * 256 // 32 * 18)
  assert appendable(e, TensorInfo("blk.1.ffn_down_shexp.weight", (256, 256), 2, 0, 256 * 256 // 32 * 18))
  assert not appendable(e, TensorInfo("blk.1.ffn_down_shexp.weight", (256, 256), 8, 0, 256 * 256 // 32 * 34))
  assert not appendable(e, TensorInfo("blk.1.ffn_down_shexp.weight", (512, 256), 2, 0, 512 * 256 // 32 * 18))

def _greedy(model, n:int) -> list[int]:
  jit, out, tok = model.decoder(), [], PROMPT[0]
  for pos in range(len(PROMPT) + n - 1):
    tok, _ = model.decode(jit, tok, pos)
    if pos + 1 < len(PROMPT): tok = PROMPT[pos + 1]
    else: out.append(tok)
  return out

def test_passes_on_off_same_tokens(model):
  on = _greedy(model, 4)
  with tinygrad_ext.passes_off(): off = _greedy(model, 4)
  assert on == off and len(on) == 4

def test_decode_kernels_render_for_every_backend(model, tmp_path):
  # every kernel of a decode step, passes on, renders for CUDA C, PTX (assembled by ptxas), Metal and C: a pass that a
  # renderer cannot take must not fire there (packed_loads' word loads once crashed 22 of these 41 kernels on PTX)
  from tinygrad.helpers import Target
  from tinygrad.renderer.ptx import PTXRenderer
  from tinygrad.runtime.support.compiler_cuda import PTXCompiler
  from kernels import kernel_asts, render, cuda_renderer, metal_renderer, clang_renderer
  asts = kernel_asts(lambda: model.forward([5], model.start_pos.bind(3)))
  assert len(asts) > 30
  for ren in (cuda_renderer(), metal_renderer(), clang_renderer()):
    for ast in asts: assert render(ast, ren)
  need_tool("ptxas", "the CUDA toolkit's assembler, to assemble the rendered PTX")
  ptx, fill_in = PTXRenderer(Target(device="CUDA", arch="sm_90")), PTXCompiler("sm_90")  # it fills in the PTX's target and version
  for i, ast in enumerate(asts):
    (f:=tmp_path / f"k{i}.ptx").write_bytes(fill_in.compile(render(ast, ptx)))
    r = subprocess.run(["ptxas", "-arch=sm_90", "-o", str(tmp_path / f"k{i}.cubin"), str(f)], capture_output=True, text=True)
    assert r.returncode == 0, (i, r.stderr)

def test_topk_ids():
  x = np.array([[[0.3, 0.9, 0.1, 0.9, 0.5, 0.2, 0.9, 0.0]]], np.float32)  # ties go to the lower id
  got = glm.topk_ids(Tensor(x), 4).numpy()
  assert got.tolist() == [[[1, 3, 6, 4]]] and got.tolist()[0][0] == np.argsort(-x[0, 0], kind="stable")[:4].tolist()

def _one_tensor_gguf(path, qtype:gguf.GGMLQuantizationType, shape=(4, 512), arch="deepseek2", seed=0) -> np.ndarray:
  data = synth.random_blocks(qtype, int(np.prod(shape)), 0.05, np.random.default_rng(seed))
  if qtype == gguf.GGMLQuantizationType.F16:  # no fp16 subnormals: PoCL (tinygrad's default CL device here) flushes them to 0
    x = data.view(np.float16)
    x[np.abs(x) < np.finfo(np.float16).tiny] = np.finfo(np.float16).tiny
  w = gguf.GGUFWriter(str(path), arch)
  w.add_tensor("w", data.reshape(shape[0], -1), raw_dtype=qtype)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  return data

@pytest.mark.parametrize("name", list(synth.TYPES))
def test_weight_types_dequantize(tmp_path, name):
  if name == "BF16": need_dtype(dtypes.bfloat16)
  qtype, path = synth.TYPES[name], tmp_path / f"{name}.gguf"
  data = _one_tensor_gguf(path, qtype)
  _, infos = glm.read_header(path)
  got = glm.load_weights(path, infos)["w"].numpy()
  want = gguf.quants.dequantize(gguf.GGUFReader(str(path)).tensors[0].data, qtype)
  assert got.shape == want.shape == (4, 512)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  assert np.abs(want).max() > 0 and data.nbytes == infos["w"].nbytes

def test_full_shape_table():
  d = synth.PRESETS["full"]
  table = {name: (shape, mm) for name, shape, mm in synth.tensor_table(d)}
  assert len(table) == 3 + 10 + 3 + 46 * (10 + 8)
  assert table["blk.0.ffn_up.weight"][0] == (10240, 2048) and table["blk.1.ffn_gate_exps.weight"][0] == (64, 1536, 2048)
  assert table["blk.1.attn_k_b.weight"][0] == (20, 512, 192) and table["blk.1.attn_v_b.weight"][0] == (20, 256, 512)
  assert table["blk.1.attn_q_b.weight"][0] == (20 * 256, 768) and table["blk.1.attn_kv_a_mqa.weight"][0] == (576, 2048)
  assert table["blk.46.exp_probs_b.bias"] == ((64,), False) and table["output.weight"][0] == (154880, 2048)
  total = sum(synth.nbytes(synth.storage_type(synth.QT.Q4_0, s, mm), s) for s, mm in table.values())
  assert 16.5e9 < total < 17.3e9, total  # the 16.9 GB Q4_0 GGUF
  # K-quants: attn_k_b rows (192) are not a multiple of 256, they fall back to Q8_0 as llama-quantize does
  assert synth.storage_type(synth.QT.Q4_K, (20, 512, 192), True) == synth.QT.Q8_0

def test_mixes_give_every_tensor_the_quantizers_type():
  # --mix: llama-quantize's choice for each tensor of GLM-4.7-Flash (third_party/llama.cpp/quant-mixes), at full size
  # exactly the JSON's, at other depths the type each tensor kind gets in most blocks
  table = synth.tensor_table(synth.PRESETS["full"])
  for mix in synth.MIXES:
    want = {name: synth.QT[t.upper()] for name, t in json.loads((synth.MIX_DIR / f"types-{mix}.json").read_text()).items()}
    assert {name: synth.storage_type(mix, shape, mm, name) for name, shape, mm in table} == want
  assert synth.storage_type("Q4_K_M", (20, 512, 192), True, "blk.60.attn_k_b.weight") == synth.QT.Q5_0
  assert synth.storage_type("Q4_0", (154880, 2048), True, "output.weight") == synth.QT.Q6_K

def test_q4_k_quantizer_round_trips_through_ggufs_dequantizer():
  x = np.random.default_rng(0).standard_normal(256 * 64).astype(np.float32)
  y = gguf.quants.dequantize(synth.quantize_q4_k(x), synth.QT.Q4_K).reshape(-1)
  # 16 levels over each 32-value range (~5 std): half a level ~0.17, plus the 6-bit scales' rounding
  assert np.abs(y - x).max() < 0.3 and np.abs(y - x).mean() < 0.08

def test_a_mixed_file_matches_the_reference(tmp_path):
  path = synth.write(tmp_path / "tiny-q4km.gguf", "tiny", seed=0, mix="Q4_K_M")
  _, infos = glm.read_header(path)
  assert {glm.GGML_TYPES[t.ggml_type] for t in infos.values()} == {"F32", "Q4_K", "Q5_0", "Q6_K"}
  model, ref = glm.load(path, max_context=32)[0], Reference(str(path))
  tok, logits = model.prefill(PROMPT)
  want = ref.forward(PROMPT, 0)
  assert rel_err(logits.numpy()[0], want) <= 2.5 * 2.0 ** -11 and tok == int(want.argmax())

def test_full_writer_header(tmp_path):
  # the full preset's dimensions with 2 blocks (one dense, one MoE): the header parses into the real config
  out = subprocess.run([sys.executable, str(ROOT / "examples" / "glm" / "synth.py"), "full", str(tmp_path / "f.gguf"), "--blocks", "2"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  kv, infos = glm.read_header(tmp_path / "f.gguf")
  c = glm.Config.from_gguf(kv, infos)
  assert (c.dim, c.n_heads, c.q_lora, c.kv_lora, c.qk_nope, c.qk_rope, c.v_head, c.vocab) == (2048, 20, 768, 512, 192, 64, 256, 154880)
  assert (c.n_experts, c.n_used, c.n_shared, c.expert_ffn, c.ffn, c.n_dense, c.n_blocks) == (64, 4, 1, 1536, 10240, 1, 2)
  assert (c.expert_scale, c.expert_norm, c.gating, c.rope_theta, c.eps) == (pytest.approx(1.8), True, 2, 1e6, pytest.approx(1e-5))
  assert infos["blk.1.ffn_down_exps.weight"].shape == (64, 2048, 1536) and infos["blk.1.ffn_down_exps.weight"].ggml_type == 2
  assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed into place


def test_run_smoke(tiny, model, tmp_path):
  out = subprocess.run(RUN + ["--model", str(tiny), "--count", "4", "--profile", "--passes", "compare", "--json", str(tmp_path / "r.json"),
                              "--max-context", "128", "--plot", str(tmp_path / "roofline.png"), "--prefill", "100"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert "tok/s" in out.stderr and "kernels/token" in out.stderr and "kernels per decode token by kind" in out.stderr
  r = json.loads((tmp_path / "r.json").read_text())
  assert r["tokens_identical"] and set(r["results"]) == {"on", "off"}
  for res in r["results"].values():
    assert res["kernels_per_token"] == res["profile"]["n_kernels"] > 0 and len(res["tokens"]) == 4
    assert res["profile"]["kernels_by_kind"]["matmul"] > 0
    # each MoE block's silu(gate) * up, its own kernel (the softmax's exps over the positions are not counted there)
    assert res["profile"]["kernels_by_kind"]["activation"] == model.cfg.n_blocks - model.cfg.n_dense
    launches = res["profile"]["launches"]
    assert len(launches) == res["kernels_per_token"] and sum(k["us"] for k in launches) == pytest.approx(res["profile"]["total_us"])
    assert res["profile"]["step_device_ms"] > 0  # one replay of the whole step, timed by the device
    # --prefill with --profile: the first chunk's kernels (100 tokens are one padded chunk, glm.plan), with tinygrad's
    # estimate of their arithmetic
    chunk = res["prefill"]["profile"]
    assert chunk["chunk"] == 512 and chunk["n_kernels"] > res["kernels_per_token"] // 2
    assert all(k["tflop_s"] >= 0 for k in chunk["kernels"]) and any(k["ops"] > 0 for k in chunk["kernels"] if k["kind"] == "matmul")
  assert "kernels per 512-token prefill chunk by kind" in out.stderr
  assert r["ceiling"]["gbs"] > 0 and (tmp_path / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")] == []  # the plot's temporary file is gone

def test_run_variant(tiny, tmp_path):
  # --variant: one more run with every pass on and a pass setting changed (an A/B of a policy field in one process)
  out = subprocess.run(RUN + ["--model", str(tiny), "--count", "3", "--max-context", "64", "--json", str(tmp_path / "r.json"),
                              "--variant", "TINYGRAD_EXT_MATVEC_POLICY=upcast_rows=1"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  r = json.loads((tmp_path / "r.json").read_text())["results"]
  assert list(r) == ["on", "with TINYGRAD_EXT_MATVEC_POLICY=upcast_rows=1"]
  assert r["on"]["tokens"] == r["with TINYGRAD_EXT_MATVEC_POLICY=upcast_rows=1"]["tokens"]
  # and says how far its logits are from passes on's: a wrong kernel shows there, not only in its time
  assert r["with TINYGRAD_EXT_MATVEC_POLICY=upcast_rows=1"]["logits_vs_on"]["rel_err"] < 2e-3
  assert "first token's logits vs passes on" in out.stderr and "tokens identical" in out.stderr

# ***** bad input: one line on stderr, exit code 2 *****

def _bad_files(tmp:pathlib.Path, tiny:pathlib.Path) -> dict[str, pathlib.Path]:
  (trunc := tmp / "truncated.gguf").write_bytes(tiny.read_bytes()[:len(tiny.read_bytes()) // 2])
  (header := tmp / "header_cut.gguf").write_bytes(tiny.read_bytes()[:100])
  (text := tmp / "notes.gguf").write_text("this is not a gguf file\n")
  _one_tensor_gguf(arch_f := tmp / "llama.gguf", gguf.GGMLQuantizationType.Q4_0, arch="llama")
  # a deepseek2 file with a Q2_K tensor (no Q2_K quantizer in gguf: raw bytes of the right size)
  w = gguf.GGUFWriter(str(q2 := tmp / "q2k.gguf"), "deepseek2")
  w.add_tensor("token_embd.weight", np.zeros((4, 84), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  return {"missing": tmp / "nope.gguf", "truncated": trunc, "header_cut": header, "not_gguf": text, "other_arch": arch_f, "q2_k": q2}

EXPECT = {"missing": "no such file", "truncated": "truncated", "header_cut": "truncated or corrupt", "not_gguf": "not a GGUF",
          "other_arch": "architecture 'llama' is not supported", "q2_k": "unsupported type Q2_K"}
BAD_FLAGS = [["--count", "0"], ["--frobnicate"], ["--passes", "maybe"], ["--synthetic", "huge"], ["--model", "a.gguf", "--synthetic", "tiny"],
             ["--benchmark", "-1"], ["--count", "many"], ["--plot", "r.png"], ["--profile", "--plot", "r.txt"],
             ["--profile", "--plot", "/no/such/dir/r.png"], ["--variant", "NO_SUCH_SETTING=1"], ["--variant", "TINYGRAD_EXT_MATVEC_POLICY"]]

def test_bad_input(tiny, tmp_path):
  files = _bad_files(tmp_path, tiny)
  cases = [(["--model", str(p)], EXPECT[k]) for k, p in files.items()] + [(f, "") for f in BAD_FLAGS]
  procs = [subprocess.Popen(RUN + c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c, _ in cases]
  for (case, want), p in zip(cases, procs):
    _, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 2, (case, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], (case, err)

def test_sampling_draws_from_the_softmax_within_top_k_and_top_p():
  rng = np.random.default_rng(0)
  x = Tensor(rng.standard_normal((1, 1000)).astype(np.float32) * 3)
  xn = x.numpy()[0].astype(np.float64)
  p = np.exp(xn - xn.max()); p /= p.sum()
  assert glm.sample(x, glm.Sampling()).item() == int(xn.argmax())  # temperature 0: exactly the argmax
  kth = glm.largest_threshold(x[0], lambda m: m.sum(-1) >= 10).item()
  assert (xn >= kth).sum() == 10
  need = int(np.searchsorted(np.cumsum(np.sort(p)[::-1]), 0.9)) + 1  # the fewest most likely reaching 0.9
  tp = glm.largest_threshold(x[0], lambda m: m.where(x[0].softmax(-1), 0).sum(-1) >= 0.9).item()
  assert (xn >= tp).sum() == need
  Tensor.manual_seed(1)
  draw = TinyJit(lambda: glm.sample(x, glm.Sampling(1.0, 5, 0.9)).realize())  # as in the decode step: a replay a draw
  draws = np.array([draw().item() for _ in range(400)])
  allowed = set(np.argsort(-xn)[:5].tolist())
  assert set(draws.tolist()) <= allowed
  q = p[sorted(allowed)] / p[sorted(allowed)].sum()  # the five's renormalized probabilities, against their frequencies
  freq = np.array([(draws == i).mean() for i in sorted(allowed)])
  assert np.abs(freq - q).max() < 0.08, (freq, q)

@pytest.mark.parametrize("top_p", [0.95, 0.6])  # a rejection from 7 candidates; the threshold search (too many needed)
def test_top_p_alone_draws_from_the_renormalized_nucleus(top_p):
  rng = np.random.default_rng(1)
  x = Tensor(rng.standard_normal((1, 1000)).astype(np.float32) * 2.5)
  xn = x.numpy()[0].astype(np.float64)
  p = np.exp(xn - xn.max()); p /= p.sum()
  order = np.argsort(-p)
  nucleus = order[:int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]  # the fewest most likely reaching top_p
  Tensor.manual_seed(2)
  draw = TinyJit(lambda: glm.sample(x, glm.Sampling(1.0, 0, top_p)).realize())
  draws = np.array([draw().item() for _ in range(600)])
  assert set(draws.tolist()) <= set(nucleus.tolist())
  q = p[nucleus] / p[nucleus].sum()
  freq = np.array([(draws == i).mean() for i in nucleus])
  assert np.abs(freq - q).max() < 0.07, (freq, q)
  assert len(set(draws.tolist())) > 3  # a draw, not the argmax

def test_a_nucleus_draw_whose_candidates_all_miss_is_the_most_likely_token():
  # one candidate, a nucleus of the top token alone: a candidate drawn elsewhere is rejected, and the fallback is the
  # argmax, which every nucleus holds
  x = Tensor(np.array([0.0, 0.1, 0.2, 0.3, 0.25], dtype=np.float32))
  Tensor.manual_seed(0)
  draw = TinyJit(lambda: glm.nucleus_draw(x, 0.05, 1).realize())
  assert {draw().item() for _ in range(40)} == {3}

def serial_iterations(program) -> int:
  """What one thread of a compiled kernel walks in turn: the sizes of the loops open at once."""
  lin, open_loops, most = program.src[1].src, [], 1
  for u in lin:
    if u.op is Ops.RANGE: open_loops.append(u.src[0].vmax); most = max(most, math.prod(open_loops))
    elif u.op is Ops.END: open_loops.pop()
  return most

def loop_space(program) -> int:
  """A compiled kernel's largest iteration space: its threads times the sizes of the loops open at once."""
  return math.prod(u.src[0].vmax + 1 for u in program.src[1].src if u.op is Ops.SPECIAL) * serial_iterations(program)

def test_sampling_work_grows_linearly_with_the_vocab():
  # the threshold search is a few rounds of counts over the vocab; a schedule that recomputes earlier rounds inside
  # later ones (or the softmax inside every probe) nests loops over the vocab (~100x the decode step's time on CL)
  def space(vocab):
    x = Tensor(np.random.default_rng(0).standard_normal((1, vocab)).astype(np.float32)).realize()
    draw = TinyJit(lambda: glm.sample(x, glm.Sampling(0.8, 5, 0.95)).realize())
    draw(); draw()
    return max(loop_space(call.src[0]) for call in captured_calls(draw))
  small, large = space(256), space(2048)
  assert large < 12 * small, (small, large)  # linear: 8x

@pytest.mark.parametrize("top_p", [0.95, 0.5])  # a nucleus draw; the threshold search
def test_no_thread_of_the_top_p_search_walks_the_probes_partial_sums_in_turn(top_p):
  # each round's verdicts over the probes are realized: the reduce over the vocab's partial sums is then spread over
  # lanes. Counted inside the sum over probes, one thread of the combining kernel summed all 32 x 256 partials (and
  # recomputed the logits' max) in every round (5 kernels of a sampled GLM token)
  with Context(DEV="CL"):
    x = Tensor(np.random.default_rng(0).standard_normal((1, 154880)).astype(np.float32)).realize()
    draw = TinyJit(lambda: glm.sample(x, glm.Sampling(0.8, 0, top_p)).realize())
    draw(); draw()
    walks = [serial_iterations(call.src[0]) for call in captured_calls(draw)]
  assert max(walks) <= 1024, sorted(walks)  # the longest: an argmax's partial over 154880 / 256 logits

def test_sampling_in_the_decode_step_repeats_with_its_seed(tiny):
  def run(seed):
    cmd = RUN + ["--model", str(tiny), "--count", "6", "--temperature", "0.8", "--top-p", "0.95", "--seed", str(seed), "--prompt", "Hello"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return [l for l in out.stderr.splitlines() if "tokens:" in l]
  assert run(1) == run(1) != run(2)

@pytest.mark.parametrize("sampling", [glm.Sampling(), glm.Sampling(temperature=0.8, top_p=0.95)], ids=["greedy", "sampled"])
def test_steps_launched_ahead_decode_what_one_step_at_a_time_does(tiny, sampling):
  # decode_ahead launches steps before the host reads their tokens (each reads the one the step before wrote into the
  # ring): the same tokens as waiting for each, greedy and sampled (the device RNG draws the same numbers either way)
  def run(ahead:bool) -> list[int]:
    m = glm.load(tiny, max_context=32)[0]
    Tensor.manual_seed(3)
    jit = m.decoder(sampling)
    t, _ = m.prefiller(sampling, jit)(PROMPT)
    toks, pos = [t], len(PROMPT)
    for _ in range(2): t = m.decode(jit, t, pos)[0]; pos += 1; toks.append(t)  # the JIT captured
    if ahead: return toks + m.decode_ahead(jit, t, pos, 7)
    for _ in range(7): t = m.decode(jit, t, pos)[0]; pos += 1; toks.append(t)
    return toks
  one_by_one = run(False)
  assert run(True) == one_by_one and len(one_by_one) == 10
  if sampling.temperature > 0: assert len(set(one_by_one)) > 1
