"""Copies byte ranges of a file into device tensors as fast as the disk and the device allow.

Threads read the file (os.preadv, no memory map: a map's page faults are taken one 4 KB page at a time by one thread)
into a ring of staging slots while the device copies earlier slots out. On CUDA the slots are pinned host memory and
the copies asynchronous (cuMemcpyHtoDAsync on tinygrad's stream, an event per slot), so the bytes cross host memory
once; tinygrad's own CUDA copy-in would first pin a new buffer per tensor and memmove each tensor into it on one thread
(9 s for GLM-4.7-Flash's 17 GB on an H100 host, 1.8 GB/s). Elsewhere each group of tensors is assembled on the host and
copied by tinygrad, a group at a time (host memory: one group)."""
from __future__ import annotations
import ctypes, os, sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol
import numpy as np
from tinygrad import Tensor, Device, dtypes

Piece = tuple[int, int, int]  # (offset in the file, bytes, offset in the tensor)
Layout = dict[str, tuple[int, list[Piece]]]  # tensor name -> (its bytes, where they are in the file)
Item = tuple[str, int, int, int]  # one read: (tensor, file offset, bytes, tensor offset)

CHUNK = 16 << 20  # bytes a read and a copy move at most
SLOTS = 16        # staging slots: half being read, half being copied out

def byte_range(pieces:list[Piece], start:int, n:int, to:int) -> list[Piece]:
  """The pieces of a tensor's bytes [start, start + n), placed at `to` in another tensor."""
  return [(src + lo - dst, hi - lo, to + lo - start) for src, m, dst in pieces
          if (lo := max(dst, start)) < (hi := min(dst + m, start + n))]

def items(layout:Layout, chunk:int=CHUNK) -> list[Item]:
  """The reads that fill the layout's tensors: adjacent pieces joined, then cut to chunk bytes."""
  out: list[Item] = []
  for name, (_, pieces) in layout.items():
    joined: list[list[int]] = []
    for src, n, dst in sorted(pieces, key=lambda p: p[2]):
      if joined and joined[-1][0] + joined[-1][1] == src and joined[-1][2] + joined[-1][1] == dst: joined[-1][1] += n
      else: joined.append([src, n, dst])
    out += [(name, src + o, min(chunk, n - o), dst + o) for src, n, dst in joined for o in range(0, n, chunk)]
  return out

def read_into(fd:int, buf:memoryview, offset:int):
  while len(buf):
    if (n := os.preadv(fd, [buf], offset)) <= 0: raise OSError(f"unexpected end of file at byte {offset}")
    buf, offset = buf[n:], offset + n

class Staging(Protocol):
  slots: list[memoryview]
  def send(self, slot:int, item:Item) -> None: ...  # start copying the slot's first item[2] bytes to their tensor
  def wait(self, slot:int) -> None: ...              # until the slot's last send is done

def stream(fd:int, todo:list[Item], staging:Staging, pool:ThreadPoolExecutor, progress:Callable[[int], object]=lambda n: None):
  """Reads each item into a slot and sends it on, in order: SLOTS/2 reads in flight while up to SLOTS/2 slots are being
  copied out; a slot is read into again only after its last copy is done."""
  k = len(staging.slots)
  reading: deque = deque()
  def send_oldest():
    fut, slot, item = reading.popleft()
    fut.result()
    staging.send(slot, item)
    progress(item[2])
  for i, item in enumerate(todo):
    if len(reading) == k // 2: send_oldest()
    if i >= k: staging.wait(i % k)  # the item read into this slot k items ago: sent k/2 items ago
    reading.append((pool.submit(read_into, fd, staging.slots[i % k][:item[2]], item[1]), i % k, item))
  while reading: send_oldest()
  for slot in range(k): staging.wait(slot)

class HostStaging:
  """Slots in host memory, sent into a numpy array per tensor (any device: tinygrad copies the arrays)."""
  def __init__(self, arrays:dict[str, np.ndarray], size:int=CHUNK):
    self.arrays, self.slots = arrays, [memoryview(bytearray(size)) for _ in range(SLOTS)]
  def send(self, slot:int, item:Item):
    name, _, n, dst = item
    self.arrays[name][dst:dst + n] = np.frombuffer(self.slots[slot][:n], np.uint8)
  def wait(self, slot:int): pass

