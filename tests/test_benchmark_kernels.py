"""benchmarks/kernels.py: its Q4_0 data and reference agree with gguf, and its --small mode runs every row on the CPU."""
import importlib.util, json, os, pathlib, subprocess, sys
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernels.py"
# loaded by path: tests/kernels.py already owns the module name `kernels`
_spec = importlib.util.spec_from_file_location("benchmark_kernels", SCRIPT)
bk = sys.modules["benchmark_kernels"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bk)

def test_random_q4_0_and_numpy_dequant_agree_with_gguf():
  raw = bk.random_q4_0(256 * 64, np.random.default_rng(1), scale=0.1)
  assert raw.dtype == np.uint8 and raw.size == 256 * 64 // 32 * 18
  d = raw.reshape(-1, 18)[:, :2].copy().view(np.float16).astype(np.float64)
  assert np.isfinite(d).all() and (np.abs(d) >= 0.05 * (1 - 1e-3)).all() and (np.abs(d) <= 0.1 * (1 + 1e-3)).all()
  assert (d < 0).any() and (d > 0).any()
  ours, ref = bk.dequant_q4_0(raw), dequantize(raw, GGMLQuantizationType.Q4_0).reshape(-1)
  np.testing.assert_array_equal(ours.astype(np.float32), ref)  # Q4_0 values are exact in float32
  assert len(np.unique(raw.reshape(-1, 18)[:, 2:] & 0xF)) == 16 and len(np.unique(raw.reshape(-1, 18)[:, 2:] >> 4)) == 16

def test_numpy_dequant_agrees_with_gguf_on_quantized_data():
  w = np.random.default_rng(2).standard_normal((8, 128)).astype(np.float32)
  raw = quantize(w, GGMLQuantizationType.Q4_0).reshape(-1)
  np.testing.assert_array_equal(bk.dequant_q4_0(raw).astype(np.float32), dequantize(raw, GGMLQuantizationType.Q4_0).reshape(-1))

