"""Which passes are on. The switches are tinygrad ContextVars, so tinygrad's own Context() scopes them, its compile
workers receive them with every kernel, and its program cache key includes them (see hooks.py)."""
from __future__ import annotations
import contextlib, os
from typing import Callable
from tinygrad.helpers import ContextVar, Context
from tinygrad_ext.registry import PASSES, check_pass_names
from tinygrad_ext.errors import SettingError


# key -> its check(text), raising SettingError: every setting tinygrad_ext reads
CHECKS: dict[str, Callable[[str], None]] = {}

def _check_flag(key:str) -> Callable[[str], None]:
  def check(text:str) -> None:
    if text.strip() not in ("0", "1"): raise SettingError(f"{key}={text!r}: must be 0 or 1")
  return check

def flag(key:str, default:int=0) -> ContextVar:
  """An on/off setting (0 or 1), checked as the environment gives it before tinygrad parses it (as an int)."""
  CHECKS[key] = _check_flag(key)
  if key in os.environ: CHECKS[key](os.environ[key])
  return ContextVar(key, default)

def text_setting(key:str, check:Callable[[str], None]) -> ContextVar:
  """A setting given as text, check(text) raising SettingError where it cannot be used (checked at import, and in
  with_setting)."""
  CHECKS[key] = check
  var = ContextVar(key, "")
  if var.value: check(var.value)
  return var

# part of cache_id: a release whose passes render other code for the same opts (0.1.1: REDUCE_LOCAL with a GROUP, and
# the opt sequences it now refuses; 0.1.2: the memory butterfly's partner index, which PoCL miscompiled; 0.1.3:
# int_to_float converts a packed field in place; 0.1.4: the CUDA matvec policy splits wide matrices' blocks over lanes and
# unrolls short loops; 0.1.5: wide_loads reads a CUDA matvec's fp16 activations as half8; 0.1.6: subnormal_dequant;
# 0.1.7: the legality conditions, int_to_float after tinygrad's last symbolic rewrite; 0.1.8: 4 rows a lane for a CUDA
# matvec's float32 activation, a staged dequant's adjacent vectors over adjacent threads, fusion realizing a concatenation
# of rounded rows widened back in float32) must not find programs or BEAM
# choices cached by an earlier one
__version__ = "0.1.8"

# TINYGRAD_EXT=0 imports without activating; TINYGRAD_EXT_DISABLE=name,name switches single passes off
EXT = flag("TINYGRAD_EXT", 1)
def check_disabled(text:str) -> None:
  try: check_pass_names(n.strip() for n in text.split(",") if n.strip())
  except ValueError as e: raise SettingError(f"TINYGRAD_EXT_DISABLE={text!r}: {e}") from None
# (its check needs the passes registered: tinygrad_ext/__init__.py runs it then)
CHECKS["TINYGRAD_EXT_DISABLE"] = check_disabled
EXT_DISABLE = ContextVar("TINYGRAD_EXT_DISABLE", "")
SWITCHES = (EXT, EXT_DISABLE)

def enabled() -> bool: return bool(EXT.value)
def disabled_names() -> set[str]: return {n.strip() for n in str(EXT_DISABLE.value).split(",") if n.strip()}
def is_active(name:str) -> bool: return enabled() and name not in disabled_names()
def active_passes() -> tuple[str, ...]: return tuple(n for n in PASSES if is_active(n))

def settings() -> dict:
  """Every registered pass's settings, by key: ContextVars, so `Context(KEY=value)` scopes a change (A/B runs)."""
  return {v.key: v for p in PASSES.values() for v in p.settings}

def with_setting(key:str, text:str) -> contextlib.AbstractContextManager:
  """`with with_setting("TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT", "1"):` every pass on, one setting set from its text (an int
  setting's text read as an int): the A/B runs of run.py and benchmarks/kernels.py. SettingError for an unknown key or
  a value it cannot take."""
  if key not in settings(): raise SettingError(f"{key}: not a pass setting (settings: {', '.join(settings()) or 'none'})")
  CHECKS[key](text)
  return Context(**{key: int(text) if isinstance(settings()[key].value, int) else text})

def cache_id() -> str:
  """Identifies the code the active passes produce: '' when none is active (programs are stock tinygrad's). A pass's
  setting that is set (non-empty) is part of it: name[KEY=value]."""
  def ident(n:str) -> str: return n + "".join(f"[{v.key}={v.value}]" for v in PASSES[n].settings if v.value)
  return f"tinygrad_ext-{__version__}:{'+'.join(map(ident, act))}" if (act:=active_passes()) else ""

def enable() -> None:
  from tinygrad_ext import hooks
  hooks.install()
  EXT.value = 1

def disable() -> None: EXT.value = 0

def passes_off() -> contextlib.AbstractContextManager:
  """`with passes_off():` compiles the block as plain tinygrad."""
  return Context(TINYGRAD_EXT=0)

@contextlib.contextmanager
def only(*names:str):
  """`with only("a", "b"):` compiles the block with exactly these passes on."""
  keep = set(check_pass_names(names))
  from tinygrad_ext import hooks
  hooks.install()
  with Context(TINYGRAD_EXT=1, TINYGRAD_EXT_DISABLE=",".join(n for n in PASSES if n not in keep)): yield

def without(*names:str) -> contextlib.AbstractContextManager:
  """`with without("a"):` compiles the block with every registered pass on but these (A/B runs of one pass)."""
  drop = set(check_pass_names(names))
  return only(*[n for n in PASSES if n not in drop])
