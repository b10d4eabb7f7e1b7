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

from tinygrad_ext.registry import Pass, CodegenStep, ScheduleStep, SchedulerOpt, OptHeuristic, MatcherRules, ViewGuard, PASSES, register, unregister, check_pass_names  # noqa: E402
from tinygrad_ext.config import __version__, enable, disable, enabled, passes_off, only, without, is_active, active_passes, cache_id, settings, with_setting  # noqa: E402
from tinygrad_ext.config import EXT as _EXT, disabled_names as _disabled_names  # noqa: E402
from tinygrad_ext import hooks  # noqa: E402
import passes  # noqa: E402,F401  # registers every pass of the library

check_pass_names(_disabled_names())  # a typo in TINYGRAD_EXT_DISABLE fails here, not silently
if _EXT.value: hooks.install()

__all__ = ["Pass", "CodegenStep", "ScheduleStep", "SchedulerOpt", "OptHeuristic", "MatcherRules", "ViewGuard", "PASSES", "register", "unregister", "enable", "disable", "enabled", "passes_off", "only", "without",
           "is_active", "active_passes", "cache_id", "settings", "with_setting", "hooks", "SUPPORTED_TINYGRAD", "__version__"]
