"""examples/glm/jit_store: a JIT read from the store computes what a built one does, on this process's state; anything
that decides its programs (a pass setting, the model file, tinygrad_ext's version) misses it; a truncated, foreign or
stale entry is rebuilt with one line on stderr. run.py's second start reads its JITs and gives the same tokens."""
import json, re, contextlib, pathlib, subprocess, sys
import numpy as np
import pytest
import tinygrad_ext
from tinygrad import Tensor

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.glm import jit_store  # noqa: E402

IDENTITY = {"model": "/models/a.gguf", "size": 1, "mtime_ns": 1}

class Toy:
  """A model's state as a new process loads it: fresh buffers with the file's values."""
  def __init__(self):
    self.w = Tensor(np.arange(12, dtype=np.float32).reshape(3, 4) / 7).realize()
    self.seen = Tensor.zeros(3).contiguous().realize()  # advanced by every step, as a KV cache is
  def state(self): return {"w": self.w, "seen": self.seen}
  def step(self, x:Tensor, sampled:bool) -> Tensor:
    y = (x @ self.w.T).relu()
    self.seen.assign(self.seen + y)
    return (y + self.seen + (Tensor.rand(3) if sampled else 0)).realize()

def run(folder, what:dict, steps:int=4, identity=IDENTITY, seed:int=0) -> tuple[list, Toy, jit_store.JitStore]:
  toy, store = Toy(), jit_store.JitStore(folder, identity, lambda: toy.state())
  Tensor.manual_seed(seed)
  jit = store.jit({"jit": "toy", **what}, lambda x: toy.step(x, what.get("sampled", False)))
  outs = [jit(Tensor([i, 1.0, -2.0, 0.5]).realize()).numpy() for i in range(steps)]
  return outs, toy, store

@pytest.mark.parametrize("sampled", [False, True])
def test_a_stored_jit_computes_what_a_built_one_does_on_the_loading_models_state(tmp_path, sampled):
  built, toy1, s1 = run(tmp_path, {"sampled": sampled})
  hit, toy2, s2 = run(tmp_path, {"sampled": sampled})
  assert s1.events == ["toy: built"] and s2.events == ["toy: hit"]
  # the seconds each took: the capture and its compiling (a part of it, and some: its kernels were new), the reading
  t1, t2 = s1.seconds["toy"], s2.seconds["toy"]
  assert 0 < t1["compiling_s"] <= t1["built_s"] and set(t2) == {"read_s"} and t2["read_s"] > 0
  for a, b in zip(built, hit): np.testing.assert_array_equal(a, b)
  # the loaded JIT advanced this process's state, as the built one did its own
  np.testing.assert_array_equal(toy2.seen.numpy(), toy1.seen.numpy())
  assert np.abs(toy2.seen.numpy()).sum() > 0

def test_the_draws_of_a_stored_jit_follow_the_seed(tmp_path):
  run(tmp_path, {"sampled": True})
  a, b = run(tmp_path, {"sampled": True}, seed=1)[0], run(tmp_path, {"sampled": True}, seed=1)[0]
  c = run(tmp_path, {"sampled": True}, seed=2)[0]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))

@pytest.mark.parametrize("change", ["pass setting", "model file", "tinygrad_ext version", "sampling"])
def test_what_decides_the_programs_misses_the_store(tmp_path, monkeypatch, change):
  run(tmp_path, {"temperature": 0.0})
  what, identity = {"temperature": 0.0}, IDENTITY
  if change == "model file": identity = {**IDENTITY, "mtime_ns": 2}
  if change == "tinygrad_ext version": monkeypatch.setattr(tinygrad_ext, "__version__", tinygrad_ext.__version__ + ".dev1")
  if change == "sampling": what = {"temperature": 0.5}
  with tinygrad_ext.with_setting("TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT", "1") if change == "pass setting" else contextlib.nullcontext():
    assert run(tmp_path, what, identity=identity)[2].events == ["toy: built"]
  assert run(tmp_path, {"temperature": 0.0})[2].events == ["toy: hit"]

def test_passes_off_misses_the_store_of_passes_on(tmp_path):
  run(tmp_path, {})
  with tinygrad_ext.passes_off(): assert run(tmp_path, {})[2].events == ["toy: built"]
  assert run(tmp_path, {})[2].events == ["toy: hit"]

