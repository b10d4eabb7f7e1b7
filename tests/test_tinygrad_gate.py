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
