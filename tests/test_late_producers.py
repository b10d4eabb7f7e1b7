"""late_producers: a kernel that reads nothing its schedule computes (a staged weight) runs right before its first
reader, so a JIT's memory planner reuses its memory; a kernel never moves past one that writes what it reads or
touches what it writes. On CPU (tinygrad plans no arena on CL): jitted layer stacks with staged weights (hypothesis
shapes) and the tiny GLM's 512-token prefill chunk, passes on against late_producers off, values exactly equal."""
import numpy as np
from hypothesis import given, settings, strategies as st
from tinygrad import Tensor, TinyJit, Context, dtypes
from tinygrad.uop.ops import Ops, UOp
from tinygrad_ext import without, hooks
from tinygrad_ext.passes.late_producers import late_order, accesses
from examples.glm import model as glm, synth

PLANNED = "CPU"  # tinygrad plans no arena on CL (its buffers cannot be views)

def arena_bytes(jit:TinyJit) -> int:
  """The bytes of the arena the JIT's memory planner gave its intermediates (one int8 buffer per device lane)."""
  arenas = [u for u in jit.captured.linear.toposort() if u.op is Ops.BUFFER and u.dtype == dtypes.int8]
  assert len(arenas) == 1, arenas
  return arenas[0].max_numel()

def layer_stack(widths:list[int], rows:int):
  """A jitted stack of layers x @ w.T, each weight staged (cast to half and realized inside the step, as the GLM's
  prefill stages its dequantized weights): the stage kernels read only weights, so tinygrad schedules them all first."""
  ws = [Tensor.randn(o, i, device=PLANNED).realize() for i, o in zip(widths, widths[1:])]
  def step(x:Tensor) -> Tensor:
    for w in ws: x = (x.cast(dtypes.half) @ w.cast(dtypes.half).contiguous().T).float().relu()
    return x.realize()
  return ws, TinyJit(step)

def run_stack(widths, rows, off:bool, seed:int):
  Tensor.manual_seed(seed)
  ws, jit = layer_stack(widths, rows)
  with (without("late_producers") if off else without()):
    outs = [jit(Tensor.randn(rows, widths[0], device=PLANNED).realize()).numpy() for _ in range(3)]
  return outs, arena_bytes(jit), ws

@settings(max_examples=6, deadline=None)
@given(st.lists(st.sampled_from([32, 64, 96, 128]), min_size=4, max_size=7), st.sampled_from([8, 16]), st.integers(0, 2**16))
def test_staged_weights_live_only_while_their_layer_runs(widths, rows, seed):
  off, arena_off, ws = run_stack(widths, rows, True, seed)
  on, arena_on, _ = run_stack(widths, rows, False, seed)
  for a, b in zip(off, on): np.testing.assert_array_equal(a, b)  # the same kernels on the same values
  staged = [round_up(w.numel() * 2) for w in ws]
  # off: every staged weight is live from the step's start; on: two at most at a time (a layer's and the next's input)
  assert arena_off - arena_on >= sum(staged) - 2 * max(staged), (arena_off, arena_on, staged)

def round_up(n:int, block:int=256) -> int: return -(-n // block) * block

def test_a_kernel_does_not_move_past_a_write_of_what_it_reads():
  # `doubled` reads b and nothing the schedule computes, and its first reader comes after the assign to b: moved past
  # the assign it would double the new b (out 6, not 4)
  b = Tensor.ones(16).contiguous().realize()
  doubled = (b * 2).contiguous()
  b.assign(b + 1)
  out = doubled + b
  Tensor.realize(out, b)
  np.testing.assert_equal(out.numpy(), 4)
  np.testing.assert_equal(b.numpy(), 2)

def schedule_of(monkeypatch, *ts:Tensor) -> UOp:
  """The LINEAR tinygrad's create_schedule builds for realizing ts (then realized, the pass off)."""
  got, stock = [], hooks._tinygrad_create_schedule
  monkeypatch.setattr(hooks, "_tinygrad_create_schedule", lambda sink: got.append(stock(sink)) or got[-1])
  with without("late_producers"), Context(SCACHE=0): Tensor.realize(*ts)  # scheduled, not found in the cache
  monkeypatch.undo()
  return got[-1]

def test_a_producer_free_kernel_moves_to_right_before_its_reader(monkeypatch):
  a, w = Tensor.randn(8, 8).realize(), Tensor.randn(8, 8).realize()
  h = (a * 3).contiguous()                       # computed from a
  h2 = (h + 1).contiguous()                      # h's reader
  staged = (w * 2).contiguous()                  # reads only w: tinygrad puts it first
  lin = schedule_of(monkeypatch, (h2 @ staged).contiguous())
  kernels = list(lin.src)
  moved = list(late_order(lin).src)
  assert sorted(map(id, moved)) == sorted(map(id, kernels)) and moved != kernels
  # every moved kernel sits right before a kernel that reads its output
  for i, k in enumerate(moved):
    if kernels.index(k) < i:
      assert accesses(moved[i + 1])[0] & accesses(k)[1]

def test_nothing_moves_past_a_kernel_whose_buffers_are_not_plain_to_see(monkeypatch):
  a, w = Tensor.randn(8, 8).realize(), Tensor.randn(8, 8).realize()
  lin = schedule_of(monkeypatch, ((a * 3).contiguous() + 1).contiguous() @ (w * 2).contiguous())
  kernels = list(lin.src)
  assert late_order(lin).src != lin.src
  opaque = UOp(Ops.CALL, src=(UOp(Ops.COPY, src=(kernels[0].src[1],), arg="CPU"), *kernels[0].src[1:2]))
  assert accesses(opaque) is None
  barred = UOp(Ops.LINEAR, src=(kernels[0], opaque, *kernels[1:]))
  assert late_order(barred).src == barred.src

def test_a_long_prefill_chunk_stages_one_moe_blocks_weights_at_a_time(tmp_path):
  # the tiny GLM's 512-token chunk: with late_producers off every MoE block's fp16 experts (stacked with the shared
  # one) are live from the chunk's start; on, a block's only while it runs. Same logits to the bit.
  path = synth.write(tmp_path / "tiny.gguf", "tiny", "Q4_0", seed=0)
  with Context(DEV=PLANNED): check_long_chunk(path)

def check_long_chunk(path):
  m = glm.load(path, max_context=520, device=PLANNED)[0]
  c = m.cfg
  prompt = [(5 * i + 1) % c.vocab for i in range(512)]
  got = {}
  for mode in ("off", "on"):
    with (without("late_producers") if mode == "off" else without()):
      pf = m.prefiller()
      logits = [pf(prompt)[1].numpy() for _ in range(2)]  # the second call captures the JIT
      got[mode] = (logits[1], arena_bytes(pf.jits[512]))
  np.testing.assert_array_equal(got["off"][0], got["on"][0])
  staged_block = (c.n_experts + c.n_shared) * 3 * c.expert_ffn * c.dim * 2  # gate, up and down in fp16
  assert got["off"][1] - got["on"][1] >= (c.n_blocks - c.n_dense - 1) * staged_block, (got, staged_block)
