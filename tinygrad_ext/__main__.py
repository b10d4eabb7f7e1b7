"""python -m tinygrad_ext: the pipeline (which passes run at each point of tinygrad, in order), whether each pass is on,
the settings, and the device they compile for."""
import sys
import tinygrad_ext
from tinygrad_ext import PASSES, hooks, pipeline
from tinygrad_ext.config import CHECKS, settings

def report() -> str:
  from tinygrad import Device
  lines = [f"tinygrad_ext {tinygrad_ext.__version__} on tinygrad {tinygrad_ext.SUPPORTED_TINYGRAD} "
           f"({'active' if tinygrad_ext.enabled() else 'not active: TINYGRAD_EXT=0 or disable()'}; "
           f"hooks {'installed' if hooks.installed() else 'not installed'})"]
  try: lines.append(f"default device: {Device.DEFAULT} (renderer {type(Device[Device.DEFAULT].renderer).__name__})")
  except Exception as e: lines.append(f"default device: {Device.DEFAULT} (unavailable: {type(e).__name__}: {e})")
  lines.append(f"cache id: {tinygrad_ext.cache_id() or '(none: programs are plain tinygrad)'}")
  lines.append("pipeline, in the order tinygrad reaches it (tinygrad_ext/pipeline.py):")
  lines += [f"  {line}" for line in pipeline.describe()]
  lines.append(f"passes ({len(PASSES)}):")
  for p in PASSES.values(): lines.append(f"  {p.name:<18} {'on ' if tinygrad_ext.is_active(p.name) else 'off'}  {p.doc}")
  if not PASSES: lines.append("  (none registered)")
  values = {"TINYGRAD_EXT": tinygrad_ext.config.EXT.value, "TINYGRAD_EXT_DISABLE": tinygrad_ext.config.EXT_DISABLE.value,
            **{k: v.value for k, v in settings().items()}}
  lines.append("settings: " + ", ".join(f"{k}={values.get(k, '')!r}" for k in CHECKS))
  lines.append("hook points: " + ", ".join(hooks.hook_points() or ["(none)"]))
  return "\n".join(lines)

if __name__ == "__main__":
  print(report())
  sys.exit(0)
