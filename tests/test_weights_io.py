"""The weight loader: reads into a ring of staging slots, copies out to device tensors (examples/glm/weights_io.py)."""
import math, pathlib, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tinygrad import Tensor, Device

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.glm import model as glm, synth, weights_io  # noqa: E402

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
  return synth.write(tmp_path_factory.mktemp("glm") / "tiny.gguf", "tiny", "Q4_0", seed=0)

class DeferredStaging:
  """Copies a slot out only when the pipeline waits for it (as an asynchronous device copy may): a slot read into again
  before its wait would send the newer bytes."""
  def __init__(self, arrays, slots:int, size:int):
    self.arrays, self.slots, self.pending = arrays, [memoryview(bytearray(size)) for _ in range(slots)], {}
  def send(self, slot, item):
    assert slot not in self.pending, "sent twice without a wait"
    self.pending[slot] = item
  def wait(self, slot):
    if (item := self.pending.pop(slot, None)) is None: return
    name, _, n, dst = item
    self.arrays[name][dst:dst + n] = np.frombuffer(self.slots[slot][:n], np.uint8)

@st.composite
def layouts(draw):
  """A file and tensors assembled from random ranges of it."""
  data = np.frombuffer(draw(st.binary(min_size=64, max_size=400)), np.uint8)
  layout = {}
  for t in range(draw(st.integers(1, 4))):
    pieces, at = [], 0
    for _ in range(draw(st.integers(1, 5))):
      src = draw(st.integers(0, len(data) - 1))
      n = draw(st.integers(1, len(data) - src))
      pieces.append((src, n, at))
      at += n
    order = draw(st.permutations(range(len(pieces))))
    layout[f"t{t}"] = (at, [pieces[i] for i in order])
  return data, layout

def assembled(data:np.ndarray, layout) -> dict[str, np.ndarray]:
  out = {}
  for name, (nbytes, pieces) in layout.items():
    out[name] = np.zeros(nbytes, np.uint8)
    for src, n, dst in pieces: out[name][dst:dst + n] = data[src:src + n]
  return out

@settings(max_examples=60, deadline=None)
@given(layouts(), st.sampled_from([2, 4, 6]), st.integers(1, 64))
def test_stream_fills_every_tensor_and_waits_before_reusing_a_slot(tmp_path_factory, case, slots, chunk):
  data, layout = case
  path = tmp_path_factory.mktemp("f") / "file.bin"
  path.write_bytes(data.tobytes())
  arrays = {name: np.full(nbytes, 0xAB, np.uint8) for name, (nbytes, _) in layout.items()}
  todo = weights_io.items(layout, chunk)
  assert all(n <= chunk for _, _, n, _ in todo)
  moved = []
  with open(path, "rb") as f, ThreadPoolExecutor(3) as pool:
    weights_io.stream(f.fileno(), todo, DeferredStaging(arrays, slots, chunk), pool, moved.append)
  want = assembled(data, layout)
  assert all(np.array_equal(arrays[n], want[n]) for n in layout) and sum(moved) == sum(n for n, _ in layout.values())

def test_items_join_adjacent_pieces_and_cut_chunks():
  layout = {"a": (30, [(110, 10, 10), (100, 10, 0), (300, 10, 20)])}
  assert weights_io.items(layout, 8) == [("a", 100, 8, 0), ("a", 108, 8, 8), ("a", 116, 4, 16), ("a", 300, 8, 20), ("a", 308, 2, 28)]

def test_read_into_a_file_too_short_is_an_error(tmp_path):
  (p := tmp_path / "short.bin").write_bytes(b"x" * 10)
  with open(p, "rb") as f, pytest.raises(OSError, match="end of file"): weights_io.read_into(f.fileno(), memoryview(bytearray(16)), 0)

def reference_bytes(path, infos, name:str, final) -> np.ndarray:
  """A device tensor's bytes by numpy: the GGUF's, STACKED parts interleaved per expert, the shared expert appended."""
  data = np.memmap(path, np.uint8, mode="r")
  def base(name):
    if name in infos: return np.asarray(data[infos[name].offset:infos[name].offset + infos[name].nbytes])
    prefix, short = glm.block_prefix(name), name[len(glm.block_prefix(name)):]
    parts = [f"{prefix}{p}" for p in glm.STACKED[short]]
    lead = math.prod(infos[parts[0]].shape[:-2])
    return np.concatenate([base(p).reshape(lead, -1) for p in parts], axis=1).reshape(-1)
  own = base(name)
  prefix, short = glm.block_prefix(name), name[len(glm.block_prefix(name)):]
  if short in glm.SHARED_INTO and final.shape[0] == (infos.get(name) or infos[f"{prefix}{glm.STACKED[short][0]}"]).shape[0] + 1:
    own = np.concatenate([own, base(f"{prefix}{glm.SHARED_INTO[short]}")])
  return own

@pytest.mark.parametrize("stack,shared", [(True, True), (False, True), (True, False)])
def test_device_tensors_hold_the_stacked_and_appended_bytes(tiny, stack, shared):
  # on the test device (CUDA: pinned slots and asynchronous copies; elsewhere host arrays copied by tinygrad)
  _, infos = glm.read_header(tiny)
  groups = glm.weight_layout(infos, stack, shared)
  final = {name: t for g in groups for name, (t, _) in g.items()}
  assert (f"blk.1.ffn_gate_up_exps.weight" in final) == stack and ("blk.1.ffn_down_shexp.weight" in final) != shared
  got = weights_io.load(tiny, [{n: (t.nbytes, ps) for n, (t, ps) in g.items()} for g in groups], Device.DEFAULT)
  for name, t in final.items():
    assert np.array_equal(got[name].numpy(), reference_bytes(tiny, infos, name, t)), name

def test_weights_load_in_one_realize_a_block(tiny, monkeypatch):
  # a realize walks every live tensor's graph: one per tensor, with each tensor's dequant expression live as it arrived,
  # made the full model's load quadratic (844 realizes, 13 s of host time on DEV=NULL); at most one a block (and one for
  # the native types' reinterpretation) is linear
  kv, infos = glm.read_header(tiny)
  calls, realize = [], Tensor.realize
  monkeypatch.setattr(Tensor, "realize", lambda *a, **k: (calls.append(1), realize(*a, **k))[1])
  w = glm.load_weights(tiny, infos)
  assert 1 <= len(calls) <= len({glm.block_prefix(n) for n in infos}) + 1
  assert "blk.1.ffn_gate_up_exps.weight" in w and "blk.1.ffn_down_shexp.weight" not in w  # stacked, shared appended

def test_a_failing_direct_copy_falls_back_to_tinygrads(tiny, monkeypatch, capsys):
  # a device's direct copy (CUDA's pinned slots) that fails in a driver call: the same bytes through tinygrad's copy
  def broken(fd, groups, device, pool, progress):
    progress(1)
    raise RuntimeError("CUDA Error 1, invalid argument")
  monkeypatch.setitem(weights_io.FAST, Device.DEFAULT.split(":")[0], broken)
  _, infos = glm.read_header(tiny)
  groups = glm.weight_layout(infos)
  got = weights_io.load(tiny, [{n: (t.nbytes, ps) for n, (t, ps) in g.items()} for g in groups], Device.DEFAULT)
  final = {name: t for g in groups for name, (t, _) in g.items()}
  assert all(np.array_equal(got[n].numpy(), reference_bytes(tiny, infos, n, t)) for n, t in final.items())
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "direct copy" in err[0] and "invalid argument" in err[0]