def test_reference_matvec_is_x_times_w_transposed():
  rng = np.random.default_rng(3)
  raw, x = bk.random_q4_0(40 * 96, rng), rng.uniform(-1, 1, (1, 96)).astype(np.float16)
  w = dequantize(raw, GGMLQuantizationType.Q4_0).reshape(40, 96).astype(np.float64)
  np.testing.assert_allclose(bk.ref_matvec(raw, 40, 96, x, chunk=7), (x.astype(np.float64) @ w.T).reshape(-1), rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize("row", [bk.ROWS[0], bk.ROWS[-1]], ids=lambda r: r.name)
def test_rotation_reads_enough_distinct_bytes(row):
  plan = bk.rotation(row, row.nbytes, rotate_bytes=256_000_000, call_bytes=1_024_000_000)
  assert len(set(plan)) * row.nbytes >= 256_000_000
  assert len(plan) * row.nbytes >= 1_024_000_000 or len(plan) >= 1024
  if row.experts: assert all(0 <= g < row.experts // row.k for _, g in plan)
  else: assert all(g == 0 for _, g in plan)

@pytest.mark.parametrize("replay_s", [1e-4, 0.2])
def test_replay_us_takes_the_best_round_per_launch_within_the_budget(replay_s):
  """The GPU-side timers (torch, read floor) share replay_us: replays calibrated to the budget, best round, per launch."""
  class Args: iters, budget, rounds = 100, 0.05, 3
  counts, rounds = [], iter([replay_s, replay_s, 3 * replay_s, replay_s, 2 * replay_s])  # warm-up, calibration, 3 rounds
  def timed(n:int) -> float:
    counts.append(n)
    return next(rounds)
  assert bk.replay_us(timed, 10, Args) == pytest.approx(replay_s / 10 * 1e6)
  n = max(2, min(Args.iters, int(Args.budget / replay_s)))  # 100 replays of 0.1 ms fit the budget's cap, 2 of 0.2 s do not
  assert counts == [1, 1, n, n, n] and n == (100 if replay_s < 1e-3 else 2)

def test_select_rows():
  assert [r.name for r in bk.select_rows("moe_down,attn_q_a", small=False)] == ["moe_down", "attn_q_a"]
  assert all(r.target_us is None and r.inp % 32 == 0 for r in bk.select_rows("", small=True))
  with pytest.raises(SystemExit): bk.select_rows("nope", small=True)
  # rows of any shape beside targets.md's (a tiny one prices a launch)
  dense, moe = bk.select_rows("dense_64x256,moe_2of8_64x96", small=False)
  assert (dense.out, dense.inp, dense.experts, dense.target_us) == (64, 256, 0, None)
  assert (moe.out, moe.inp, moe.experts, moe.k) == (64, 96, 8, 2) and moe.nbytes == 2 * 64 * 96 // 32 * 18
  for bad in ("dense_64x100", "dense_64", "moe_2of8_64"):
    with pytest.raises(SystemExit): bk.select_rows(bad, small=False)

def test_small_run_on_cpu(tmp_path):
  out = tmp_path / "kernels.json"
  env = {**os.environ, "DEV": "CPU"}
  proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--json", str(out)], capture_output=True, text=True, timeout=240,
                        env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  res = json.loads(out.read_text())
  assert res["dev"] == "CPU" and res["small"] and res["tinygrad"] == "0.14.0" and res["ceiling"]["gbs"] > 0
  assert isinstance(res["active_passes"], list) and res["tinygrad_ext"]
  assert [r["name"] for r in res["rows"]] == [r.name for r in bk.ROWS]
  for r in res["rows"]:
    assert r["launches"] >= 2 and r["rotation_mb"] * 1e6 >= 0.25e6 and r["torch_us"] is None and r["floor_us"] is None and r["met"] is None
    moe = r["name"].startswith("moe")
    assert r["weight_bytes"] == (4 if moe else 1) * r["out"] * r["in"] // 32 * 18
    for s in ("off", "on"):
      t = r[s]
      assert t["us"] > 0 and t["gbs"] > 0 and t["frac"] > 0 and t["calls"] >= 2
      assert t["numerics_ok"] and 0 <= t["rel_err"] <= bk.TOL, (r["name"], s, t["rel_err"])
      assert t["kernels_per_matvec"] == 1, "the Q4_0 dequant should fuse into the matmul"
      assert t["gbs"] == pytest.approx(r["weight_bytes"] / t["us"] / 1e3)
    assert r["speedup"] == pytest.approx(r["off"]["us"] / r["on"]["us"])
    assert r["desc"] in proc.stdout

def test_mix_rows_cover_each_type_and_shape_of_the_mixes():
  # every (type, in) of a decode matvec weight the two mixes give (the types-*.json files) has a row of that type and length
  mixes = ROOT / "third_party" / "llama.cpp" / "quant-mixes"
  have = {(r.qtype, r.inp) for r in bk.ROWS + bk.MIX_ROWS}
  ins = {"attn_q_a": 2048, "attn_kv_a_mqa": 2048, "attn_q_b": 768, "attn_k_b": 192, "attn_v_b": 512, "attn_output": 5120,
         "ffn_gate": 2048, "ffn_up": 2048, "ffn_down": 10240, "ffn_gate_exps": 2048, "ffn_up_exps": 2048, "ffn_down_exps": 1536,
         "ffn_gate_shexp": 2048, "ffn_up_shexp": 2048, "ffn_down_shexp": 1536}
  for mix in ("Q4_0", "Q4_K_M"):
    for name, t in json.loads((mixes / f"types-{mix}.json").read_text()).items():
      kind = name.split(".")[-2]
      if name == "output.weight": assert (t.upper(), 2048) in have, (mix, name)
      elif kind in ins: assert (t.upper(), ins[kind]) in have, (mix, name, t)

def test_small_run_of_the_mix_types_on_cpu(tmp_path):
  # one row per layout beside Q4_0 (K-quants, Q5_0, the per-head matvec, MoE): the dequant fuses and the numbers are right
  out, names = tmp_path / "kernels.json", ["output_q6_k", "attn_k_b_q5_0", "attn_v_b_q4_k", "moe_down_q4_k"]
  proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--rows", ",".join(names), "--json", str(out)], capture_output=True,
                        text=True, timeout=240, env={**os.environ, "DEV": "CPU"}, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  rows = json.loads(out.read_text())["rows"]
  assert [r["name"] for r in rows] == names and [r["qtype"] for r in rows] == ["Q6_K", "Q5_0", "Q4_K", "Q4_K"]
  for r in rows:
    block, size = bk.block_of(r["qtype"])
    assert r["weight_bytes"] == (r["k"] or r["heads"] or 1) * r["out"] * r["in"] // block * size
    for s in ("off", "on"):
      assert r[s]["numerics_ok"] and r[s]["kernels_per_matvec"] == 1, (r["name"], s, r[s])

def test_a_sweep_without_the_off_column_times_only_passes_on_and_its_policies(tmp_path):
  # --no-off: the passes-off kernels are the slowest to compile and run, and a policy sweep compares passes-on settings
  out = tmp_path / "kernels.json"
  proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--no-off", "--rows", "ffn_down_q6_k", "--policy", "w=lanes=8",
                         "--json", str(out)], capture_output=True, text=True, timeout=240, env={**os.environ, "DEV": "CPU"}, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (r,) = json.loads(out.read_text())["rows"]
  assert "off" not in r and r["speedup"] is None and r["on"]["numerics_ok"] and r["policy_w"]["numerics_ok"]
  row = next(line for line in proc.stdout.splitlines() if line.startswith("| dense ffn down Q6_K") and "policy" not in line)
  assert row.split(" | ")[3:6] == ["-", "-", "-"] and row.split(" | ")[-1].startswith("-/")

@pytest.mark.parametrize("args, says", [
  (["--variant", "k=TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT=7"], "TINYGRAD_EXT_FUSION_KEEP_PER_ELEMENT='7': must be 0 or 1"),
  (["--variant", "k=TINYGRAD_EXT_NO_SUCH=1"], "need NAME=SETTING=VALUE"),
  (["--policy", "l=lanes="], "TINYGRAD_EXT_MATVEC_POLICY='lanes=': bad item"),
  (["--without", "bogus"], "unknown tinygrad_ext pass(es): bogus"),
])
def test_bad_arguments_are_one_line_and_exit_2_before_anything_runs(args, says, capsys):
  with pytest.raises(SystemExit) as e: bk.parse_args(["--small", *args])
  err = capsys.readouterr().err
  assert e.value.code == 2 and says in err and err.strip().splitlines() == [err.strip()] and err.startswith("kernels.py: error:"), err