class CUDAStaging:
  """Pinned slots copied asynchronously into the tensors' device buffers on tinygrad's stream, an event a slot."""
  def __init__(self, device:str, pointers:dict[str, int], size:int=CHUNK):
    from tinygrad.device import BufferSpec
    from tinygrad.runtime.autogen import cuda
    from tinygrad.runtime.ops_cuda import check
    self.cuda, self.check, self.dev, self.pointers, self.size = cuda, check, Device[device], pointers, size
    check(cuda.cuCtxSetCurrent(self.dev.context))
    self.host = [self.dev.allocator.alloc(size, BufferSpec(host=True)) for _ in range(SLOTS)]
    self.slots = [memoryview((ctypes.c_ubyte * size).from_address(h.value)).cast("B") for h in self.host]
    self.events = []
    for _ in range(SLOTS):
      check(cuda.cuEventCreate(ctypes.byref(ev := cuda.CUevent()), 0))
      self.events.append(ev)
  def send(self, slot:int, item:Item):
    name, _, n, dst = item
    self.check(self.cuda.cuMemcpyHtoDAsync_v2(self.cuda.CUdeviceptr(self.pointers[name] + dst), self.host[slot], n, None))
    self.check(self.cuda.cuEventRecord(self.events[slot], None))
  def wait(self, slot:int): self.check(self.cuda.cuEventSynchronize(self.events[slot]))
  def close(self):
    from tinygrad.device import BufferSpec
    self.dev.synchronize()
    for ev in self.events: self.check(self.cuda.cuEventDestroy_v2(ev))
    for h in self.host: self.dev.allocator.free(h, self.size, BufferSpec(host=True))

def threads() -> int: return max(2, min(8, os.cpu_count() or 2))

def load(path:str|os.PathLike, groups:list[Layout], device:str, progress:Callable[[int], object]=lambda n: None) -> dict[str, Tensor]:
  """Each group's tensors, uint8 on the device, filled from the file. A device's direct copy (FAST) that fails in its
  driver calls falls back to tinygrad's copy, with one line on stderr."""
  device = Device.canonicalize(device)
  fd = os.open(path, os.O_RDONLY)
  try:
    with ThreadPoolExecutor(threads()) as pool:
      if (fast := FAST.get(device.split(":")[0])) is not None:
        try: return fast(fd, groups, device, pool, progress)
        except FAST_ERRORS as e: print(f"weights: the direct copy to {device} failed ({type(e).__name__}: {e}); copying through tinygrad", file=sys.stderr)
      return _load_host(fd, groups, device, pool, progress)
  finally: os.close(fd)

def _load_host(fd:int, groups:list[Layout], device:str, pool:ThreadPoolExecutor, progress:Callable[[int], object]) -> dict[str, Tensor]:
  out: dict[str, Tensor] = {}
  for group in groups:
    arrays = {name: np.empty(nbytes, np.uint8) for name, (nbytes, _) in group.items()}
    stream(fd, items(group), HostStaging(arrays), pool, progress)
    got = {name: Tensor(a, device=device) for name, a in arrays.items()}
    Tensor.realize(*got.values())
    out.update(got)
  return out

def _load_cuda(fd:int, groups:list[Layout], device:str, pool:ThreadPoolExecutor, progress:Callable[[int], object]) -> dict[str, Tensor]:
  layout = {name: v for group in groups for name, v in group.items()}
  out = {name: Tensor.empty(nbytes, dtype=dtypes.uint8, device=device) for name, (nbytes, _) in layout.items()}
  pointers = {name: t.uop.buffer.ensure_allocated()._buf.value for name, t in out.items()}
  staging = CUDAStaging(device, pointers)
  try: stream(fd, items(layout), staging, pool, progress)
  finally: staging.close()
  return out

# a device's direct copy, and the errors of its driver calls (tinygrad's check raises RuntimeError; a call ctypes cannot
# make raises ArgumentError) after which tinygrad's own copy is used
FAST: dict[str, Callable[..., dict[str, Tensor]]] = {"CUDA": _load_cuda}
FAST_ERRORS = (RuntimeError, ctypes.ArgumentError, AttributeError, TypeError)
