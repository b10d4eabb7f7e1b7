#!/usr/bin/env python3
"""Greedy decode of GLM-4.7-Flash (GGUF arch deepseek2) in plain tinygrad, with tinygrad_ext's passes on, off, or both.

  python examples/glm/run.py                                   # a tiny synthetic GLM (written once, cached), default device
  python examples/glm/run.py --model GLM-4.7-Flash-Q4_0.gguf --prompt "Hello" --count 32
  python examples/glm/run.py --synthetic full --benchmark 20 --passes compare
  python examples/glm/run.py --profile                         # per-kernel table of one decode token

The prompt is written into the GGUF's chat template (`tokenizer.chat_template`) unless --raw, tokenized with its own
tokenizer (examples/glm/tokenizer.py), and goes through the same jitted one-token decode step as the generated tokens
(one compile, not two). The generated text streams to stdout as it is decoded; generation ends at an end-of-generation
token (eos, and the template's end of turn: <|user|>, <|observation|>) or after --count tokens. Everything else (the
model, timings, tables) goes to stderr. Speed is measured after the JIT has captured: each step is one TinyJit replay
plus reading back the chosen token.
"""
import time
STARTED = time.perf_counter()  # the time to the first token counts from here (the imports are part of it)
import tinygrad_ext  # registers the passes (first, before anything compiles)
import argparse, contextlib, json, os, pathlib, sys
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo root: examples.glm is a package
from tinygrad import Device, Tensor, GlobalCounters, dtypes  # noqa: E402
from tinygrad.uop.ops import Ops  # noqa: E402
from examples.glm import model as glm, synth, stats, roofline, jit_store  # noqa: E402
from examples.glm.tokenizer import Tokenizer, TokenizerError, StreamDecoder  # noqa: E402

SYNTH_VERSION = 4  # bump when synth.py's output changes, so cached files are rewritten

class UsageError(Exception): pass

class Parser(argparse.ArgumentParser):
  def error(self, message): raise UsageError(message)  # one line and exit code 2, from main()

