"""The pipeline table (tinygrad_ext/pipeline.py) decides where and in what order passes run; the environment settings
are checked at startup."""
import subprocess, sys
import pytest
import tinygrad_ext
from tinygrad_ext import hooks, pipeline, PASSES
from tinygrad_ext.errors import PipelineError
from kernels import kernel_asts, render, cuda_renderer
from helpers import run_python

def test_cli_prints_the_pipeline_in_table_order():
  out = subprocess.run([sys.executable, "-m", "tinygrad_ext"], capture_output=True, text=True, timeout=120).stdout
  lines = out.splitlines()
  start = lines.index("pipeline, in the order tinygrad reaches it (tinygrad_ext/pipeline.py):") + 1
  shown = lines[start:start + len(pipeline.PIPELINE)]
  for line, (kind, step, names) in zip(shown, pipeline.PIPELINE):
    assert line.split()[:2] == kind.split() and (not step or repr(step) in line) and line.endswith(" -> ".join(names)), line
  assert "codegen step 'add images'" in out and "packed_loads -> wide_loads -> subnormal_dequant" in out

def test_every_library_pass_hook_is_placed_by_the_table():
  for p in PASSES.values():
    for h in p.hooks:
      kind, step = pipeline.point(h)
      assert any((kind, step) == (k, s) and p.name in names for k, s, names in pipeline.PIPELINE), (p.name, kind, step)
  assert pipeline.library_passes() == set(PASSES)

def test_a_renamed_tinygrad_step_is_refused_at_install(monkeypatch):
  # tinygrad renames "expander": install() names the step and the tinygrad version, and replaces nothing
  renamed = pipeline.tinygrad_steps("codegen step") - {"expander"}
  monkeypatch.setattr(pipeline, "tinygrad_steps", lambda kind: renamed if kind == "codegen step" else frozenset({"convert copy to store", "symbolic+reduce_collapse+debuf"}))
  hooks.uninstall()
  try:
    with pytest.raises(PipelineError, match=r"tinygrad 0\.14\.0 has no codegen step 'expander', where tinygrad_ext runs reduce_local, fusion"):
      hooks.install()
    assert not hooks.installed()
  finally:
    monkeypatch.undo()
    hooks.install()
  assert hooks.installed()

def test_a_missing_hook_attribute_is_refused_at_install(monkeypatch):
  import tinygrad.codegen as codegen
  hooks.uninstall()
  try:
    monkeypatch.delattr(codegen, "apply_opts")
    with pytest.raises(PipelineError, match=r"has no tinygrad\.codegen\.apply_opts"): hooks.install()
    assert not hooks.installed()
  finally:
    monkeypatch.undo()
    hooks.install()

def test_a_library_pass_hooking_outside_the_table_is_refused():
  p = PASSES["hoist"]
  moved = tinygrad_ext.Pass("hoist", p.doc, (tinygrad_ext.CodegenStep("expander", lambda sink, ren: sink),))
  with pytest.raises(PipelineError, match="pass hoist hooks codegen step 'expander', where tinygrad_ext.pipeline.PIPELINE does not place it"):
    pipeline.check({"hoist": moved})

def test_registration_order_does_not_change_the_programs():
  # subnormal_dequant must run after hoist and packed_loads and before int_to_float at their shared points: registered
  # in reverse, the table still orders them and the Q4_0 matvec renders the same
  from tinygrad import Tensor, dtypes
  from tinygrad.llm.gguf import ggml_data_to_tensor
  raw, x = Tensor.empty(256 * 2048 // 32 * 18, dtype=dtypes.uint8), Tensor.empty(1, 2048, dtype=dtypes.float16)
  ast = kernel_asts(lambda: x @ ggml_data_to_tensor(raw, 256 * 2048, 2).reshape(256, 2048).cast(dtypes.float16).T)[-1]
  before = render(ast, cuda_renderer())
  names = list(PASSES)
  passes = [tinygrad_ext.unregister(n) for n in names]
  try:
    for p in reversed(passes): tinygrad_ext.register(p)
    assert list(PASSES) == names[::-1]
    assert render(ast, cuda_renderer()) == before
  finally:
    for n in names[::-1]: tinygrad_ext.unregister(n)
    for p in passes: tinygrad_ext.register(p)
  assert list(PASSES) == names

@pytest.mark.parametrize("setting, value, says", [
  ("TINYGRAD_EXT_DISABLE", "bogus", "TINYGRAD_EXT_DISABLE='bogus': unknown tinygrad_ext pass(es): bogus"),
  ("TINYGRAD_EXT_MATVEC_POLICY", "garbage", "TINYGRAD_EXT_MATVEC_POLICY='garbage': bad item 'garbage', not FIELD=INTEGER"),
  ("TINYGRAD_EXT", "yes", "TINYGRAD_EXT='yes': must be 0 or 1"),
  ("TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT", "2", "TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT='2': must be 0 or 1"),
])
def test_a_bad_setting_is_one_line_and_exit_2(setting, value, says):
  for code in ("import tinygrad_ext", "import runpy; runpy.run_module('tinygrad_ext', run_name='__main__')"):
    r = run_python(code, **{setting: value})
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"tinygrad_ext: {says}"), r.stderr

def test_with_setting_checks_its_key_and_value():
  with pytest.raises(tinygrad_ext.SettingError, match="not a pass setting"): tinygrad_ext.with_setting("TINYGRAD_EXT_HOIST_KEEP_GATES", "1")
  with pytest.raises(tinygrad_ext.SettingError, match="must be 0 or 1"): tinygrad_ext.with_setting("TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT", "x")
  with pytest.raises(tinygrad_ext.SettingError, match="bad item"): tinygrad_ext.with_setting("TINYGRAD_EXT_MATVEC_POLICY", "lanes=")
  with tinygrad_ext.with_setting("TINYGRAD_EXT_MATVEC_POLICY", "lanes=16"): assert "TINYGRAD_EXT_MATVEC_POLICY=lanes=16" in tinygrad_ext.cache_id()
