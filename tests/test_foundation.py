"""The activation layer: version guard, switches, hooks, cache isolation."""
import subprocess, sys
import numpy as np
import pytest
import tinygrad_ext
from tinygrad_ext import hooks
from tinygrad import Tensor, Device
from tinygrad.helpers import Context
import tinygrad.codegen as codegen
import tinygrad.engine.realize as realize
import tinygrad.schedule as schedule
from kernels import kernel_asts, kernel_sources

from helpers import run_python

# kernels where the test pass applies (each multiplies by 2), so "off equals plain" is a comparison that can fail
a, b = Tensor.rand(64, 96).realize(), Tensor.rand(96).realize()
KERNELS = {
  "elementwise": lambda: (a * 2 + 1).contiguous(),
  "reduce": lambda: (a * 2).sum(axis=1),
  "matvec": lambda: (a @ b) * 2,
}

@pytest.mark.parametrize("name", list(KERNELS))
def test_passes_off_source_equals_plain_tinygrad(name, double_to_add):
  hooks.uninstall()
  try: plain = kernel_sources(KERNELS[name])
  finally: hooks.install()
  with tinygrad_ext.passes_off(): off = kernel_sources(KERNELS[name])
  on = kernel_sources(KERNELS[name])
  assert off == plain
  assert on != plain, "the test pass should have changed this kernel"

def test_toggling_yields_the_other_program_never_a_stale_one(double_to_add):
  make = KERNELS["elementwise"]
  seen = []
  for on in (True, False, True, False):
    tinygrad_ext.enable() if on else tinygrad_ext.disable()
    try:
      src = kernel_sources(make)[0]
      seen.append(src)
      assert ("*2" not in src.replace(" ", "")) == on, src
      np.testing.assert_allclose(make().numpy(), a.numpy() * 2 + 1, rtol=1e-6)
    finally: tinygrad_ext.enable()
  assert seen[0] == seen[2] and seen[1] == seen[3] and seen[0] != seen[1]

def test_program_cache_key_carries_the_active_passes(double_to_add):
  ast, ren = kernel_asts(KERNELS["elementwise"])[0], Device[Device.DEFAULT].renderer
  on_key = codegen.to_program_key(ast, ren)
  with tinygrad_ext.passes_off(): off_key = codegen.to_program_key(ast, ren)
  with tinygrad_ext.only(): none_key = codegen.to_program_key(ast, ren)
  assert on_key != off_key and off_key == none_key and "test_double_to_add" in on_key[-1]
  assert realize.to_program_key is codegen.to_program_key
  # the switches reach tinygrad's compile workers with every kernel
  assert {"TINYGRAD_EXT", "TINYGRAD_EXT_DISABLE"} <= {v.key for v in realize.to_program_context}

def test_beam_disk_cache_and_schedule_cache_are_per_pass_set(double_to_add):
  assert hooks._disk_table("beam_search").startswith("beam_search_ext_")
  assert hooks._disk_table("compile_cuda") == "compile_cuda"
  with tinygrad_ext.passes_off(): assert hooks._disk_table("beam_search") == "beam_search"
  cache = schedule.schedule_cache
  assert isinstance(cache, hooks.PassKeyedCache)
  cache[b"k"] = "on"
  with tinygrad_ext.passes_off():
    assert cache.get(b"k") is None and b"k" not in cache
    cache[b"k"] = "off"
  assert cache[b"k"] == "on"
  with tinygrad_ext.passes_off(): assert cache[b"k"] == "off"

def test_only_and_disable_env_select_single_passes(double_to_add):
  assert tinygrad_ext.is_active("test_double_to_add")
  with Context(TINYGRAD_EXT_DISABLE="test_double_to_add"):
    assert not tinygrad_ext.is_active("test_double_to_add") and "test_double_to_add" not in tinygrad_ext.cache_id()
    assert "*2" in kernel_sources(KERNELS["elementwise"])[0].replace(" ", "")
  with tinygrad_ext.only("test_double_to_add"): assert tinygrad_ext.active_passes() == ("test_double_to_add",)
  with tinygrad_ext.only(): assert tinygrad_ext.active_passes() == ()
  with tinygrad_ext.without("test_double_to_add"):
    assert tinygrad_ext.active_passes() == tuple(n for n in tinygrad_ext.PASSES if n != "test_double_to_add")
  with pytest.raises(ValueError, match="unknown tinygrad_ext pass"):
    with tinygrad_ext.only("no_such_pass"): pass
  with pytest.raises(ValueError, match="unknown tinygrad_ext pass"):
    with tinygrad_ext.without("no_such_pass"): pass

