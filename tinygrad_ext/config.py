"""Which passes are on. The switches are tinygrad ContextVars, so tinygrad's own Context() scopes them, its compile
workers receive them with every kernel, and its program cache key includes them (see hooks.py)."""
from __future__ import annotations
import contextlib
from tinygrad.helpers import ContextVar, Context
from tinygrad_ext.registry import PASSES, check_pass_names

# part of cache_id: a release whose passes render other code for the same opts (0.1.1: REDUCE_LOCAL with a GROUP, and
# the opt sequences it now refuses; 0.1.2: the memory butterfly's partner index, which PoCL miscompiled; 0.1.3:
# int_to_float converts a packed field in place; 0.1.4: the CUDA matvec policy splits wide matrices' blocks over lanes and
# unrolls short loops; 0.1.5: wide_loads reads a CUDA matvec's fp16 activations as half8; 0.1.6: subnormal_dequant;
# 0.1.7: the legality conditions, int_to_float after tinygrad's last symbolic rewrite) must not find programs or BEAM
# choices cached by an earlier one
__version__ = "0.1.7"

# TINYGRAD_EXT=0 imports without activating; TINYGRAD_EXT_DISABLE=name,name switches single passes off
EXT = ContextVar("TINYGRAD_EXT", 1)
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
  """`with with_setting("TINYGRAD_EXT_HOIST_KEEP_GATES", "1"):` every pass on, one setting set from its text (an int
  setting's text read as an int): the A/B runs of run.py and benchmarks/kernels.py."""
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
