"""tc_wide_k: a tensor-core product takes two K steps an iteration, a thread's elements of both side by side in memory.

With tc_contiguous_k a thread's fragment elements are K's lowest bits (m16n8k16: K = 4t .. 4t+3, one half4 a row) and its
lane's bits the next. tinygrad's heuristic then loops over K in steps of 16, one half4 a row each: a warp's load reads
32 bytes of each of 8 rows. This heuristic gives a kernel tinygrad's own heuristic would run on tensor cores the same
opts (the TC opt, its upcasts and local) plus an UNROLL of 2 on K, and first relabels K's bits above the elements so that
the unrolled step's bit comes right after them and the lane bits after it: the thread's 4 elements of each step are
adjacent (K = 8t .. 8t+7), one 16-byte run a row that wide_loads reads as one half8 where its address is provably
16-byte aligned. A warp's load instruction then reads 64 bytes of each of 8 rows, half as many instructions again.

Legality: the product's reduce is a sum, and the relabeling (a permutation of K's bits, substituted for the reduce's range
wherever the reduce's value reads it) is the same for both operands, so every product is summed once (in another order).
It fires only with tc_contiguous_k on (the relabeling assumes its layout), on kernels tinygrad's own heuristic would
give tensor cores (shared.tinygrads_tensor_cores) with one ADD reduce over one range that the TC opt then takes as its K, K
a multiple of twice the tensor core's K; otherwise it declines and tinygrad's heuristic decides.

Hook: an OptHeuristic (tinygrad.codegen.apply_opts), after long_reduce. Tests: test_tc_wide_k.py.
"""
from __future__ import annotations
from tinygrad.uop.ops import Ops, UOp, AxisType
from tinygrad.codegen.opt import Opt, OptOps, KernelOptError
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad_ext import Pass, OptHeuristic, register
from tinygrad_ext.config import is_active
from tinygrad_ext.passes.shared import tinygrads_tensor_cores, tc_upcasts_and_local
from tinygrad_ext.passes.tc_contiguous_k import k_roles, NAME as CONTIGUOUS_K

NAME = "tc_wide_k"

def relabeled_k(r:UOp, elements:int, lanes:int) -> UOp:
  """r's value with its bits [elements, elements+lanes) one place up and bit elements+lanes down to bit `elements`."""
  bit = lambda i: (r // (1 << i)) % 2  # noqa: E731
  block = 1 << (elements + lanes + 1)
  return r % (1 << elements) + sum(bit(i) * (1 << (i + 1)) for i in range(elements, elements + lanes)) + \
         bit(elements + lanes) * (1 << elements) + (r // block) * block

def with_relabeled_reduce(k:Scheduler, elements:int, lanes:int) -> Scheduler|None:
  """A Scheduler of k's kernel whose one reduce reads its range through relabeled_k, or None where it has other reduces,
  several ranges, or a length the relabeling does not divide."""
  if len(reds := [u for u in k.ast.toposort() if u.op is Ops.REDUCE]) != 1 or reds[0].arg[0] is not Ops.ADD or len(reds[0].src) != 2: return None
  red, r = reds[0], reds[0].src[1]
  # (a symbolic length, attention's start_pos + T keys, is not known to be a multiple: the relabeling would not be one-to-one)
  if r.op is not Ops.RANGE or r.src[0].op is not Ops.CONST or r.src[0].arg % (1 << (elements + lanes + 1)) != 0: return None
  fresh = r.replace(arg=(max(u.arg[0] for u in k.ast.toposort() if u.op is Ops.RANGE) + 1,) + r.arg[1:])
  value = red.src[0].substitute({r: relabeled_k(fresh, elements, lanes)})
  ret = Scheduler(k.ast.substitute({red: red.replace(src=(value, fresh))}), k.ren)
  ret.dont_use_locals = k.dont_use_locals
  return ret

def choose_wide_k_opts(k:Scheduler) -> Scheduler|None:
  if not is_active(CONTIGUOUS_K) or (found := tinygrads_tensor_cores(k)) is None: return None
  tk, rngs = found
  if (roles := k_roles(tk.tensor_core)) is None or (wk := with_relabeled_reduce(k, *roles)) is None: return None
  # the same TC opt on the relabeled kernel (its axis choice: the ranges are the same but K's), tinygrad's upcasts and
  # local, then two K steps an iteration
  try: rngs = wk.apply_opt(tk.applied_opts[-1])
  except KernelOptError: return None
  if wk.tensor_core != tk.tensor_core or rngs[2].arg[-1] is not AxisType.REDUCE or not isinstance(n := rngs[2].vmax + 1, int) or n % 2: return None
  rngs = tc_upcasts_and_local(wk, rngs)
  if (axis := wk.rngs.index(rngs[2])) not in wk.unrollable_dims: return None
  wk.apply_opt(Opt(OptOps.UNROLL, wk.unrollable_dims.index(axis), 2))
  return wk

TC_WIDE_K = register(Pass(NAME, "gives tensor-core products two K steps an iteration, a thread's elements of both adjacent (one 16-byte load a row)",
                          (OptHeuristic(choose_wide_k_opts),)))