@pytest.mark.parametrize("damage", ["truncated", "foreign", "stale"])
def test_a_bad_entry_is_rebuilt_with_one_line(tmp_path, capsys, damage):
  want = run(tmp_path, {})[0]
  entry, = tmp_path.glob("*.jit")
  if damage == "truncated": entry.write_bytes(entry.read_bytes()[:entry.stat().st_size // 2])
  if damage == "foreign": entry.write_bytes(b"\x80\x04K\x01.")  # a pickle of another key
  if damage == "stale":  # written for a model whose state has another name
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(Toy, "state", lambda self: {"weight": self.w, "seen": self.seen})
  capsys.readouterr()
  got, _, store = run(tmp_path, {})
  if damage == "stale": monkeypatch.undo()
  err = capsys.readouterr().err.strip().splitlines()
  assert store.events == ["toy: built"] and len(err) == 1 and "unusable" in err[0] and entry.name in err[0]
  for a, b in zip(want, got): np.testing.assert_array_equal(a, b)
  if damage != "stale": assert run(tmp_path, {})[2].events == ["toy: hit"]  # rewritten once it captured

def test_an_unwritable_store_builds_and_says_so(tmp_path, capsys):
  (blocker := tmp_path / "file").write_text("")
  got, _, store = run(blocker / "jit", {})
  assert store.events == ["toy: built"] and "cannot write" in capsys.readouterr().err

def test_run_second_start_reads_its_jits_and_gives_the_same_tokens(tmp_path):
  from examples.glm import synth
  tiny = synth.write(tmp_path / "tiny.gguf", "tiny", "Q4_0", seed=0)
  cmd = [sys.executable, str(ROOT / "examples" / "glm" / "run.py"), "--model", str(tiny), "--cache-dir", str(tmp_path), "--count", "4",
         "--temperature", "5", "--seed", "3", "--json", str(tmp_path / "r.json")]
  first, second = [subprocess.run(cmd, capture_output=True, text=True, timeout=600) for _ in range(2)]
  assert first.returncode == second.returncode == 0, first.stderr + second.stderr
  def line(p, key): return next(ln for ln in p.stderr.splitlines() if key in ln)
  # (the demo's prompt is shorter than a chunk: it goes through the decode step, whose JIT is then the only one)
  assert "(JITs: decode: built)" in line(first, "first token") and "(JITs: decode: hit)" in line(second, "first token")
  # a build is announced as it starts (a cold start's minute on a GPU is not silent); a read is not
  assert [ln for ln in first.stderr.splitlines() if ln.startswith("compiling: ")] == \
         [f"compiling: decode (once for this model and these settings; later runs read it from {tmp_path / 'jit'})"]
  assert "compiling: " not in second.stderr
  assert line(first, "tokens:") == line(second, "tokens:")
  # the start line itemizes the JIT: its capture and the compiling in it, then its reading from the store
  second_json = json.loads((tmp_path / "r.json").read_text())["results"]["on"]
  assert re.search(r"decode built in [0-9.]+ s, compiling [0-9.]+ s of it", line(first, "first token"))
  assert re.search(r"decode read in [0-9.]+ s", line(second, "first token")) and "read_s" in second_json["jit_seconds"]["decode"]
  # the device memory it reports holding includes every byte of the model's tensors (read to the device once)
  assert second_json["device_gb"] * 1e9 >= 0.9 * tiny.stat().st_size and "device memory held" in second.stderr, second_json["device_gb"]

def test_an_entry_holds_no_bytes_of_the_jits_intermediates(tmp_path):
  # a prefill chunk's intermediates are hundreds of MB at full size: the entry keeps their buffers' sizes, not bytes
  toy, store = Toy(), jit_store.JitStore(tmp_path, IDENTITY, lambda: toy.state())
  def step(x:Tensor) -> Tensor:
    wide = (x.reshape(4, 1) * Tensor.arange(1 << 18, dtype="float32").reshape(1, -1)).contiguous()  # 4 MB, realized
    return (wide.sum(0) * toy.w.sum()).max().realize()
  jit = store.jit({"jit": "wide"}, step)
  want = [jit(Tensor([i, 1.0, -2.0, 0.5]).realize()).item() for i in range(3)]
  entry, = tmp_path.glob("*.jit")
  assert entry.stat().st_size < (1 << 20)
  toy2 = Toy()
  jit2 = jit_store.JitStore(tmp_path, IDENTITY, lambda: toy2.state()).jit({"jit": "wide"}, step)
  assert [jit2(Tensor([i, 1.0, -2.0, 0.5]).realize()).item() for i in range(3)] == want
