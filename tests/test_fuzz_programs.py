"""The differential fuzzer: random tinygrad programs (tests/program_fuzzer.py) compute the same with passes off, every
pass on, and each pass alone: exactly for integers and bools, within rounding for floats. A program that compiles and
runs with passes off must compile and run with them on.

CI runs a bounded budget a device; TINYGRAD_EXT_FUZZ_EXAMPLES=N runs N (the long runs before resolving a pass change),
and TINYGRAD_EXT_FUZZ_LOG=FILE appends a line per program run (a long run stopped by a timeout still counts them):
  TINYGRAD_EXT_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz_programs.py"""
import os
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck, reject
import tinygrad_ext
from program_fuzzer import programs, mismatch

DEVICES = os.getenv("TINYGRAD_EXT_TEST_DEVICES", "CL,CPU").split(",")
EXAMPLES = int(os.getenv("TINYGRAD_EXT_FUZZ_EXAMPLES", "15"))
# CI's budget draws the same programs every run (hypothesis' derandomize); a long run draws new ones and keeps failures
LONG_RUN = "TINYGRAD_EXT_FUZZ_EXAMPLES" in os.environ
LOG = os.getenv("TINYGRAD_EXT_FUZZ_LOG")

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True, derandomize=not LONG_RUN,
          **({} if LONG_RUN else {"database": None}))
@given(data=st.data())
def test_passes_on_compute_what_passes_off_compute(device, data):
  prog = data.draw(programs(device), label="program")
  # every pass together half the time (where most bugs showed), else one pass alone
  config = data.draw(st.one_of(st.just("every pass"), st.sampled_from(list(tinygrad_ext.PASSES))), label="passes on")
  if LOG:  # first, so that a program that kills the process (a stock kernel's SIGILL on CPU) is on record
    with open(LOG, "a") as f: f.write(f"{device}\t{config}\tstart\t{prog!r}\n")
  try:
    with tinygrad_ext.passes_off(): ref = prog.run(device)
  except Exception: reject()  # not a program tinygrad runs (e.g. a dtype a device lacks for one op): not ours to judge
  with tinygrad_ext.only(*(tinygrad_ext.PASSES if config == "every pass" else [config])): got = prog.run(device)
  why = mismatch(ref, got, prog.output_dtypes(device))
  if why is not None and not prog.backward:  # (a realized step has no gradient to take)
    # stock tinygrad may compute one value two ways in two kernels: clang's __fp16 arithmetic is float, so a value
    # recomputed unrounded was compared with its stored, rounded max (an fp16 argmax of 2 elements gave 2). Where the
    # program's result changes with its steps realized, passes on may compute that result instead
    with tinygrad_ext.passes_off(): stepwise = prog.run(device, realize_steps=True)
    if mismatch(ref, stepwise, prog.output_dtypes(device)) is not None and mismatch(stepwise, got, prog.output_dtypes(device)) is None: why = None
  if LOG:
    with open(LOG, "a") as f: f.write(f"{device}\t{config}\t{'ok' if why is None else 'MISMATCH'}\t{len(prog.steps)} steps\n")
  assert why is None, f"{config}: {why}\n{prog.source()}"

def test_a_program_stock_tinygrad_computes_two_ways_is_judged_by_its_stepwise_result():
  # found by the CPU fuzzer: an fp16 argmax whose max kernel stores the rounded max and whose compare kernel recomputes
  # the values in float (clang's __fp16 arithmetic), so no value equals the max and stock tinygrad answers 2 (of 2).
  # Realized step by step it is 0, as numpy says, and fusion's one kernel computes that
  from program_fuzzer import Program, Step
  prog = Program(inputs=(((2, 1), "float16", 0),), steps=(Step(op="div", src=(0, 0), arg=()), Step(op="argmax", src=(1,), arg=(0, False))),
                 outputs=(2,), assign=False, backward=False, jit=False)
  with tinygrad_ext.passes_off(): off, stepwise = prog.run("CPU")[0], prog.run("CPU", realize_steps=True)[0]
  assert off.tolist() == [2] and stepwise.tolist() == [0]
  assert prog.run("CPU")[0].tolist() == [0]
