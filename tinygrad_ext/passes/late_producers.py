"""late_producers: a kernel that reads nothing its schedule computes runs right before its first reader.

tinygrad linearizes a schedule breadth-first from the kernels that depend on no other (create_schedule's queue), so
every kernel that reads only buffers that existed before the schedule runs first: a weight's dequant staged for a
product, a table built from constants. In a JIT the memory planner then sees each of their outputs live from the start
to its reader, and cannot reuse one's memory for another: a 512-token prefill chunk of GLM-4.7-Flash staged its 46 MoE
blocks' expert weights (1.2 GB each in fp16) at once, a 54.8 GB arena on a 17 GB model. Placed right before its
reader, a staged weight lives only while its block runs.

Legality: a kernel moves later past kernels none of which writes a buffer it reads or writes, or reads or writes a
buffer it writes (its first reader is the first that touches its outputs). Two moved kernels keep their order, and a
pair that conflicts keeps its order since each move was checked against every kernel it passes in the schedule as
tinygrad built it. A kernel whose buffers are not plain to see (a copy, a multi-device buffer, a nested call) neither
moves nor is passed by one. Values are unchanged: the same kernels read the same buffer contents.
"""
from __future__ import annotations
from tinygrad.uop.ops import Ops, UOp
from tinygrad_ext import Pass, ScheduleOrder, register

def stored_param(target:UOp) -> UOp|None:
  """The PARAM a STORE's target indexes (INDEX(PARAM, ...) in tinygrad 0.14's kernels), else None."""
  while target.op is not Ops.PARAM:
    if not target.src: return None
    target = target.src[0]
  return target

def accesses(call:UOp) -> tuple[frozenset[UOp], frozenset[UOp]]|None:
  """(buffers it touches, buffers it writes) of one scheduled kernel, or None where that is not plain to see."""
  if call.op is not Ops.CALL or not call.src: return None
  ast, bufs = call.src[0], call.src[1:]
  if ast.op is not Ops.SINK or any(b.op not in (Ops.BUFFER, Ops.PARAM) for b in bufs): return None
  written = set()
  for u in ast.toposort():
    if u.op is not Ops.STORE: continue
    if (p:=stored_param(u.src[0])) is None or not 0 <= p.arg.slot < len(bufs): return None
    written.add(bufs[p.arg.slot])
  return frozenset(bufs), frozenset(written)

def late_order(linear:UOp) -> UOp:
  """The schedule's kernels with each producer-free one moved to right before its first reader, where legal."""
  kernels = list(linear.src)
  acc = [accesses(k) for k in kernels]
  # from the end: where each kernel's buffers are next touched and next written, and the next kernel of unknown effect
  n = len(kernels)
  next_touch: list[dict[UOp, int]] = [{} for _ in kernels]
  next_write: list[dict[UOp, int]] = [{} for _ in kernels]
  next_unknown, touch_at, write_at, unknown_at = [n] * n, {}, {}, n
  for i in reversed(range(n)):
    next_unknown[i] = unknown_at
    if acc[i] is None:
      unknown_at = i
      continue
    touched, written = acc[i]
    for b in touched: next_touch[i][b], next_write[i][b] = touch_at.get(b, n), write_at.get(b, n)
    for b in touched: touch_at[b] = i
    for b in written: write_at[b] = i
  written_before: set[UOp] = set()
  reader_of: dict[int, int] = {}  # a moved kernel's index -> its first reader's
  for i, a in enumerate(acc):
    if a is None: break  # past a kernel of unknown effect, nothing is known to have no producer
    touched, written = a
    if written and not touched & written_before:
      reader = min(next_touch[i][b] for b in written)
      # nothing before the reader writes what it touches (or may: a kernel of unknown effect)
      if i + 1 < reader < n and min(next_write[i][b] for b in touched) >= reader and next_unknown[i] >= reader: reader_of[i] = reader
    written_before |= written
  if not reader_of: return linear
  before: dict[int, list[UOp]] = {}
  for i in sorted(reader_of): before.setdefault(reader_of[i], []).append(kernels[i])
  return linear.replace(src=tuple(x for j, k in enumerate(kernels) for x in before.get(j, []) + ([] if j in reader_of else [k])))

register(Pass("late_producers", __doc__, (ScheduleOrder(late_order),)))
