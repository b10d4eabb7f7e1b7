"""tinygrad_ext: compiler passes for tinygrad, registered by `import tinygrad_ext`.

  import tinygrad_ext                 # every registered pass is on (TINYGRAD_EXT=0: imported, not activated)
  tinygrad_ext.disable() / enable()   # all passes off / on for what compiles next
  with tinygrad_ext.passes_off(): ... # a block compiled as plain tinygrad
  with tinygrad_ext.only("name"): ... # a block with exactly these passes on
  with tinygrad_ext.without("name"):  # a block with every pass on but these
  tinygrad_ext.PASSES                 # name -> Pass; TINYGRAD_EXT_DISABLE=name,name switches single passes off
"""
from tinygrad_ext._version import check_tinygrad_version, SUPPORTED_TINYGRAD
check_tinygrad_version()

import sys  # noqa: E402
from tinygrad_ext.errors import SettingError, PipelineError  # noqa: E402
from tinygrad_ext.registry import Pass, CodegenStep, ScheduleStep, SchedulerOpt, OptHeuristic, MatcherRules, ViewGuard, KernelPrologue, GraphBuilt, TensorCores, ScheduleOrder, PASSES, register, unregister, check_pass_names  # noqa: E402
try:
  # each setting is checked as its module reads it from the environment, TINYGRAD_EXT_DISABLE once the passes are known:
  # a bad value is a bad command line, one line and exit status 2, in a script, a benchmark or a compile worker alike
  from tinygrad_ext.config import __version__, enable, disable, enabled, passes_off, only, without, is_active, active_passes, cache_id, settings, with_setting
  from tinygrad_ext.config import EXT as _EXT, EXT_DISABLE as _EXT_DISABLE, CHECKS as _CHECKS
  from tinygrad_ext import hooks, pipeline
  from tinygrad_ext import passes as _passes  # noqa: F401  # registers every pass of the library
  _CHECKS[_EXT_DISABLE.key](_EXT_DISABLE.value)
except SettingError as e:
  print(f"tinygrad_ext: {e}", file=sys.stderr)
  raise SystemExit(2) from None
if _EXT.value: hooks.install()

__all__ = ["SettingError", "PipelineError", "pipeline", "Pass", "CodegenStep", "ScheduleStep", "SchedulerOpt", "OptHeuristic", "MatcherRules", "ViewGuard", "KernelPrologue", "GraphBuilt", "TensorCores", "ScheduleOrder", "PASSES", "register", "unregister", "enable", "disable", "enabled", "passes_off", "only", "without",
           "is_active", "active_passes", "cache_id", "settings", "with_setting", "hooks", "SUPPORTED_TINYGRAD", "__version__"]
