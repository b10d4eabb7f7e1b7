"""Captured JITs kept on disk across runs: a start that finds the decode step's and the prefill chunks' captures skips
scheduling, rewriting, rendering and compiling the model's kernels (a minute at full size) and runs them at once.

An entry is one pickled tinygrad CapturedJit (its compiled programs and planned buffers), under a key of everything
that decides its programs: the model file (path, size, mtime), how it was loaded (context, numerics, layout), the JIT
(decode or a prefill chunk, its sampling), the device and renderer, tinygrad's and tinygrad_ext's versions and the
active passes' cache_id(), and tinygrad's context settings. The model's own buffers (weights, KV cache, rope tables,
the RNG's seed and counter) are not in it: they are written by name and bound to this process's buffers on load. A
stale, truncated or foreign entry is rebuilt with one line on stderr, never used; an entry is written through a temp
file renamed into place, so no signal leaves one half-written."""
from __future__ import annotations
import dataclasses, functools, hashlib, importlib.metadata, json, os, pathlib, pickle, platform, sys, time
from typing import Callable
from tinygrad import Tensor, Device
from tinygrad.device import Buffer
import tinygrad.engine.jit as tinygrad_jit
from tinygrad.engine.jit import _TinyJit, CapturedJit
from tinygrad.helpers import ContextVar
from tinygrad.uop.ops import Ops, UOp, buffers
import tinygrad_ext
from . import synth

FORMAT = 1  # of an entry: bumped when what is written changes
# tinygrad context settings that change no program (what is printed or traced, compile workers, its own caches)
NOT_IN_KEY = {"DEBUG", "VIZ", "PROFILE", "TRACEMETA", "CAPTURE_PROCESS_REPLAY", "NO_COLOR", "PARALLEL", "CCACHE", "SCACHE",
              "CACHELEVEL", "TRACK_MATCH_STATS", "DEBUG_RANGEIFY"}

@functools.cache
def code_digest() -> str:
  """The source of what builds the programs (the passes, the model, this module): an edited file misses every entry,
  as a new version does."""
  files = sorted(pathlib.Path(tinygrad_ext.__file__).parent.rglob("*.py")) + [pathlib.Path(__file__).with_name("model.py"), pathlib.Path(__file__)]
  h = hashlib.sha256()
  for f in files: h.update(f.name.encode() + b"\0" + f.read_bytes())
  return h.hexdigest()[:16]

def rng_state(device:str) -> dict[str, Tensor]:
  """tinygrad's RNG seed and counter for device, created (realized) if no draw has made them yet: a sampling JIT reads
  and advances them, so they are the process's state, not the entry's (a JIT captured before they existed would
  capture their creation and restart its draws every step)."""
  if device not in Tensor._device_seeds: Tensor._next_counter(device, 0)
  seed, counter = Tensor._device_seeds[device], Tensor._device_rng_counters[device]
  Tensor.realize(seed, counter)
  return {"rng.seed": seed, "rng.counter": counter}

def state_buffers(tensors:dict[str, Tensor]) -> dict[UOp, str]:
  """Each realized buffer under the named tensors -> a name that a process loading the same model gives it too."""
  out: dict[UOp, str] = {}
  for name, t in tensors.items():
    for i, u in enumerate(u for u in t.uop.toposort() if u.op is Ops.BUFFER and u in buffers): out.setdefault(u, f"{name}#{i}")
  return out

class _Writer(pickle.Pickler):
  """Pickles a CapturedJit: a model buffer by its name; the JIT's own buffers with their Buffer, whose bytes are written
  only where the JIT reads what it does not write (a constant it holds), not for its intermediates (the planned arena)."""
  def __init__(self, f, names:dict[UOp, str], captured:CapturedJit):
    super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
    self.names = names
    self.state_bases = {id(buffers[u].base) for u in names if isinstance(buffers[u], Buffer)}
    self.blank = {id(b.base) for u in captured._written_uops if u not in names and isinstance(b:=buffers.get(u), Buffer)}
  def persistent_id(self, obj):
    if isinstance(obj, UOp) and obj.op is Ops.BUFFER and obj in buffers:
      return ("state", self.names[obj]) if obj in self.names else ("own", obj.src, obj.arg, obj.tag, buffers[obj])
    if isinstance(obj, Buffer) and obj._base is None:
      # the model's memory reached other than by name would be copied into the entry and come back apart from the model
      if id(obj) in self.state_bases: raise ValueError("a JIT buffer is a view of a model buffer")
      if id(obj) in self.blank: return ("blank", id(obj), obj.device, obj.size, obj.dtype, obj.options)
    return None

class _Reader(pickle.Unpickler):
  def __init__(self, f, by_name:dict[str, UOp]):
    super().__init__(f)
    self.by_name, self.own, self.blank = by_name, {}, {}
  def persistent_load(self, pid):
    if pid[0] == "state": return self.by_name[pid[1]]  # KeyError: written for other state (a stale entry)
    if pid[0] == "blank":
      _, ident, device, size, dtype, options = pid
      if ident not in self.blank: self.blank[ident] = Buffer(device, size, dtype, options=options).allocate()
      return self.blank[ident]
    _, src, arg, tag, buf = pid
    # a fresh slot: UOps are hash-consed, so the written one could name a buffer this process already has (or will make)
    if arg.slot not in self.own:
      self.own[arg.slot] = UOp(Ops.BUFFER, arg.dtype, src, dataclasses.replace(arg, slot=next(UOp.unique_num)), tag, None, buf)
    return self.own[arg.slot]

