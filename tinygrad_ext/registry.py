"""The pass registry: what a pass is, and the named passes known to this process."""
from __future__ import annotations
from dataclasses import dataclass
from typing import Callable, Union
from tinygrad.uop.ops import UOp
from tinygrad.renderer import Renderer

@dataclass(frozen=True)
class CodegenStep:
  """Runs `rewrite(sink, renderer) -> sink` right after the graph_rewrite step named `step` in
  tinygrad.codegen.full_rewrite_to_sink (the step names are tinygrad 0.14.0's, e.g. "devectorize2", "final rewrite")."""
  step: str
  rewrite: Callable[[UOp, Renderer], UOp]
  def where(self) -> str: return f"tinygrad.codegen.full_rewrite_to_sink: after step '{self.step}'"

Hook = Union[CodegenStep]

@dataclass(frozen=True)
class Pass:
  """A named compiler pass. `doc` says what it rewrites and why; `hooks` say where it enters tinygrad."""
  name: str
  doc: str
  hooks: tuple[Hook, ...]
  def where(self) -> list[str]: return [h.where() for h in self.hooks]

# name -> Pass, in registration order (the order their hooks run in at a shared hook point)
PASSES: dict[str, Pass] = {}

def register(p:Pass) -> Pass:
  if not p.name.isidentifier(): raise ValueError(f"pass name {p.name!r} must be an identifier")
  if p.name in PASSES: raise ValueError(f"a pass named {p.name!r} is already registered")
  PASSES[p.name] = p
  return p

def unregister(name:str) -> Pass: return PASSES.pop(name)

def check_pass_names(names) -> list[str]:
  names = list(names)
  if unknown := [n for n in names if n not in PASSES]:
    raise ValueError(f"unknown tinygrad_ext pass(es): {', '.join(unknown)}; registered: {', '.join(PASSES) or '(none)'}")
  return names
