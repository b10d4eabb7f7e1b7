"""tc_contiguous_k: each thread's tensor-core operand elements are adjacent along K in memory, so it loads them as one vector.

tinygrad's TC opt splits a product's reduce into the tensor core's K bits and gives each bit a role: a lane bit (which
of the warp's threads holds the value) or an element bit (which of a thread's fragment registers). It maps K's memory
bits to those roles in hardware order. On CUDA's m16n8k16 (half and bf16 in) a thread holds K = 2t, 2t+1, 2t+8, 2t+9
of each row it loads (t its lane's low two bits): two pairs 16 bytes apart, loaded as two half2. A warp's load then
reads 16 bytes of each of 8 rows, half a 32-byte sector each, and twice as many load instructions as a thread has
vectors: the prefill chunk's tile products ran at ~7% of an H100's fp16 tensor-core peak, by then mostly loads.

A tensor core's K is summed over, so any relabeling of its K bits that both operands get alike computes the same
product (in another order of the sum). This pass relabels them so that the element bits are K's lowest memory bits and
the lane bits the next: the thread above holds K = 4t .. 4t+3, one half4 (8 contiguous bytes; a warp's instruction
reads whole sectors), half the load instructions. Where K is not the contiguous axis of an operand nothing changes for
it. Where the two operands' element bits differ (no one relabeling serves both) or are already the lowest, the tensor
core is left as it is.

Hook: TensorCores (tinygrad's Scheduler._apply_tc_opt picks from the relabeled list: as many, in the same order).
Tests: test_tc_contiguous_k.py (rendered loads; products against float64 and passes off on tinygrad's emulated CUDA
tensor cores).
"""
from __future__ import annotations
import dataclasses
from tinygrad.renderer import Renderer
from tinygrad.codegen.opt.tc import TensorCore
from tinygrad_ext import Pass, TensorCores, register

NAME = "tc_contiguous_k"

def k_relabeling(tc:TensorCore) -> dict[str, str]|None:
  """The relabeling of tc's K bits (swizzle names r0, r1, ...) that makes each operand's element bits its lowest, in
  their order, then its lane bits: one for both operands, or None where they would need different ones."""
  k_bits = [f"r{i}" for i in range(len(tc.get_reduce_axes()))]
  found = set()
  for lanes, upcasts, reduces in tc.swizzle:
    # a swizzle entry names the operand's range that takes the role of its position: locals are lanes, the rest elements
    elements, lane_bits = [b for b in k_bits if b in upcasts + reduces], [b for b in k_bits if b in lanes]
    found.add(tuple(zip(elements + lane_bits, k_bits)))
  return dict(found.pop()) if len(found) == 1 else None

def with_contiguous_k(tc:TensorCore) -> TensorCore:
  """tc with its K bits relabeled (k_relabeling), or tc itself where no relabeling serves both operands or none is needed."""
  if (relabel := k_relabeling(tc)) is None or all(a == b for a, b in relabel.items()): return tc
  return dataclasses.replace(tc, swizzle=tuple(tuple(tuple(relabel.get(n, n) for n in part) for part in operand) for operand in tc.swizzle))

def contiguous_k_tensor_cores(ren:Renderer, tensor_cores:list[TensorCore]) -> list[TensorCore]:
  return [with_contiguous_k(tc) for tc in tensor_cores]

TC_CONTIGUOUS_K = register(Pass(NAME, "relabels tensor cores' K bits so each thread's operand elements are adjacent along K (one vector load)",
                                (TensorCores(contiguous_k_tensor_cores),)))
