"""Programs unlike GLM's where the passes once computed something else than tinygrad, crashed, or multiplied the work
(found by running tinygrad's own tests with the extension, tools/tinygrad_gate.py, and by the fuzzer). Each asserts the
legality condition that now keeps its pass from firing, against the same program with passes off."""
import os
import numpy as np
import pytest
from tinygrad import Tensor, dtypes, Context
import tinygrad_ext
from tinygrad_ext import only, passes_off
from tinygrad.uop.ops import Ops
from kernels import kernel_asts, render, cuda_renderer, q4_0_matvec_ast

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")

def both(make, *names):
  """make()'s values with passes off and with these passes on (every pass if none is named)."""
  with passes_off(): off = make()
  with only(*(names or tinygrad_ext.PASSES)): on = make()
  return off, on

@pytest.mark.parametrize("device", DEVICES)
def test_int_to_float_is_not_folded_with_a_float_constant(device):
  # int_to_float's exponent constant (2^23) stays apart from constants added to the converted value: tinygrad's
  # symbolic would fold (x - 2^23) - 1.5707964 into x - 8388609.57 and round it (a uint8 cos was wrong this way)
  with Context(DEV=device):
    u = Tensor([2, 3, 4, 200], dtype=dtypes.uint8).realize()
    y = Tensor([0.25, -1.5, 3.0, 0.125]).realize()
    for make in (lambda: (u.float() - 1.5707964).numpy(), lambda: (u.float() + y).numpy(), lambda: u.cos().numpy()):
      off, on = both(make, "int_to_float")
      np.testing.assert_array_equal(on, off)
  np.testing.assert_allclose(off, np.cos(np.array([2, 3, 4, 200], np.float32)), rtol=1e-4)  # tinygrad's own cos

@pytest.mark.parametrize("device", DEVICES)
def test_int_to_float_subtract_is_not_reassociated_by_the_renderer(device):
  # y + float(u8) became y + (bits - 2^23), which C-style renderers print without its parentheses, `y+bits+-8388608.0f`:
  # C adds y to 2^23 + u first and rounds y away (log(17.5) + 17 gave 20.0). The subtract is a SUB now.
  with Context(DEV=device):
    u = Tensor([17, 3, 200, 0], dtype=dtypes.uint8).realize()
    y = Tensor([2.8622007, -0.1, 0.4375, 1e-3]).realize()
    off, on = both(lambda: (y + u.float()).numpy(), "int_to_float")
  np.testing.assert_array_equal(on, off)
  np.testing.assert_allclose(on, np.array([19.8622007, 2.9, 200.4375, 1e-3], np.float32), rtol=1e-6)

@pytest.mark.parametrize("device", DEVICES)
def test_assigns_that_read_each_others_targets_through_reduces_keep_their_order(device):
  # b0 <- sum(a0 - b1) * b0 and b1 <- sum(a1 - b0) * b1: each reduce reads the other's target as it was before either
  # store. Recomputed inside the other assign's kernel, a read would be ordered after a store (tinygrad: "cycle
  # detected in assign graph"); fusion refuses an intermediate that reads a buffer the schedule stores to.
  def make():
    with Context(DEV=device):
      a0, a1 = Tensor.full((16, 16), 10).contiguous().realize(), Tensor.full((16, 16), 20).contiguous().realize()
      b0, b1 = Tensor.full((16,), 1).contiguous().realize(), Tensor.full((16,), 2).contiguous().realize()
      r0, r1 = (a0 - b1.contiguous()).sum(1), (a1 - b0.contiguous()).sum(1)
      b0.assign(r0 * b0); b1.assign(r1 * b1)
      Tensor.realize(b0, b1)
      return b0.numpy(), b1.numpy()
  (b0_off, b1_off), (b0_on, b1_on) = both(make)
  assert (b0_on == b0_off).all() and (b1_on == b1_off).all() and (b0_off == 128).all() and (b1_off == 608).all()