def test_register_rejects_duplicates_and_bad_names(double_to_add):
  with pytest.raises(ValueError, match="already registered"): tinygrad_ext.register(double_to_add)
  with pytest.raises(ValueError, match="identifier"): tinygrad_ext.register(tinygrad_ext.Pass("bad name", "", ()))

def test_uninstall_restores_every_attribute():
  replaced = {k: getattr(*k) for k in hooks._originals}
  originals = dict(hooks._originals)
  hooks.uninstall()
  try:
    for (module, attr), orig in originals.items(): assert getattr(module, attr) is orig
  finally: hooks.install()
  # reinstalling puts the same hooks back (tuples and the cache are rebuilt, functions are the same objects)
  assert set(hooks._originals) == set(replaced)
  for k, v in replaced.items():
    if callable(v): assert getattr(*k) is v

def test_version_guard_names_the_supported_version():
  tinygrad_ext._version.check_tinygrad_version("0.14.0")
  for found in ("0.13.0", "0.14.1", None):
    with pytest.raises(ImportError, match=r"tinygrad==0\.14\.0"): tinygrad_ext._version.check_tinygrad_version(found)
  r = run_python("import importlib.metadata as m; m.version = lambda name: '0.15.0'; import tinygrad_ext")
  assert r.returncode != 0 and "ImportError: tinygrad_ext supports tinygrad==0.14.0 only" in r.stderr and "found tinygrad 0.15.0" in r.stderr

def test_env_switches_in_a_fresh_process():
  r = run_python("import tinygrad_ext; print(tinygrad_ext.enabled(), tinygrad_ext.hooks.installed())", TINYGRAD_EXT="0")
  assert r.stdout.split() == ["False", "False"], r.stderr
  r = run_python("import tinygrad_ext", TINYGRAD_EXT_DISABLE="no_such_pass")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
    f"tinygrad_ext: TINYGRAD_EXT_DISABLE='no_such_pass': unknown tinygrad_ext pass(es): no_such_pass; registered: {', '.join(tinygrad_ext.PASSES)}"], r.stderr

def test_compile_workers_install_the_hooks():
  # tinygrad compiles in spawned worker processes: they must run the same passes under the same switches
  r = run_python("import tinygrad_ext\nfrom tinygrad.engine.worker import get_worker_pool\n"
                 "import tinygrad_ext.hooks as h\nprint(get_worker_pool().apply(h.installed))", PARALLEL="1")
  assert r.stdout.strip() == "True", r.stderr

def test_cli_reports_passes_hooks_and_device(double_to_add):
  r = subprocess.run([sys.executable, "-m", "tinygrad_ext"], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "on tinygrad 0.14.0" in r.stdout and f"default device: {Device.DEFAULT}" in r.stdout and "renderer" in r.stdout
  assert "tinygrad.codegen.to_program_key" in r.stdout
  from tinygrad_ext.__main__ import report
  # a pass the pipeline table does not name runs after the table's passes at its point, and says so
  assert "codegen step 'final rewrite'" in report() and "test_double_to_add (not in the table: runs last)" in report()

def test_opt_heuristic_picks_opts_before_tinygrads_and_can_decline():
  from tinygrad.codegen.opt import Opt, OptOps
  from kernels import program
  seen = []
  def choose(k):
    seen.append(k.ast)
    if k.reduceop is None: return None  # declines: tinygrad's heuristic runs
    k.apply_opt(Opt(OptOps.UNROLL, 0, 3))  # tinygrad's own heuristic unrolls by powers of two: this one is the test's
    return k
  tinygrad_ext.register(tinygrad_ext.Pass("test_unroll4", "test only", (tinygrad_ext.OptHeuristic(choose),)))
  try:
    ast = kernel_asts(KERNELS["reduce"])[0]
    assert program(ast).src[0].arg.applied_opts == (Opt(OptOps.UNROLL, 0, 3),)
    with tinygrad_ext.passes_off(): assert Opt(OptOps.UNROLL, 0, 3) not in program(ast).src[0].arg.applied_opts
    with Context(NOOPT=1): assert program(ast).src[0].arg.applied_opts == ()
    ew = kernel_asts(KERNELS["elementwise"])[0]
    with tinygrad_ext.passes_off(): plain = program(ew).src[2].arg
    n = len(seen)
    assert program(ew).src[2].arg == plain and len(seen) == n + 1
  finally: tinygrad_ext.unregister("test_unroll4")
