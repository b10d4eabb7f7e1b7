#!/usr/bin/env python3
"""The GLM's numerics against float64: per block, the hidden state's error and the experts it chose, for each numerics
policy (examples/glm/model.py: NUMERICS) with passes off and on.

The float64 reference (tests/glm_reference.py, numpy on the host) reads the prompt and greedily generates --steps tokens;
each configuration then decodes that same token sequence one token per step through a jitted forward that also returns
every block's hidden state (last position) and every MoE block's chosen experts. Per step: the logits' error
max|a-ref|/max|ref|, and per block the hidden state's error and whether the chosen experts (as a set) equal the
reference's. The traced forward realizes each block's output, so its kernels are not exactly the decode step's; the
decode step's own logits are checked at the same steps (`decode` below).

  python benchmarks/numerics.py --model glm.gguf [--steps 8] [--dtype mixed,float16] [--passes off,on] [--json out.json]
  python benchmarks/numerics.py --model glm.gguf --reference ref.pkl --passes none   # only the float64 run, saved

With --reference, the float64 run is read from that file where it exists (for this model, prompt and steps), else
computed and saved there: the full model's takes minutes of CPU, which can run beside the GPU's work.
"""
from __future__ import annotations
import argparse, json, pathlib, pickle, sys, time
import numpy as np
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import tinygrad_ext  # noqa: E402
from tinygrad import Tensor, TinyJit, Device  # noqa: E402
from examples.glm import model as glm  # noqa: E402
from glm_reference import Reference  # noqa: E402

def rel_err(a, ref) -> float: return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())

def reference_run(path:str, prompt:list[int], steps:int) -> dict:
  """The float64 run: the tokens it reads (prompt, then its greedy choices), and per step its logits, every block's
  hidden state and chosen experts."""
  ref, st = Reference(path), time.perf_counter()
  tokens, out = list(prompt), {"logits": [], "hidden": [], "experts": []}
  for step in range(steps + 1):
    logits = ref.forward(prompt, 0) if step == 0 else ref.forward([tokens[-1]], len(tokens) - 1)
    out["logits"].append(logits)
    out["hidden"].append([h for h, _ in ref.trace])
    out["experts"].append([sel for _, sel in ref.trace if sel is not None])
    tokens.append(int(logits.argmax()))
    print(f"  reference step {step}: token {tokens[-1]} ({time.perf_counter()-st:.0f} s)", file=sys.stderr, flush=True)
  out["tokens"], out["seconds"] = tokens, time.perf_counter() - st
  return out

def traced_step(model:glm.GLM):
  def step(tok, pos):
    trace: dict = {"hidden": [], "experts": []}
    logits = model.forward([tok], pos, trace)
    return logits.realize(), Tensor.stack(*trace["hidden"]).float().realize(), Tensor.stack(*trace["experts"]).realize()
  return TinyJit(step)

def model_run(model:glm.GLM, ref:dict, n_prompt:int) -> dict:
  """Feeds the reference's tokens one per step (the prompt too, as run.py reads it); at the reference's steps records the
  traced logits, hidden states and experts, and the decode step's own logits (a second pass over the same positions)."""
  traced, decode, tokens = traced_step(model), model.decoder(), ref["tokens"]
  out = {"logits": [], "hidden": [], "experts": [], "decode_logits": [], "decode_tokens": []}
  for pos, tok in enumerate(tokens[:-1]):
    logits, hidden, experts = traced(model.token.bind(tok), model.start_pos.bind(pos))
    if pos >= n_prompt - 1:
      out["logits"].append(logits.numpy()[0]); out["hidden"].append(hidden.numpy()); out["experts"].append(experts.numpy())
  for pos, tok in enumerate(tokens[:-1]):  # the decode step itself: rewrites each cache position as the traced one did
    nxt, logits = model.decode(decode, tok, pos)
    if pos >= n_prompt - 1: out["decode_logits"].append(logits.numpy()[0]); out["decode_tokens"].append(nxt)
  return out

def compare(run:dict, ref:dict) -> dict:
  steps = range(len(ref["logits"]))
  return {
    "logits": [rel_err(run["logits"][s], ref["logits"][s]) for s in steps],
    "decode_logits": [rel_err(run["decode_logits"][s], ref["logits"][s]) for s in steps],
    "tokens_equal": [t == int(ref["logits"][s].argmax()) for s, t in zip(steps, run["decode_tokens"])],
    "hidden": [[rel_err(run["hidden"][s][b], ref["hidden"][s][b]) for b in range(len(ref["hidden"][s]))] for s in steps],
    "experts_equal": [[set(run["experts"][s][b].tolist()) == set(ref["experts"][s][b].tolist()) for b in range(len(ref["experts"][s]))] for s in steps],
  }

