"""examples/glm's command lines at their edges: a bad --variant setting, the synthetic demo's note, a synthetic GGUF that
does not fit on its disk, and a signal (Ctrl-C, SIGTERM, SIGHUP) while a synthetic GGUF is written or a model runs.
Bad input is one line on stderr and exit status 2; a signal is one line and 128 + its number; neither leaves a file
(nor a temp file) behind."""
import os, pathlib, pickle, signal, subprocess, sys, threading, time
from collections import namedtuple
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.glm import run, synth  # noqa: E402

RUN = [sys.executable, str(ROOT / "examples" / "glm" / "run.py")]
SYNTH = [sys.executable, str(ROOT / "examples" / "glm" / "synth.py")]

def _default_signals():
  for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP): signal.signal(s, signal.SIG_DFL)

def _popen(cmd:list[str], **env) -> subprocess.Popen:
  # the signals at their defaults, as a terminal's process gets them: a test runner started in the background of a
  # non-interactive shell (or under nohup) passes SIGINT (SIGHUP) on ignored, and Python keeps an ignored signal ignored
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
                          preexec_fn=_default_signals)

def _wait_for(cond, proc:subprocess.Popen, what:str, timeout:float=120) -> None:
  end = time.monotonic() + timeout
  while not cond():
    if proc.poll() is not None: pytest.fail(f"exited ({proc.returncode}) before {what}: {proc.communicate()[1]}")
    if time.monotonic() > end: proc.kill(); pytest.fail(f"no {what} in {timeout} s")
    time.sleep(0.01)

def _one_line(err:str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]

# ***** --variant SETTING=VALUE: a bad setting is one line and exit 2, before any model is loaded *****

@pytest.mark.parametrize("variant, want", [
  ("TINYGRAD_EXT_MATVEC_POLICY=bogus", "TINYGRAD_EXT_MATVEC_POLICY='bogus': bad item 'bogus'"),
  ("TINYGRAD_EXT_MATVEC_POLICY=lanes=many", "TINYGRAD_EXT_MATVEC_POLICY='lanes=many'"),
  ("TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT=2", "TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT='2': must be 0 or 1"),
  ("TINYGRAD_EXT_NO_SUCH_SETTING=1", "need SETTING=VALUE"),
  ("TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT=", "need SETTING=VALUE"),
])
def test_variant_bad_setting(variant, want, tmp_path, capsys):
  # in-process: main returns before it writes or loads a model (the cache folder stays empty)
  assert run.main(["--variant", variant, "--cache-dir", str(tmp_path)]) == 2
  out, err = capsys.readouterr()
  assert _one_line(err).startswith("error: --variant") and want in err and out == ""
  assert list(tmp_path.iterdir()) == []

def test_variant_bad_setting_exit_status():
  # and as a process: exit status 2, one line (run.py's own check, not tinygrad_ext's SettingError escaping)
  p = subprocess.run(RUN + ["--variant", "TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT=yes"], capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and _one_line(p.stderr) == "error: --variant: TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT='yes': must be 0 or 1"

@pytest.mark.parametrize("flags, want", [
  (["--json", "/no/such/dir/r.json"], "--json /no/such/dir/r.json: no such directory"),
  (["--json", "."], "--json .: is a directory"),
])
def test_json_checked_up_front(flags, want, tmp_path, capsys):
  assert run.main(flags + ["--cache-dir", str(tmp_path)]) == 2
  assert _one_line(capsys.readouterr().err) == f"error: {want}" and list(tmp_path.iterdir()) == []

def test_cache_dir_unwritable(tmp_path, capsys):
  (blocker := tmp_path / "a_file").write_text("")
  assert run.main(["--cache-dir", str(blocker / "cache")]) == 2  # its parent is a file: no folder can be made there
  err = _one_line(capsys.readouterr().err)
  assert err.startswith(f"error: --cache-dir {blocker / 'cache'}: cannot write glm-tiny-") and err.endswith("; nothing written")
  assert [p.name for p in tmp_path.iterdir()] == ["a_file"]

def test_out_of_device_memory_is_one_line(tmp_path, monkeypatch, capsys):
  # tinygrad raises MemoryError when an allocation fails (the 512-token chunk with --passes off on an 80 GB H100)
  def no_memory(*args, **kwargs): raise MemoryError("Allocation of 2.00 MB failed on CUDA. Used: 78.16 GB")
  monkeypatch.setattr(run.glm, "load", no_memory)
  (model := tmp_path / "model.gguf").write_bytes(b"GGUF")
  assert run.main(["--model", str(model), "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json")]) == 2
  err = _one_line(capsys.readouterr().err)
  assert err.startswith("error: out of device memory: Allocation of 2.00 MB failed on CUDA. Used: 78.16 GB (") and "--max-context" in err
  assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]