# seconds this process has spent compiling captured JITs' kernels (tinygrad's jit_lower compiles them all in one call)
compiling_s = 0.0
def _timed_compile_linear(*args, _compile=tinygrad_jit.compile_linear, **kwargs):
  global compiling_s
  st = time.perf_counter()
  try: return _compile(*args, **kwargs)
  finally: compiling_s += time.perf_counter() - st
tinygrad_jit.compile_linear = _timed_compile_linear

class StoredJit(_TinyJit):
  """A TinyJit that captures on its first call (no eager call first: the model's state exists before it) and then
  hands its capture to the store once, with the seconds that call took and the seconds of them spent compiling."""
  def __init__(self, fxn, captured:CapturedJit|None=None, on_capture:Callable[[CapturedJit, float, float], None]|None=None):
    super().__init__(fxn, captured)
    if fxn is not None: self.cnt = 1
    self.on_capture = on_capture
  def __reduce__(self): return _TinyJit, (None, self.captured)
  def __call__(self, *args, **kwargs):
    if self.on_capture is None: return super().__call__(*args, **kwargs)  # a replay: nothing to time or hand over
    st, compiled = time.perf_counter(), compiling_s
    ret = super().__call__(*args, **kwargs)
    if self.captured is not None:
      on_capture, self.on_capture = self.on_capture, None
      on_capture(self.captured, time.perf_counter() - st, compiling_s - compiled)
    return ret

class JitStore:
  """Entries under folder for one loaded model: identity says which (the file and how it was loaded), state() gives
  the model's named tensors."""
  def __init__(self, folder:str|os.PathLike, identity:dict, state:Callable[[], dict[str, Tensor]],
               on_build:Callable[[str], None]=lambda name: None):
    self.folder, self.identity, self.state = pathlib.Path(folder), identity, state
    self.on_build = on_build  # called with a JIT's name as it starts to build (a first run's silent minute, announced)
    self.events: list[str] = []  # what each JIT was: "decode: hit", "prefill32: built" (run.py reports them)
    # each name's first JIT: the seconds reading it ("read_s"), or capturing it ("built_s") and compiling its kernels in that
    self.seconds: dict[str, dict[str, float]] = {}

  def key(self, what:dict) -> dict:
    """Everything that decides the programs of the JIT `what` names, as JSON reads it back (the entry's header)."""
    ren = Device[Device.DEFAULT].renderer
    return json.loads(json.dumps({"format": FORMAT, **self.identity, **what, "device": Device.DEFAULT, "renderer": f"{type(ren).__name__}:{ren.target}",
            "tinygrad": importlib.metadata.version("tinygrad"), "tinygrad_ext": tinygrad_ext.__version__, "code": code_digest(),
            "passes": tinygrad_ext.cache_id(), "python": platform.python_version(),
            "context": {k: repr(v.value) for k, v in sorted(ContextVar._cache.items()) if k not in NOT_IN_KEY}}, default=str))

  def path(self, key:dict) -> pathlib.Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return self.folder / f"{key['jit']}-{digest}.jit"

  def names(self, what:dict) -> dict[UOp, str]:
    tensors = self.state()
    if what.get("sampled"): tensors.update(rng_state(Device.DEFAULT))
    return state_buffers(tensors)

  def jit(self, what:dict, fxn:Callable) -> _TinyJit:
    """The stored capture of what (a dict naming the JIT: "jit" its kind, "sampled" whether it draws) if there is a
    good one, else a JIT of fxn that stores its capture."""
    key = self.key(what)
    path, names = self.path(key), self.names(what)
    if path.exists():
      try:
        st = time.perf_counter()
        with open(path, "rb") as f:
          if pickle.load(f) != key: raise ValueError("written for another key")
          captured = _Reader(f, {v: k for k, v in names.items()}).load()
        if not isinstance(captured, CapturedJit): raise ValueError("not a captured JIT")
        self.events.append(f"{what['jit']}: hit")
        self.seconds.setdefault(what["jit"], {"read_s": time.perf_counter() - st})
        return StoredJit(None, captured)
      except Exception as e:  # truncated, written by other code, or for state this model lacks: rebuilt, never used
        print(f"jit store: {path.name} unusable ({type(e).__name__}: {str(e)[:80]}), rebuilding it", file=sys.stderr)
        path.unlink(missing_ok=True)
    self.events.append(f"{what['jit']}: built")
    self.on_build(what["jit"])
    def captured(captured:CapturedJit, built_s:float, compiling_s:float) -> None:
      self.seconds.setdefault(what["jit"], {"built_s": built_s, "compiling_s": compiling_s})
      self.write(path, key, captured, names)
    return StoredJit(fxn, on_capture=captured)

  def write(self, path:pathlib.Path, key:dict, captured:CapturedJit, names:dict[UOp, str]) -> None:
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      with synth.replacing(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(key, f)
        _Writer(f, names, captured).dump(captured)
    except OSError as e: print(f"jit store: cannot write {path}: {e.strerror or e} (the next start builds it again)", file=sys.stderr)
    except ValueError as e: print(f"jit store: not storing {path.name}: {e}", file=sys.stderr)
