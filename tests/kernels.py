"""Helpers for tests: the kernels a Tensor expression compiles to, and their rendered source."""
from typing import Callable
from tinygrad import Tensor, Device
from tinygrad.uop.ops import Ops, UOp
import tinygrad.codegen as codegen

def kernel_asts(make:Callable[[], Tensor]) -> list[UOp]:
  """The SINK of every kernel that realizing make() would run (built fresh, nothing is realized)."""
  return [c.src[0] for c in make().schedule_linear().src if c.src[0].op is Ops.SINK]

def program(ast:UOp, device:str|None=None) -> UOp:
  return codegen.to_program(ast, Device[device or Device.DEFAULT].renderer)

def kernel_sources(make:Callable[[], Tensor], device:str|None=None) -> list[str]:
  return [program(ast, device).src[2].arg for ast in kernel_asts(make)]