def test_json_interrupted_leaves_no_file(tmp_path, monkeypatch):
  # --json goes through a temp file: Ctrl-C (or a full disk) halfway through leaves neither it nor a half r.json
  def half_then_ctrl_c(self, text):
    with open(self, "w") as f: f.write(text[:len(text) // 2])
    raise KeyboardInterrupt
  monkeypatch.setattr(pathlib.Path, "write_text", half_then_ctrl_c)
  with pytest.raises(KeyboardInterrupt): run.write_file(tmp_path / "r.json", '{"a": 1}')
  assert list(tmp_path.iterdir()) == []
  monkeypatch.undo()
  run.write_file(tmp_path / "r.json", '{"a": 1}')
  assert [(p.name, p.read_text(), p.stat().st_mode & 0o777) for p in tmp_path.iterdir()] == [("r.json", '{"a": 1}', 0o644)]

# ***** the synthetic demo says what its text is *****

def test_synthetic_note():
  note = run.synthetic_note(run.parse_args([]))
  assert "random weights" in note and "meaningless by design" in note and "README.md's Results section" in note
  assert "`python examples/glm/run.py --benchmark N`" in note and "\n" not in note
  assert "`python examples/glm/run.py --synthetic full --type Q4_K --benchmark N`" in run.synthetic_note(run.parse_args(["--synthetic", "full", "--type", "Q4_K"]))

# ***** a synthetic GGUF that does not fit is refused before it starts *****

DiskUsage = namedtuple("DiskUsage", "total used free")

def _free(monkeypatch, free:int) -> list:
  asked = []
  def disk_usage(p):
    asked.append(pathlib.Path(p))
    return DiskUsage(1 << 50, 0, free)
  monkeypatch.setattr(synth.shutil, "disk_usage", disk_usage)
  return asked

def test_file_size_estimate(tmp_path):
  # the estimate the free-space check uses is the written file's size within the check's margin (64 MB and 1%)
  path = synth.write(tmp_path / "t.gguf", "tiny", "Q4_K")
  est, size = synth.file_size(synth.PRESETS["tiny"], synth.QT.Q4_K), path.stat().st_size
  assert size <= est <= size + (1 << 20)
  assert 16.5e9 < synth.file_size(synth.PRESETS["full"], synth.QT.Q4_0) < 17.3e9

def test_synth_refuses_without_space(tmp_path, monkeypatch, capsys):
  need = synth.file_size(synth.PRESETS["tiny"], synth.QT.Q4_0)
  asked = _free(monkeypatch, need + (64 << 20) - 1)  # a byte short of the size and its margin
  out = tmp_path / "new" / "dir" / "t.gguf"
  assert synth.main(["tiny", str(out)]) == 2
  err, where = _one_line(capsys.readouterr().err), tmp_path.resolve()
  assert err.startswith(f"error: {out}: needs 3.2 MB and a 67.1 MB margin, {where} has ") and err.endswith(" free; nothing written")
  assert asked == [where] and list(tmp_path.iterdir()) == []  # the file system of the folder's first existing ancestor; no folder made
  _free(monkeypatch, need + (64 << 20) + need // 100)  # enough: it writes
  assert synth.main(["tiny", str(out)]) == 0 and [p.name for p in out.parent.iterdir()] == ["t.gguf"]

def test_run_refuses_synthetic_without_space(tmp_path, monkeypatch, capsys):
  # run.py writes its cached synthetic model through synth.write: refused before it says "writing", exit 2
  _free(monkeypatch, 1 << 20)
  assert run.main(["--synthetic", "full", "--cache-dir", str(tmp_path / "cache")]) == 2
  out, err = capsys.readouterr()
  assert _one_line(err).startswith(f"error: {tmp_path / 'cache'}/glm-full-Q4_0-seed0-v") and "needs 16.9 GB and a 235.8 MB margin" in err
  assert out == "" and list(tmp_path.iterdir()) == []

# ***** a signal while a synthetic GGUF is written leaves no file *****

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_synth_signal_leaves_no_file(tmp_path, sig):
  # a real signal to a real writer, after its temp file exists; GLM_SYNTH_TEST_DELAY spreads the tiny model's write over
  # ~2.5 s (50 ms a tensor) so the signal lands mid-write however fast this disk is
  out = tmp_path / "t.gguf"
  p = _popen(SYNTH + ["tiny", str(out)], GLM_SYNTH_TEST_DELAY="0.05")
  _wait_for(lambda: list(tmp_path.glob("*.tmp")), p, "temp file")
  time.sleep(0.2)  # into the tensors
  p.send_signal(sig)
  _, err = p.communicate(timeout=60)
  name = signal.Signals(sig).name
  assert p.returncode == 128 + sig, err
  assert _one_line(err) == f"{'interrupted' if sig == signal.SIGINT else 'terminated'} ({name}): {out} not written"
  assert list(tmp_path.iterdir()) == []

def test_run_sigterm_while_writing_synthetic(tmp_path):
  # run.py writing its cached synthetic model: SIGTERM removes the temp file, one line after the "writing" line, 143
  p = _popen(RUN + ["--cache-dir", str(tmp_path)], GLM_SYNTH_TEST_DELAY="0.05")
  _wait_for(lambda: list(tmp_path.glob("*.tmp")), p, "temp file")
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=60)
  assert p.returncode == 143, err
  lines = err.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith("writing synthetic GLM") and lines[1] == "terminated (SIGTERM)", err
  assert "Traceback" not in err and out == "" and list(tmp_path.iterdir()) == []

def test_signal_while_creating_or_removing_temp_file_waits():
  # inside hold() (the temp file's creation and removal) a signal is raised when the hold ends, not in the middle
  if threading.current_thread() is not threading.main_thread(): pytest.skip("signal handlers need the main thread")
  before, done = signal.getsignal(signal.SIGTERM), []
  with synth._SignalGuard() as guard:
    # (only where the guard handles it: a signal it left alone would end this test process)
    if signal.SIGTERM not in guard.old: pytest.skip(f"SIGTERM has a handler of this process's own ({before})")
    with pytest.raises(synth.Terminated) as e:
      with guard.hold():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here, and keeps it
        done.append(1)
    assert done == [1] and e.value.exit_status == 143
    if signal.SIGINT in guard.old:  # (not where this process started with SIGINT ignored)
      with pytest.raises(KeyboardInterrupt):  # outside a hold, at once
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
  assert signal.getsignal(signal.SIGTERM) == before  # given back

def test_a_signal_dropped_inside_a_del_is_raised_later_without_a_traceback():
  # tinygrad frees buffers in __del__, and Python drops (prints) an exception raised inside one: the signal stays
  # pending, and the command line raises it at its next check (run.py: each decode call, before writing --json)
  code = ("import os, signal, sys, time\n"
          f"sys.path.insert(0, {str(ROOT)!r})\n"
          "from examples.glm import synth\n"
          "synth.raise_on_termination()\n"
          "class D:\n"
          "  def __del__(self): os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.5)\n"
          "D()\n"
          "print('went on', flush=True)\n"
          "try: synth.raise_if_signalled()\n"
          "except synth.Terminated as e: print('raised', e.exit_status)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=_default_signals)
  assert (out.stdout, out.stderr) == ("went on\nraised 143\n", ""), out

# ***** Ctrl-C or SIGTERM while run.py loads, compiles or generates: one line, no traceback *****

INFO = ("model:", "prompt:", "note:")  # what run.py says on stderr before it generates (stdout is the generated text)
BUILDING = "compiling: "  # and before a JIT's first (capturing) call, where its cache has none

class _Follow:
  """A run's stderr lines as they come."""
  def __init__(self, p:subprocess.Popen):
    self.p, self.lines = p, []
    self.thread = threading.Thread(target=lambda: self.lines.extend(iter(p.stderr.readline, "")), daemon=True)
    self.thread.start()
  def has(self, prefix:str) -> bool: return any(l.startswith(prefix) for l in self.lines)
  def finish(self, timeout:float=120) -> str:
    """stderr past the info lines."""
    self.p.stdout.read()
    self.p.wait(timeout=timeout); self.thread.join(timeout)
    return "".join(l for l in self.lines if not l.startswith((*INFO, BUILDING)))

def test_run_interrupted_while_generating(tmp_path):
  # two runs at once: the default synthetic demo gets Ctrl-C, the same model given by --model gets SIGTERM, each once it
  # has printed its prompt (the model loaded, the decode step about to compile and generate 3000 tokens)
  demo = _Follow(_popen(RUN + ["--cache-dir", str(tmp_path), "--count", "3000"], PYTHONUNBUFFERED="1"))
  _wait_for(lambda: demo.has("note:"), demo.p, "note")
  model = next(tmp_path.glob("*.gguf"))
  given = _Follow(_popen(RUN + ["--model", str(model), "--count", "3000"], PYTHONUNBUFFERED="1"))
  demo.p.send_signal(signal.SIGINT)
  _wait_for(lambda: given.has("prompt:"), given.p, "prompt")
  time.sleep(1)  # into the compile
  given.p.send_signal(signal.SIGTERM)
  for run_, sig, line in ((demo, signal.SIGINT, "interrupted (SIGINT)"), (given, signal.SIGTERM, "terminated (SIGTERM)")):
    err = run_.finish()
    assert run_.p.returncode == 128 + sig, err
    # (the demo wrote its model first, and said so in two lines)
    assert _one_line("\n".join(l for l in err.splitlines() if not l.startswith(("writing synthetic GLM", "  wrote ")))) == line
  # the demo says its text is meaningless before it generates; a model of one's own does not
  assert [l.split(":")[0] for l in demo.lines if l.startswith(INFO)] == ["model", "prompt", "note"]
  assert [l.split(":")[0] for l in given.lines if l.startswith(INFO)] == ["model", "prompt"]
  # the cached model complete and no temp file; the demo may have stored a JIT it captured before its Ctrl-C came (the
  # prompt's prefill chunk, on a loaded machine): such an entry is whole, its header readable
  files = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
  entries = [f for f in files if f != pathlib.Path(model.name)]
  assert len(entries) < len(files) and all(f.parent == pathlib.Path("jit") and f.suffix == ".jit" for f in entries), files
  for f in entries:
    with open(tmp_path / f, "rb") as fh: assert pickle.load(fh)["jit"] == f.name.split("-")[0]

# ***** what generation times *****

def test_a_stored_jits_first_call_is_warmup_not_a_timed_replay():
  # a JIT read from the store is captured before its first call, which builds its device graph (0.62 s of an H100 run's
  # first step, 2026-12-07g): timed as a replay it gave 1.6 tok/s; the calls after it are the replays
  class Jit: captured = object()  # as the store hands it over
  class Model:
    def decode_ahead(self, jit, token, pos, n): return [token + 1 + i for i in range(n)]
  out, calls = run.generate(Model(), Jit(), 1, 0, 10, eog=set(), ahead=4, show=lambda t: None)
  assert out == list(range(1, 11))
  assert [(n, replay) for _, n, replay in calls] == [(1, False), (4, True), (4, True)]