def parse_args(argv):
  p = Parser(description="GLM-4.7-Flash decode in tinygrad (GGUF deepseek2)")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--model", metavar="PATH.gguf", help="a GLM-4.7-Flash GGUF (llama.cpp arch deepseek2)")
  src.add_argument("--synthetic", choices=sorted(synth.PRESETS), help="a synthetic GLM with random weights (default: tiny)")
  p.add_argument("--type", default="Q4_0", choices=list(synth.TYPES), help="type of every matmul weight of --synthetic (default Q4_0)")
  p.add_argument("--mix", choices=synth.MIXES, help="--synthetic with each tensor in the type llama.cpp's quantizer picks for GLM-4.7-Flash")
  p.add_argument("--synth-seed", type=int, default=0, help="seed of --synthetic's random weights")
  p.add_argument("--prompt", default="The quick brown fox", help="prompt text (a user turn in the chat template, unless --raw)")
  p.add_argument("--chat", action="store_true", help="an interactive chat: each line on stdin is a user turn (the KV cache is kept across turns)")
  p.add_argument("--raw", action="store_true", help="tokenize --prompt as it is (control tokens written in it are parsed), no chat template")
  p.add_argument("--verbose", action="store_true", help="print the prompt's token ids and text to stderr")
  p.add_argument("--count", type=int, default=16, help="tokens to generate at most (default 16)")
  p.add_argument("--temperature", type=float, default=0.0, help="sample from softmax(logits / T) (default 0: greedy, the argmax)")
  p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="sample among the fewest most likely tokens whose probability reaches p (default 1)")
  p.add_argument("--seed", type=int, default=0, help="seed of the sampling (tinygrad's device RNG): the same seed, the same tokens")
  p.add_argument("--benchmark", type=int, metavar="N", help="time N decode steps after the JIT warmup")
  p.add_argument("--ahead", type=int, default=8, metavar="N",
                 help="decode steps launched before the host reads their tokens (default 8; 1: each token read before the next step)")
  p.add_argument("--passes", choices=("on", "off", "compare"), default="on", help="tinygrad_ext passes (compare: off, then on)")
  p.add_argument("--without", metavar="PASS[,PASS]", help="also run with every pass on but these (an A/B of single passes)")
  p.add_argument("--variant", action="append", default=[], metavar="SETTING=VALUE",
                 help="also run with every pass on and this pass setting (e.g. TINYGRAD_EXT_MATVEC_POLICY=upcast_rows=1); repeatable")
  p.add_argument("--prefill", type=int, metavar="N", help="also time a one-forward prefill of an N-token prompt (three calls: compiling, rescheduling, cached)")
  p.add_argument("--profile", action="store_true", help="per-kernel timing of one decode token (and of a prefill chunk, with --prefill)")
  p.add_argument("--plot", metavar="PATH.png", help="with --profile: draw its kernels as achieved GB/s against the read ceiling")
  p.add_argument("--json", metavar="PATH", help="write the results as JSON")
  p.add_argument("--max-context", type=int, default=None, help="KV cache length (default min(4096, the model's context))")
  p.add_argument("--separate-shared-expert", action="store_true",
                 help="keep the shared expert's own matvecs (default: appended to the routed experts, computed with them; see model.SHARED_INTO)")
  p.add_argument("--separate-projections", action="store_true",
                 help="keep the GGUF's projections separate (default: stack those sharing an input, one matmul each; see model.STACKED)")
  p.add_argument("--dtype", choices=tuple(glm.NUMERICS), default="mixed",
                 help="numerics policy (model.NUMERICS; default mixed: float32 residual stream and matmul outputs, fp16 matmul inputs and KV cache)")
  p.add_argument("--cache-dir", default=os.environ.get("GLM_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "tinygrad_ext")),
                 help="where synthetic models and captured JITs (jit/) are written (env GLM_CACHE_DIR)")
  p.add_argument("--no-jit-store", action="store_true",
                 help="build every JIT (default: a JIT captured by an earlier run of the same model and settings is read from --cache-dir)")
  a = p.parse_args(argv)
  if a.count < 1: p.error("--count must be >= 1")
  if a.benchmark is not None and a.benchmark < 1: p.error("--benchmark must be >= 1")
  if a.ahead < 1: p.error("--ahead must be >= 1")
  if a.max_context is not None and a.max_context < 2: p.error("--max-context must be >= 2")
  if a.model is not None and (a.type != "Q4_0" or a.synth_seed != 0 or a.mix): p.error("--type, --mix and --synth-seed apply to --synthetic, not --model")
  if a.temperature < 0: p.error("--temperature must be >= 0 (0: greedy)")
  if a.top_k < 0: p.error("--top-k must be >= 0 (0: every token)")
  if not 0 < a.top_p <= 1: p.error("--top-p must be in (0, 1]")
  if a.mix and a.type != "Q4_0": p.error("--type and --mix exclude each other (--mix gives each tensor its type)")
  for v in a.variant:
    key, _, val = v.partition("=")
    if key not in tinygrad_ext.settings() or not val: p.error(f"--variant {v}: need SETTING=VALUE, SETTING one of {', '.join(tinygrad_ext.settings())}")
    try: tinygrad_ext.with_setting(key, val)  # checks the value (unused: run_mode enters it), before any model is loaded
    except tinygrad_ext.SettingError as e: p.error(f"--variant: {e}")  # e names the setting and its value
  if a.json is not None:
    if pathlib.Path(a.json).is_dir(): p.error(f"--json {a.json}: is a directory")
    if not pathlib.Path(a.json).resolve().parent.is_dir(): p.error(f"--json {a.json}: no such directory")
  if a.plot is not None:
    if not a.profile: p.error("--plot draws the --profile of a token: add --profile")
    if pathlib.Path(a.plot).suffix not in (".png", ".svg", ".pdf"): p.error(f"--plot {a.plot}: the file must end in .png, .svg or .pdf")
    if not pathlib.Path(a.plot).resolve().parent.is_dir(): p.error(f"--plot {a.plot}: no such directory")
    try: roofline.check_available()
    except ImportError as e: p.error(str(e))
  return a

def synthetic_path(a) -> pathlib.Path:
  """The cached synthetic GGUF for (preset, type, seed), written on first use (atomically: a crash leaves no file)."""
  preset = a.synthetic or "tiny"
  kind = f"mix-{a.mix}" if a.mix else a.type
  path = pathlib.Path(a.cache_dir) / f"glm-{preset}-{kind}-seed{a.synth_seed}-v{SYNTH_VERSION}.gguf"
  if not path.exists():
    st = time.perf_counter()
    try:
      # refused (SynthError) or failing (OSError) before it says "writing", where it can: one line then (write checks too)
      synth.check_free_space(path, synth.file_size(synth.PRESETS[preset], a.mix or synth.TYPES[a.type]))
      path.parent.mkdir(parents=True, exist_ok=True)
      print(f"writing synthetic GLM ({preset}, {kind}, seed {a.synth_seed}) to {path}", file=sys.stderr)
      synth.write(path, preset, a.type, a.synth_seed, progress=preset != "tiny", mix=a.mix)
    except OSError as e: raise UsageError(f"--cache-dir {a.cache_dir}: cannot write {path.name}: {e.strerror or e}; nothing written") from None
    print(f"  wrote {path.stat().st_size/1e6:,.0f} MB in {time.perf_counter()-st:.1f} s", file=sys.stderr)
  return path

def synthetic_note(a) -> str:
  """The line a synthetic run prints before it generates: what its text is, and where speed is measured."""
  cmd = "python examples/glm/run.py" + (f" --synthetic {a.synthetic}" if a.synthetic else "") + (f" --type {a.type}" if a.type != "Q4_0" else "") + \
        (f" --mix {a.mix}" if a.mix else "")
  return (f"note: a synthetic GLM has random weights, so the generated text is meaningless by design; for speed see README.md's "
          f"Results section, or time N decode steps here with `{cmd} --benchmark N`")

def write_file(path:str|os.PathLike, text:str) -> None:
  """Writes text to path through a temp file renamed into place: an interrupted or failed write leaves no file."""
  with synth.replacing(pathlib.Path(path).resolve()) as tmp: pathlib.Path(tmp).write_text(text)

# ***** tokenizer *****

# ***** running *****

def kernel_roles(m:glm.GLM) -> dict:
  """Device buffer -> role, to sort kernels into kinds by what they read."""
  named = m.state()
  roles = {}
  for buf, name in stats.buffers_of(named).items():
    short = name.split(".")[-1].split("#")[0]
    roles[buf] = ("routing" if short in ("router", "router_bias") else "rope" if name.startswith("rope") else "cache" if short == "cache" else
                  "embedding" if short == "token_embd" else "norm" if "norm" in short else "matmul")
  return roles

def classify(roles:dict):
  """kind(call, bufs): a kernel's kind from the model buffers it reads, then from its ops (a heuristic: fused kernels
  get the kind of their heaviest part, e.g. a norm fused into the next matmul counts as matmul)."""
  def kind(call, bufs) -> str:
    read, ops = {roles.get(b) for b in bufs}, stats.kernel_ops(call)
    if "routing" in read: return "routing"  # the router gemv (and what fuses into it)
    if "matmul" in read: return "matmul"
    # the top-k and the expert weights: the (n_used,) int32 expert ids / ranks between the routing kernels
    if any(dtypes.is_int(b.dtype) and b.size > 1 and b not in roles for b in bufs): return "routing"
    if "rope" in read: return "rope"
    if "cache" in read: return "attention"
    if Ops.SQRT in ops: return "norm"
    if "embedding" in read: return "other"  # the token's row
    # an exp without a reduce (tinygrad names elementwise kernels E_): the MoE's silu(gate) * up
    if Ops.EXP2 in ops and stats.ansistrip(call.src[0].arg.name).startswith("E_") and not call.src[0].arg.vars: return "activation"
    if Ops.EXP2 in ops or call.src[0].arg.vars: return "softmax"  # exp/sum/normalize, and the max over the positions
    return "other"
  return kind

def sync(): Device[Device.DEFAULT].synchronize()

def mode_passes(mode:str):
  """The passes of a run: "off", "on", or "without a,b" (every pass on but those)."""
  if mode == "off": return tinygrad_ext.passes_off()
  if mode.startswith("without "): return tinygrad_ext.without(*mode.removeprefix("without ").split(","))
  if mode.startswith("with "):  # "with SETTING=VALUE": every pass on, one setting changed
    return tinygrad_ext.with_setting(*mode.removeprefix("with ").split("=", 1))
  return contextlib.nullcontext()

def log(*args): print(*args, file=sys.stderr, flush=True)

def prompt_ids(tok:Tokenizer, a) -> list[int]:
  if a.raw or not tok.chat_template: return tok.encode(a.prompt, parse_special=True, add_bos=tok.add_bos)
  return tok.encode(tok.render_chat([{"role": "user", "content": a.prompt}]), parse_special=True)

def common_prefix(a:list[int], b:list[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]: n += 1
  return n

def generate(m:glm.GLM, jit, first:int, pos:int, count:int, eog, ahead:int, show) -> tuple[list[int], list[tuple[float, int, bool]]]:
  """Decodes from first (the token after the prompt, at pos) until an end-of-generation token or count tokens (first
  included); show(t) gets each token that does not end generation, as it is read. Once the JIT is captured, `ahead`
  steps go at a time (model.decode_ahead): a burst may run past the end of generation, whose tokens are dropped (the
  KV rows it wrote past the end are overwritten by whatever is fed there next). Returns the tokens and, per call,
  (seconds, steps, whether it replayed a capture already run in this process)."""
  out: list[int] = []
  calls: list[tuple[float, int, bool]] = []
  def take(t:int) -> bool:
    out.append(t)
    if t in eog: return False
    show(t)
    return len(out) < count
  going, ran_captured = take(first), False
  while going:
    synth.raise_if_signalled()  # a signal whose exception a __del__ dropped ends generation here
    # a replay once the captured JIT has run in this process: one read from the store builds its graph on its first call
    replay = ran_captured
    n = min(ahead, count - len(out)) if replay else 1
    s0 = time.perf_counter()
    new = m.decode_ahead(jit, out[-1], pos, n)
    calls.append((time.perf_counter() - s0, n, replay))
    ran_captured = jit.captured is not None
    pos += n
    for t in new:
      if not (going := take(t)): break
  return out, calls

def chat(m:glm.GLM, tok:Tokenizer, a) -> None:
  """Each line on stdin a user turn; the reply streams to stdout. The whole conversation is written into the template
  each turn, and only what differs from what the KV cache holds is fed (the template writes a past reply without its
  thinking, so from that reply on), at its positions; the rest of the cache stays."""
  if not tok.chat_template: raise UsageError("--chat needs a GGUF with tokenizer.chat_template")
  Tensor.manual_seed(a.seed)
  sampling = glm.Sampling(a.temperature, a.top_k, a.top_p)
  jit, cached, messages = m.decoder(sampling), [], []
  pf = m.prefiller(sampling, jit)
  for line in sys.stdin:
    messages.append({"role": "user", "content": line.rstrip("\n")})
    ids = tok.encode(tok.render_chat(messages), parse_special=True)
    keep = min(common_prefix(cached, ids), len(ids) - 1)  # at least the last token is fed: its step gives the reply's first
    if len(ids) + a.count > m.max_context: raise UsageError(f"the conversation ({len(ids)} tokens) + --count exceed --max-context {m.max_context}")
    if a.verbose: log(f"turn {len(messages) // 2 + 1}: {len(ids)} tokens, {keep} cached, fed {ids[keep:]}\nfed text: {tok.decode(ids[keep:])!r}")
    t, _ = pf(ids[keep:], keep)  # the new tokens in prefill chunks; the reply's first token
    stream = StreamDecoder(tok)
    reply, _ = generate(m, jit, t, len(ids), a.count, tok.eog, a.ahead, lambda t: print(stream.push(t), end="", flush=True))
    print(stream.flush(), flush=True)
    cached = ids + reply[:-1]  # the KV cache holds every token fed; the reply's last was not
    messages.append({"role": "assistant", "content": tok.decode([r for r in reply if r not in tok.eog], skip_special=True)})

def run_mode(m:glm.GLM, tok:Tokenizer, prompt:list[int], a, mode:str) -> dict:
  """Generates with a fresh decode JIT (compiled with the passes on or off); returns the measurements."""
  res: dict = {"passes": mode}
  with mode_passes(mode):
    res["active_passes"] = list(tinygrad_ext.active_passes())
    Tensor.manual_seed(a.seed)  # each run draws the same random numbers
    sampling = glm.Sampling(a.temperature, a.top_k, a.top_p)
    jit = m.decoder(sampling)
    pf = m.prefiller(sampling, jit)  # whole chunks of the prompt, the rest through the decode step
    s0 = time.perf_counter()
    t, logits = pf(prompt)  # the prompt in prefill chunks: the first generated token
    res["prompt_s"], res["first_token_after_s"] = time.perf_counter() - s0, time.perf_counter() - STARTED
    # the logits that chose the first generated token: a compare checks the two modes' numerics on them
    res["first_logits"] = logits.numpy()[0].astype(np.float64)
    stream = StreamDecoder(tok)
    out, calls = generate(m, jit, t, len(prompt), a.count, tok.eog, a.ahead, lambda t: print(stream.push(t), end="", flush=True))
    print(stream.flush(), flush=True)
    pos, t = len(prompt) + sum(n for _, n, _ in calls), out[-1]
    # the first two calls of a TinyJit run the step (compiling its kernels) and capture it (in the prompt's prefill, if
    # it went through the decode step); the rest replay
    res["tokens"], res["text"], res["ahead"] = out, tok.decode(out), a.ahead
    res["warmup_s"] = sum(s for s, _, replay in calls if not replay)
    if calls: res["first_decode_s"] = calls[0][0] / calls[0][1]  # (a step of the first burst, where the JIT was read from the store)
    res["stopped_at_eog"] = out[-1] in tok.eog
    res["kernels_per_token"] = len(stats.kernel_calls(jit)) if jit.captured is not None else None
    res["programmatic_edges"] = stats.programmatic_edges(jit) if jit.captured is not None else None
    if (later := [(s, n) for s, n, replay in calls if replay]): res["generate_ms_per_token"] = 1e3 * sum(s for s, _ in later) / sum(n for _, n in later)
    if a.benchmark:
      while jit.captured is None: t, _ = m.decode(jit, t, pos); pos += 1
      # a benchmark times --benchmark steps whatever tokens come (an end of generation does not stop it), --ahead at a time
      sync(); s0 = time.perf_counter()
      for done in range(0, a.benchmark, a.ahead):
        n = min(a.ahead, a.benchmark - done)
        t = m.decode_ahead(jit, t, pos, n)[-1]
        pos += n
      sync(); dt = (time.perf_counter() - s0) / a.benchmark
      res["benchmark"] = {"steps": a.benchmark, "ms_per_token": dt * 1e3, "tok_per_s": 1 / dt}
    if a.profile:
      while jit.captured is None: t, _ = m.decode(jit, t, pos); pos += 1
      args = (m.fed.bind(t), m.start_pos.bind(pos))
      res["profile"] = stats.summarize(stats.time_kernels(jit, args, classify(kernel_roles(m))))
      res["profile"]["step_device_ms"] = stats.step_device_seconds(jit, args) * 1e3
    if a.prefill:
      # the prompt's prefill JITs: the first call compiles, the second captures, the third replays (the steady state);
      # as a prompt goes, whole chunks and then the decode step (glm.plan)
      ids, calls, pf = [(7 * i + 3) % m.cfg.vocab for i in range(a.prefill)], [], m.prefiller(sampling, jit)
      for _ in range(3):
        sync(); s0 = time.perf_counter()
        pf(ids)
        sync(); calls.append(time.perf_counter() - s0)
      res["prefill"] = {"tokens": a.prefill, "first_s": calls[0], "second_s": calls[1], "s": calls[2], "tok_per_s": a.prefill / calls[2]}
      if a.profile and (planned := glm.plan(a.prefill)[0]):  # the kernels of the prompt's first chunk, with their arithmetic rate
        T = planned[0]
        res["prefill"]["profile"] = {"chunk": T, **stats.summarize(stats.time_kernels(pf.jit(T), pf.args(T, ids[:T], 0), classify(kernel_roles(m))))}
  # what this process holds on the device now: the weights, the KV cache, each JIT's planned buffers
  res["device_gb"] = GlobalCounters.mem_used_per_device[Device.DEFAULT] / 1e9
  return res

def logit_agreement(off:np.ndarray, on:np.ndarray) -> dict:
  """How far the two modes' logits are apart, and how close off's top logits are to each other: a different greedy token
  is rounding, not a wrong kernel, when other logits lie within the rounding error of the top one."""
  scale = float(np.abs(off).max())
  err, top = float(np.abs(on - off).max()) / scale, np.sort(off)[::-1]
  return {"rel_err": err, "off_top2_gap": float(top[0] - top[1]) / scale, "off_within_err": int((off >= top[0] - 2 * err * scale).sum())}

def ms_per_token(res:dict) -> float|None: return res.get("benchmark", {}).get("ms_per_token", res.get("generate_ms_per_token"))

def report(res:dict):
  tag, ms = f"passes {res['passes']}", ms_per_token(res)
  log(f"[{tag}] tokens: {res['tokens']}\n[{tag}] text: {res['text']!r}" + (" (ended at an end-of-generation token)" if res["stopped_at_eog"] else ""))
  what = f"benchmark {res['benchmark']['steps']} steps" if "benchmark" in res else "generation"
  edges = f", {res['programmatic_edges']} programmatic graph edges" if res.get("programmatic_edges") else ""
  if ms is not None: log(f"[{tag}] {1e3/ms:.2f} tok/s, {ms:.2f} ms/token, {res['kernels_per_token']} kernels/token{edges} ({what}, after JIT warmup)")
  else: log(f"[{tag}] {res['kernels_per_token']} kernels/token (too few steps to time after JIT warmup: use --count >= 4: the first token comes from the prefill, two decode steps warm the JIT)")
  if "prefill" in res:
    pf = res["prefill"]
    log(f"[{tag}] prefill {pf['tokens']} tokens: {pf['tok_per_s']:.1f} tok/s ({pf['s']*1e3:.1f} ms, schedule cached; "
          f"first call {pf['first_s']:.1f} s with compiling, second {pf['second_s']:.1f} s)")
    if "profile" in pf: log(stats.format_table(pf["profile"], what=f"{pf['profile']['chunk']}-token prefill chunk"))
  if "device_gb" in res: log(f"[{tag}] device memory held: {res['device_gb']:.2f} GB (weights, KV cache, the JITs' buffers)")
  if "profile" in res:
    log(stats.format_table(res["profile"]))
    if ms is not None:  # what the kernels leave of a token: the host's share (the jit call, the token's readback)
      log(f"[{tag}] kernels of one token {res['profile']['total_us']/1e3:.2f} ms of {ms:.2f} ms/token; the device's own time "
            f"for one decode step {res['profile']['step_device_ms']:.2f} ms (the rest is the host's)")

def start_line(imports_s:float, load_s:float, res:dict) -> str:
  """The time from the process start to the first generated token (it comes from the prompt's prefill), itemized, and
  the first decode step; each JIT read from the store (hit) or compiled and captured (built)."""
  jits = f" (JITs: {', '.join(res['jits'])})" if res.get("jits") else ""
  first = f"; first decode step {res['first_decode_s']:.2f} s" if "first_decode_s" in res else ""
  def took(t:dict) -> str: return f"read in {t['read_s']:.1f} s" if "read_s" in t else f"built in {t['built_s']:.1f} s, compiling {t['compiling_s']:.1f} s of it"
  times = f"; {', '.join(f'{name} {took(t)}' for name, t in res['jit_seconds'].items())}" if res.get("jit_seconds") else ""
  return (f"first token {res['first_token_after_s']:.1f} s after start: imports {imports_s:.1f} s, load {load_s:.1f} s, "
          f"prefill {res['prompt_s']:.2f} s{first}{jits}{times}")

def main(argv=None) -> int:
  try:
    a = parse_args(argv)
    try: tinygrad_ext.check_pass_names(a.without.split(",") if a.without else [])
    except ValueError as e: raise UsageError(str(e)) from None
    path = pathlib.Path(a.model) if a.model else synthetic_path(a)
    st = time.perf_counter()
    big = path.is_file() and path.stat().st_size > 256 << 20
    m, kv = glm.load(path, a.max_context, a.dtype, progress=big,
                     stack=not a.separate_projections, shared_in_experts=not a.separate_shared_expert)
    load_s = time.perf_counter() - st
    file = path.stat()
    store = None if a.no_jit_store else jit_store.JitStore(pathlib.Path(a.cache_dir) / "jit", {
      "model": str(path.resolve()), "size": file.st_size, "mtime_ns": file.st_mtime_ns, "max_context": m.max_context,
      "dtype": a.dtype, "stacked": not a.separate_projections, "shared_in_experts": not a.separate_shared_expert},
      m.state, on_build=lambda name: log(f"compiling: {name} (once for this model and these settings; later runs read it from {pathlib.Path(a.cache_dir) / 'jit'})"))
    if store is not None: m.make_jit = store.jit
    try: tok = Tokenizer.from_kv(kv, str(path))
    except TokenizerError as e: raise UsageError(str(e)) from None
    prompt = prompt_ids(tok, a)
    if not prompt: raise UsageError("--prompt is empty (and the model has no chat template to put it in)")
    if (a.prefill or 0) > m.max_context: raise UsageError(f"--prefill {a.prefill} exceeds --max-context {m.max_context}")
    if len(prompt) + a.count + 2 + (a.benchmark or 0) > m.max_context:  # + 2: steps that may capture the JIT before a benchmark
      raise UsageError(f"prompt ({len(prompt)} tokens) + --count + --benchmark exceed --max-context {m.max_context}")
    c = m.cfg
    log(f"model: {path.name}  {c.n_blocks} blocks ({c.n_dense} dense), dim {c.dim}, {c.n_experts} experts ({c.n_used} used, {c.n_shared} shared), "
          f"vocab {c.vocab}; loaded in {load_s:.1f} s; device {Device.DEFAULT}, activations {a.dtype}, max context {m.max_context}")
    if a.chat:
      chat(m, tok, a)
      return 0
    log(f"prompt: {len(prompt)} tokens {prompt[:16]}{' ...' if len(prompt) > 16 else ''}")
    if a.verbose: log(f"prompt ids: {prompt}\nprompt text: {tok.decode(prompt)!r}")
    if a.model is None: log(synthetic_note(a))
    results = {}
    modes = ["off", "on"] if a.passes == "compare" else [a.passes]
    if a.without: modes.insert(modes.index("on") if "on" in modes else len(modes), f"without {a.without}")
    modes += [f"with {v}" for v in a.variant]
    for mode in modes:
      if len(modes) > 1: log(f"[passes {mode}] generating:")
      results[mode] = run_mode(m, tok, prompt, a, mode)
      if store is not None:
        results[mode]["jits"], results[mode]["jit_seconds"] = store.events, store.seconds
        store.events, store.seconds = [], {}
      report(results[mode])
      if mode == modes[0]: log(start_line(st - STARTED, load_s, results[mode]))
    out = {"model": str(path), "device": Device.DEFAULT, "dtype": a.dtype, "stacked_projections": not a.separate_projections, "shared_in_experts": not a.separate_shared_expert, "prompt_tokens": len(prompt), "count": a.count,
           "max_context": m.max_context, "load_s": load_s, "results": results}
    if a.passes == "compare":
      r_off, r_on = results["off"], results["on"]
      same = r_off["tokens"] == r_on["tokens"]
      if ms_per_token(r_off) and ms_per_token(r_on):
        out["speedup"] = ms_per_token(r_off) / ms_per_token(r_on)
        log(f"passes on vs off: {out['speedup']:.2f}x tok/s, kernels/token {r_off['kernels_per_token']} -> {r_on['kernels_per_token']}, "
              f"tokens {'identical' if same else 'DIFFER'}")
      out["tokens_identical"] = same
      out["first_logits"] = logit_agreement(r_off["first_logits"], r_on["first_logits"])
      log(f"first token's logits, on vs off: max|on-off|/max|off| {out['first_logits']['rel_err']:.2e}; off's top two logits differ by "
            f"{out['first_logits']['off_top2_gap']:.2e} of max|off|, {out['first_logits']['off_within_err']} logits lie within that error of off's top")
    if "on" in results:  # an A/B setting computes what passes on compute: a wrong kernel shows here, not only in the time
      for mode in [m for m in results if m.startswith(("with ", "without "))]:
        agree = results[mode]["logits_vs_on"] = logit_agreement(results["on"]["first_logits"], results[mode]["first_logits"])
        log(f"[passes {mode}] first token's logits vs passes on: max|a-on|/max|on| {agree['rel_err']:.2e}, tokens "
              f"{'identical' if results[mode]['tokens'] == results['on']['tokens'] else 'DIFFER'}")
    for r in results.values(): del r["first_logits"]  # the logits themselves stay out of the JSON
    if a.plot:
      from benchmarks.kernels import read_ceiling
      # a buffer well past the 60 MB L2 of an H200 on GPUs; CPUs read from memory whatever its size
      out["ceiling"] = ceiling = read_ceiling(1024 if Device.DEFAULT in ("CUDA", "NV", "AMD", "METAL") else 64, 50, 2.0, ("colsum256",))
      log(f"read ceiling {ceiling['gbs']:.0f} GB/s ({ceiling['kernel']} over {ceiling['mb']:.0f} MB)")
      roofline.plot({f"passes {k}": r["profile"] for k, r in results.items()}, ceiling, a.plot,
                    f"{path.name} on {Device.DEFAULT}: one decode token")
      log(f"wrote {a.plot}")
    synth.raise_if_signalled()
    if a.json:
      try: write_file(a.json, json.dumps(out, indent=2, default=str))
      except OSError as e: raise UsageError(f"--json {a.json}: cannot write: {e.strerror or e}") from None
      log(f"wrote {a.json}")
    return 0
  except (UsageError, glm.GGUFError, synth.SynthError, tinygrad_ext.SettingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except MemoryError as e:  # the model, its KV cache or a JIT's buffers do not fit the device (tinygrad says how much was used)
    print(f"error: out of device memory: {str(e).splitlines()[0] if str(e) else 'allocation failed'} (a smaller --max-context "
          "needs less; --passes off plans a prefill chunk's buffers without late_producers, ~59 GB more for the full GLM)", file=sys.stderr)
    return 2
  except (KeyboardInterrupt, synth.Terminated) as e:  # Ctrl-C (or SIGTERM, SIGHUP) while loading, compiling or generating
    synth.handled()
    line, status = synth.interrupted_message(e)
    print(line, file=sys.stderr)
    return status

if __name__ == "__main__":
  synth.raise_on_termination()  # SIGTERM and SIGHUP unwind as Ctrl-C does: a synthetic GGUF being written is removed
  sys.exit(main())