def table(results:dict[str, dict], n_dense:int) -> str:
  names = list(results)
  lines = ["| block | " + " | ".join(f"{n}: hidden err (max over steps), experts off" for n in names) + " |", "|---|" + "---|" * len(names)]
  n_blocks = len(next(iter(results.values()))["hidden"][0])
  for b in range(n_blocks):
    cells = []
    for n in names:
      r = results[n]
      err = max(step[b] for step in r["hidden"])
      moe = b - n_dense
      wrong = sum(not step[moe] for step in r["experts_equal"]) if moe >= 0 else None
      cells.append(f"{err:.1e}" + ("" if wrong is None else f", {wrong}/{len(r['experts_equal'])}"))
    lines.append(f"| {b} | " + " | ".join(cells) + " |")
  lines += ["", "| step | " + " | ".join(f"{n}: logits err (traced / decode step)" for n in names) + " |", "|---|" + "---|" * len(names)]
  for s in range(len(next(iter(results.values()))["logits"])):
    lines.append(f"| {s} | " + " | ".join(f"{results[n]['logits'][s]:.1e} / {results[n]['decode_logits'][s]:.1e}"
                                           + ("" if results[n]["tokens_equal"][s] else " (token differs)") for n in names) + " |")
  return "\n".join(lines)

def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True, help="a GLM-4.7-Flash GGUF")
  ap.add_argument("--prompt", default="1,17,300,42,256,7", help="prompt token ids, comma separated")
  ap.add_argument("--steps", type=int, default=8, help="generated tokens after the prompt (default 8)")
  ap.add_argument("--dtype", default="mixed,float16", help="numerics policies, comma separated (model.NUMERICS)")
  ap.add_argument("--passes", default="off,on", help="off, on, both (off,on) or none (only the reference)")
  ap.add_argument("--reference", type=pathlib.Path, help="the float64 run: read from here if present, else saved here")
  ap.add_argument("--json", type=pathlib.Path, help="write the results here")
  a = ap.parse_args(argv)
  policies, modes = a.dtype.split(","), [] if a.passes == "none" else a.passes.split(",")
  if bad := [p for p in policies if p not in glm.NUMERICS]: ap.error(f"--dtype: unknown policy {bad[0]!r} (one of {', '.join(glm.NUMERICS)})")
  if bad := [m for m in modes if m not in ("off", "on")]: ap.error(f"--passes: {bad[0]!r} is neither off nor on")
  try: prompt = [int(t) for t in a.prompt.split(",")]
  except ValueError: ap.error("--prompt: comma-separated token ids")
  try: kv, infos = glm.read_header(a.model)
  except glm.GGUFError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  cfg = glm.Config.from_gguf(kv, infos)
  key = {"model": pathlib.Path(a.model).name, "bytes": pathlib.Path(a.model).stat().st_size, "prompt": prompt, "steps": a.steps}
  if a.reference is not None and a.reference.exists():
    saved = pickle.loads(a.reference.read_bytes())
    if saved.get("key") != key:
      print(f"error: {a.reference} is the float64 run of {saved.get('key')}, not of {key}", file=sys.stderr)
      return 2
    ref = saved["ref"]
  else:
    print(f"float64 reference: {len(prompt)} prompt tokens + {a.steps} steps", file=sys.stderr)
    ref = reference_run(a.model, prompt, a.steps)
    if a.reference is not None: a.reference.write_bytes(pickle.dumps({"key": key, "ref": ref}))
  if not modes: return 0
  weights = glm.load_weights(a.model, infos, progress=sys.stderr.isatty())
  results = {}
  for policy in policies:
    for mode in modes:
      st = time.perf_counter()
      model = glm.GLM(cfg, weights, len(ref["tokens"]) + 1, policy)
      with (tinygrad_ext.passes_off() if mode == "off" else tinygrad_ext.only(*tinygrad_ext.PASSES)):
        results[f"{policy} {mode}"] = compare(model_run(model, ref, len(prompt)), ref)
      r = results[f"{policy} {mode}"]
      print(f"  {policy}, passes {mode}: {time.perf_counter()-st:.0f} s; hidden <= {max(max(h) for h in r['hidden']):.1e}, logits <= "
            f"{max(r['logits'] + r['decode_logits']):.1e}, expert sets differing {sum(not e for s in r['experts_equal'] for e in s)}, "
            f"tokens differing {sum(not t for t in r['tokens_equal'])}", file=sys.stderr, flush=True)
      if a.json:  # after each configuration: a run cut short keeps what it measured
        a.json.write_text(json.dumps({"model": str(a.model), "device": Device.DEFAULT, "prompt": prompt, "reference_tokens": ref["tokens"],
                                      "reference_seconds": ref["seconds"], "results": results}, indent=1))
  print(f"device {Device.DEFAULT}, model {pathlib.Path(a.model).name}, reference tokens {ref['tokens'][len(prompt):]}")
  print(table(results, cfg.n_dense))
  return 0

if __name__ == "__main__": sys.exit(main())