@pytest.mark.parametrize("device", DEVICES)
def test_svd_is_orthogonal_with_fusion(device):
  # tinygrad's SVD sorts the singular values, then finds each one's index by comparing the values with the sorted ones;
  # recomputed in the sort's kernel and in the comparison's (each compiled its own sum of squares), they differed in
  # their last bits, no index matched and U and V came out with repeated columns. Fusion recomputes a value only in the
  # one kernel that reads it, or where every kernel gets the same bits.
  rng = np.random.default_rng(1)
  for shape in [(2, 2), (3, 3), (2, 2, 2, 2, 3)]:
    with Context(DEV=device):
      a = Tensor(rng.standard_normal(shape).astype(np.float32)).realize()
      def make():
        U, S, V = a.svd()
        Tensor.realize(U, S, V)
        return U.numpy(), S.numpy(), V.numpy()
      with only("fusion"): U, S, V = make()
    for m in (U, V):
      np.testing.assert_allclose(m @ np.swapaxes(m, -1, -2), np.broadcast_to(np.eye(m.shape[-1]), m.shape), atol=1e-4)
    assert np.all(np.diff(S, axis=-1) <= 1e-6), S  # sorted, largest first

@pytest.mark.parametrize("device", DEVICES)
def test_values_computed_in_two_schedules_get_the_same_bits(device):
  # S realized first, V later: V's schedule reads the sort that S's realized and recomputes the sums of squares that
  # S's compared. Fusion recomputed those sums inside different kernels in the two schedules (each had one reader
  # there), their last bits differed, and V came out with a repeated row. While a schedule computes a value that another
  # schedule computes too (registry.shared_values), fusion recomputes only reproducible intermediates.
  with Context(DEV=device):
    m = Tensor([[17., 1., 1.], [1., 34., 0.], [0., 0., 52.]]).contiguous().realize()
    def make():
      U, S, V = m.svd()
      sign = (U * Tensor.arange(1, 4, dtype=dtypes.float32).reshape(3, 1)).sum(-2, keepdim=True).sign()
      V = V * sign.transpose(-1, -2)
      S.contiguous().realize()
      return V.contiguous().realize().numpy()
    off, on = both(make, "fusion")
  np.testing.assert_allclose(on @ on.T, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(on, off, atol=1e-5)

def test_a_schedule_shares_values_while_an_unrealized_tensor_computes_them_too():
  from tinygrad_ext import hooks
  seen = []
  schedule = hooks._originals[(hooks.tensor, "create_linear_with_vars")]
  def recording(sink):
    seen.append(hooks.shared_values.get())
    return schedule(sink)
  hooks._originals[(hooks.tensor, "create_linear_with_vars")] = recording
  try:
    with Context(DEV=DEVICES[0]):
      x = Tensor.rand(8, 8).realize()
      seen.clear()
      total = x.sum(1)
      (total * 2).realize()      # total is left unrealized: a later schedule computes its sum again
      total.realize()            # the sum an earlier shared schedule computed
      (x.max(1) * 2).realize()   # a max is exact in any order: no other schedule's bits to match
      (x.sum(0) * 3).realize()   # no other live tensor computes this sum
  finally: hooks._originals[(hooks.tensor, "create_linear_with_vars")] = schedule
  assert seen == [True, True, False, False]

@pytest.mark.parametrize("device", DEVICES)
def test_half_products_keep_their_overflow(device):
  # hoist evaluated a half matmul's products in float32 and dropped the weight's rounding to half, to take a quant
  # scale out of the sum: values past 65504 (int extremes cast to half) then stayed finite where the program's are inf,
  # and an attention or a convolution came out with numbers where tinygrad gives NaN. Half products stay half now.
  big = np.array([14, 6, 0, 1967082864678646399, -8], np.int64)
  def attention():
    with Context(DEV=device):
      q = Tensor.full((1, 4, 3, 4), -0.125, dtype=dtypes.float16)
      kv = Tensor(np.resize(big, 40)).float().reshape(1, 2, 5, 4).cast(dtypes.float16)
      return q.scaled_dot_product_attention(kv, kv * 0.5, enable_gqa=True).numpy()
  def conv():
    with Context(DEV=device):
      x = Tensor(np.array([0.5, -1, 2, 1.5, -0.25, 3, -2, 1], np.float16)).reshape(1, 1, 1, 8)
      w = Tensor(np.array([2**31 - 1, -3], np.int32)).float().cast(dtypes.float16).reshape(1, 1, 1, 2)
      return x.conv2d(w, stride=2).numpy()
  for make in (attention, conv):
    off, on = both(make, "hoist")
    np.testing.assert_array_equal(np.isnan(on), np.isnan(off))
    np.testing.assert_array_equal(on[~np.isnan(off)], off[~np.isnan(off)])

@pytest.mark.parametrize("device", DEVICES)
def test_recomputing_a_hash_round_by_round_is_refused(device):
  # keccak's rounds are small intermediates; inlined into each other they grew 9.5x in work until codegen's rewrite
  # stack overflowed: fusion applies no phase that multiplies the schedule's work by more than MAX_WORK_GROWTH
  from tinygrad_ext.passes.fusion import MAX_WORK_GROWTH
  with Context(DEV=device):
    make = lambda: bytes(Tensor(b"abc").keccak().tolist()).hex()  # noqa: E731
    off, on = both(make, "fusion")
    assert on == off == "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532"
    with passes_off(): stock = len(kernel_asts(lambda: Tensor(b"abc").keccak()))
    with only("fusion"): fused = len(kernel_asts(lambda: Tensor(b"abc").keccak()))
  assert MAX_WORK_GROWTH < 9.5 and fused == stock

@pytest.mark.parametrize("device", DEVICES)
def test_row_heuristic_declines_kernels_it_does_not_know(device):
  # a two-stage cumsum tiled and masked (tinygrad's test_cumsum_parallel_reduce_fused) reaches fusion's row heuristic
  # with two reduces over one range: it shares that range over the lanes once, and declines a kernel whose range an
  # earlier split took whole (it raised AttributeError) instead of raising
  def make():
    with Context(DEV=device):
      phase = Tensor.arange(513).float().realize().cumsum()
      pattern = Tensor([1, 0, 0, 1, 0, 0, 0, 0, 1, 0]).reshape(10, 1)
      return (phase.repeat((10,)).reshape(10, 513) * pattern).flatten().numpy()
  off, on = both(make)
  np.testing.assert_allclose(on, off, rtol=1e-6)
  np.testing.assert_allclose(off, (np.tile(np.arange(513, dtype=np.float32).cumsum(), 10).reshape(10, 513) * np.array([1, 0, 0, 1, 0, 0, 0, 0, 1, 0])[:, None]).flatten(), rtol=1e-4)

@pytest.mark.parametrize("device", DEVICES)
def test_a_bool_padded_with_minus_one_and_summed_computes_as_stock(device):
  # the pad is where(valid, int(x), -1): tinygrad's kernel unrolls the 2-element sum and adds -1; under the row
  # heuristic's loop, a rewrite moved the cast out of the where and the -1 became the bool True (fuzzer, CL). A kernel
  # with a constant its dtype cannot hold gets tinygrad's own opts (hooks._heuristic_may_choose)
  def make():
    with Context(DEV=device):
      x = Tensor(np.array([True])).realize()
      b = Tensor.zeros(3, dtype=dtypes.int32).contiguous().realize()
      b.assign(b + x.pad(((0, 1),), value=-1).cast(dtypes.int32).sum())
      return b.numpy()
  off, on = both(make)
  np.testing.assert_array_equal(on, off)

@pytest.mark.parametrize("device", DEVICES)
def test_an_fp16_argmax_compiles_and_computes_as_stock(device):
  # an argmax is one kernel, its max reduce inside the index's: the nested heuristic put the lanes on the outer reduce,
  # so the inner fp16 max became a loop accumulating in half, which PoCL emulates and whose accumulator tinygrad's
  # emulation cannot rewrite (the program failed verification; fuzzer, CL)
  def make():
    with Context(DEV=device): return Tensor(np.array([1.0, 2.0], dtype=np.float16)).argmax(0).numpy()
  off, on = both(make)
  assert on == off == 1

@pytest.mark.parametrize("device", DEVICES)
def test_row_heuristic_declines_a_reduce_that_varies_with_the_one_it_sits_in(device):
  # a GQA attention's value gradient sums the softmax over the queries, and the softmax's statistics over the keys vary
  # with the query: a stock kernel with a reduce inside another that it varies with, which the row heuristic spread over
  # lanes as if it were a fused row (wrong on CL, as tinygrad's test_scaled_dot_product_attention_gqa and convolution
  # backwards found)
  rng = np.random.default_rng(0)
  arrays = [rng.uniform(-2, 2, (1, h, 16, 8)).astype(np.float32) for h in (8, 2, 2)] + \
           [rng.standard_normal((1, 3, 5, 7)).astype(np.float32), rng.standard_normal((6, 3, 2, 1)).astype(np.float32)]
  def make():
    with Context(DEV=device):
      q, k, v, x, w = (Tensor(a).realize() for a in arrays)
      grads = [*q.scaled_dot_product_attention(k, v, enable_gqa=True).sum().gradient(q, k, v), *x.conv2d(w).sum().gradient(x, w)]
      Tensor.realize(*grads)
      return [g.numpy() for g in grads]
  for off, on in zip(*both(make)): np.testing.assert_allclose(on, off, rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("device", DEVICES)
def test_a_sum_over_a_symbolic_length_of_zero_is_zero(device):
  # REDUCE_LOCAL pads a symbolic length to a multiple of the lanes; where the lanes cover its largest value in one pass
  # the loop (0 or 1 iterations) had an index that is always 0 and codegen initialised the accumulator inside it: a sum
  # over 0 elements read it uninitialized (tinygrad's TestZeroRange). That length is now padded to the lanes, no loop.
  from tinygrad import UOp
  def make():
    with Context(DEV=device):
      return [Tensor.ones(n, dtype=dtypes.int).contiguous().shrink(((0, UOp.variable("i", 0, n // 2).bind(i)),)).sum().item()
              for n in (10, 100) for i in (3, 0, n // 2)]
  off, on = both(make)
  assert on == off == [3, 0, 5, 3, 0, 50]

@pytest.mark.parametrize("device", DEVICES)
def test_padded_row_of_a_float_max_over_integer_loads(device):
  # a softmax over an int32 row cast to float, the row not a multiple of the lanes (3, 33): the padding's MAX identity,
  # -inf, was moved by tinygrad into the int32 load's alternative value (OverflowError). Such a row is not padded.
  # (found by the fuzzer on CL)
  def make():
    with Context(DEV=device):
      return [Tensor(np.arange(n, dtype=np.int32) % 7 - 3).float().softmax().numpy() for n in (3, 33)]
  for off, on in zip(*both(make, "fusion", "reduce_local")): np.testing.assert_allclose(on, off, rtol=1e-6)

@pytest.mark.parametrize("device", DEVICES)
def test_reduces_in_a_dtype_the_device_emulates_stay_in_their_kernel(device):
  # fp16 softmax over short rows: PoCL without cl_khr_fp16 emulates half, and tinygrad's emulation fails verification on
  # a half accumulator in a loop or in local memory (the row's max recomputed in the sum's kernel, or spread over lanes).
  # Stock tinygrad unrolls those reduces whole; fusion leaves a reduce in an emulated dtype in its own kernel.
  # (the row heuristic also left a 1-D row's max, recomputed per element by tinygrad itself, a loop: it declines now)
  rng = np.random.default_rng(0)
  arrays = [(rng.integers(-40, 40, shape) / 8).astype(np.float16) for shape in ((2, 3), (5, 3), (2,), (5,))]
  def make():
    with Context(DEV=device):
      return [Tensor(a).softmax(0).numpy() for a in arrays]
  for off, on in zip(*both(make)): np.testing.assert_allclose(on.astype(np.float32), off.astype(np.float32), rtol=1e-3, atol=1e-3)

@pytest.mark.parametrize("device", DEVICES)
def test_narrow_integer_arithmetic_that_may_wrap_is_not_recomputed(device):
  # int8 x - max(x) wraps where tinygrad stores it; recomputed inside the cumsum that widens it to int32, C computed it
  # in int and it did not wrap (-182 where 74). fusion recomputes narrow-int arithmetic only where its range, by
  # tinygrad's range analysis, fits the dtype (a Q4_0 nibble minus 8 does). (found by the fuzzer on CL)
  x = np.array([-95, 87], dtype=np.int8)
  def make():
    with Context(DEV=device):
      t = Tensor(x).realize()
      return (t - t.max(0, keepdim=True)).cumsum(0).numpy()
  off, on = both(make)
  np.testing.assert_array_equal(on, off)
  np.testing.assert_array_equal(off, np.cumsum((x - x.max()).astype(np.int8)))

@pytest.mark.parametrize("device", DEVICES)
def test_row_heuristic_pads_no_reduce_past_its_length(device):
  # a batch of 16 2x2 QRs: tinygrad's kernels hold five nested sums of 2 under an 8-element row; the row heuristic gave
  # them the row's 8 lanes, each sum padded from 2 to 8, and Q came out non-orthogonal on CL. Lanes now follow the
  # longest reduce. (found by the fuzzer on CL)
  def make():
    with Context(DEV=device):
      # (built as the fuzzer built it: tinygrad 0.14 itself fails on CL for a batch of ones made with Tensor.ones)
      t = Tensor(np.array([5], dtype=np.int16)).contiguous().realize()
      m = (t == t).flatten().repeat(32).reshape(2, 2, 2, 2, 2).cast(dtypes.float32)
      m = m + 17 * Tensor.eye(2, 2) * Tensor.arange(1, 3, dtype=dtypes.float32)
      Q, R = m.qr()
      Tensor.realize(Q, R)
      return Q.numpy(), R.numpy()
  (q_off, r_off), (q_on, r_on) = both(make)
  np.testing.assert_allclose(q_on, q_off, atol=1e-6)
  np.testing.assert_allclose(np.swapaxes(q_on, -1, -2) @ q_on, np.broadcast_to(np.eye(2), q_on.shape), atol=1e-6)

def test_lanes_summing_values_that_read_no_memory_combine_through_local_memory():
  # the QR batch above on CUDA: its sums over 2 lanes are of values computed from constants and the lane index, inside a
  # `where` on that same lane index. tinygrad folds the condition to True inside the branch (where no INDEX stops it),
  # also inside a shuffle's operand, which is another lane's value: lane 0 summed its own value twice (a wrong Q on an
  # H100). Such sums combine through local memory, whose loads keep the fold out; the GLM's reduces read memory and
  # keep their shuffles
  t = Tensor(np.array([5], dtype=np.int16)).contiguous().realize()
  m = (t == t).flatten().repeat(32).reshape(2, 2, 2, 2, 2).cast(dtypes.float32)
  m = m + 17 * Tensor.eye(2, 2) * Tensor.arange(1, 3, dtype=dtypes.float32)
  Q, R = m.qr()
  asts = [c.src[0] for c in Tensor.linear_with_vars(Q, R)[0].src if c.src[0].op is Ops.SINK]
  srcs = [render(a, cuda_renderer()) for a in asts]
  assert srcs and all("__shfl" not in s for s in srcs)
  assert any("__shared__" in s for s in srcs)  # the lanes still split the sums, through local memory
  assert "__shfl_xor_sync" in render(q4_0_matvec_ast(), cuda_renderer())
