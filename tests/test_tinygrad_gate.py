"""tinygrad's own tests as a regression gate (tools/tinygrad_gate.py): CI runs a subset without and with the extension on
CPU; the full comparison, every file of test/backend and test/unit on CPU and CL, is run before a pass change lands."""
import sys, pathlib
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import tinygrad_gate  # noqa: E402

def test_only_a_new_failure_that_is_not_listed_fails_the_gate():
  off = {"a::t1": "passed", "a::t2": "passed", "a::t3": "failed", "a::t4": "passed"}
  on = {"a::t1": "passed", "a::t2": "failed", "a::t3": "failed", "a::t4": "failed"}
  cmp = tinygrad_gate.compare(off, on, {"a::t4": "kernel count"})
  assert cmp["new_failures_unexpected"] == ["a::t2"] and cmp["new_failures_expected"] == {"a::t4": "kernel count"}
  assert (cmp["failed_without"], cmp["failed_with"], cmp["tests"]) == (1, 3, 4)

def test_a_test_that_did_not_run_with_the_extension_fails_the_gate():
  # a run with the extension that stopped early (it crashed, or pytest stopped at a collection error) is no pass
  off = {"a::t1": "passed", "a::t2": "passed", "a::t3": "failed"}
  cmp = tinygrad_gate.compare(off, {"a::t1": "passed"}, {})
  assert cmp["new_failures_unexpected"] == ["a::t2"]

def test_every_expected_change_has_a_reason_and_is_a_kernel_count():
  expected = tinygrad_gate.read_expected()
  assert all(why.startswith("kernel count") for why in expected.values()), expected

def test_tinygrad_own_tests_pass_with_the_extension_ci_subset(tmp_path):
  # the fuzzer's bugs as tinygrad's own tests found them: SVD, keccak, assigns, Winograd, softmax fusion, schedules
  assert tinygrad_gate.main(["--subset", "ci", "--device", "CPU", "--jobs", "1", "--json", str(tmp_path / "gate.json")]) == 0

def test_expected_kernel_count_changes_keep_the_values_their_tests_check_after_the_count():
  # three of the expected tests assert their values after the kernel count that fusion lowers, so with the extension
  # the failed count hides them: the same programs (tinygrad's test_schedule.py TestSwizzle, MIT), passes off and on
  import numpy as np
  from tinygrad import Tensor
  from tinygrad_ext import passes_off
  from kernels import kernel_asts
  def programs():
    Tensor.manual_seed(0)
    x, y = Tensor.randn(4, 4).realize(), Tensor.randn(4, 4, 4).realize()
    a, b, c = Tensor.randn(4, 4, 16).realize(), Tensor.randn(4, 1, 16).realize(), Tensor.randn(4, 4, 1).realize()
    ones = Tensor.full((2, 2), 1.0).contiguous().realize()
    return {"test_swizzle_reduceop": lambda: x.reshape(4, 4, 1).expand(4, 4, 4).sum(axis=(1,)) + y,
            "test_permute_rewrite": lambda: (a * b).sum(axis=(0, 2)).reshape(1, 4, 1).permute(0, 2, 1) + c,
            "test_unsafe_pad": lambda: (ones * ones.sum((1,)).reciprocal()).pad(((0, 1), None))}
  with passes_off(): off = {name: (len(kernel_asts(make)), make().numpy()) for name, make in programs().items()}
  on = {name: (len(kernel_asts(make)), make().numpy()) for name, make in programs().items()}
  for name in off:
    assert on[name][0] == off[name][0] - 1, (name, off[name][0], on[name][0])  # the count tinygrad's test asserts, one lower
    np.testing.assert_allclose(on[name][1], off[name][1], rtol=1e-6, atol=1e-6, err_msg=name)
  np.testing.assert_equal(on["test_unsafe_pad"][1], [[0.5, 0.5], [0.5, 0.5], [0., 0.]])
