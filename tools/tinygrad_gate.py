#!/usr/bin/env python3
"""tinygrad's own tests as a regression gate: run test files once without and once with `import tinygrad_ext` (all
passes on) and fail on any test that passes without the extension and fails with it, unless it is listed in
tools/tinygrad_gate_expected.txt with its reason (a kernel-count assertion that fusion lowers on purpose; never an
op-count or value assertion).

  python tools/tinygrad_gate.py                                  # every file of test/backend and test/unit, DEV=CPU
  python tools/tinygrad_gate.py --device CL test/unit/test_conv.py
  python tools/tinygrad_gate.py --subset ci --json gate.json     # the files CI runs

The tests are tinygrad's public test/backend and test/unit of 2026-08-22 (third_party/tinygrad-tests, MIT)."""
from __future__ import annotations
import argparse, json, os, pathlib, shutil, subprocess, sys, tempfile, time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / "third_party" / "tinygrad-tests"
EXPECTED = pathlib.Path(__file__).resolve().parent / "tinygrad_gate_expected.txt"
# what CI runs both ways (about 2.5 minutes in one process): where the passes once met programs unlike GLM's
CI_SUBSET = ["test/unit/test_linalg.py::TestLinAlg::test_svd_general", "test/unit/test_hashing.py::TestKeccak::test_referenced",
             "test/unit/test_assign.py", "test/unit/test_winograd.py", "test/backend/test_softmax_fusion.py",
             "test/backend/test_rangeify.py", "test/backend/test_transcendental.py", "test/backend/test_schedule.py"]

def read_expected(path:pathlib.Path=EXPECTED) -> dict[str, str]:
  """`test id | reason` lines (# comments); every entry needs a reason."""
  out = {}
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not (line := line.split("#", 1)[0].strip()): continue
    test, sep, reason = (s.strip() for s in line.partition("|"))
    if not sep or not reason: raise SystemExit(f"{path}:{n}: expected 'test id | reason'")
    out[test] = reason
  return out

def outcomes(junit:pathlib.Path) -> dict[str, str]:
  """test id (file::Class::test) -> passed / failed / skipped, from pytest's junit xml."""
  res = {}
  if not junit.exists(): return res
  for case in ET.parse(junit).getroot().iter("testcase"):
    # classname is the dotted module path, then the class if any: rebuild a pytest node id
    parts = case.get("classname", "").split(".")
    i = next((k for k in range(len(parts), 0, -1) if (TESTS / ("/".join(parts[:k]) + ".py")).exists()), len(parts))
    node = "/".join(parts[:i]) + ".py" + "".join("::" + p for p in parts[i:]) + "::" + case.get("name", "")
    kinds = {c.tag for c in case}
    res[node] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
  return res

def run_pytest(files:list[str], workdir:pathlib.Path, junit:pathlib.Path, ext:bool, device:str, jobs:int, timeout:int) -> float:
  # run from inside a pytest-xdist worker (the CI test), its variables would tell the child it is one too
  env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}, "DEV": device, "PYTHONPATH": f"{workdir}{os.pathsep}{ROOT}", "TEST_TIMEOUT": str(timeout),
         "TINYGRAD_EXT_DISABLE": os.environ.get("TINYGRAD_EXT_DISABLE", "")}
  # files that fail to collect (tinygrad's `extra` is not vendored) are failures of both runs; without xdist pytest
  # would stop at them and run nothing
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", f"--junitxml={junit}",
         "-o", "addopts=", "--rootdir", str(workdir), "--continue-on-collection-errors"]
  if ext: cmd += ["-p", "tinygrad_ext"]
  if jobs > 1: cmd += ["-n", str(jobs)]
  t0 = time.perf_counter()
  subprocess.run(cmd + files, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return time.perf_counter() - t0

def compare(off:dict[str, str], on:dict[str, str], expected:dict[str, str]) -> dict:
  # a test that passed without the extension and did not run with it (a crashed or aborted run) fails the gate too
  new = sorted(t for t, o in off.items() if o == "passed" and on.get(t, "failed") == "failed")
  return {"tests": len(off.keys() | on.keys()),
          "failed_without": sum(o == "failed" for o in off.values()), "failed_with": sum(o == "failed" for o in on.values()),
          "new_failures_expected": {t: expected[t] for t in new if t in expected},
          "new_failures_unexpected": [t for t in new if t not in expected],
          "fixed_by_ext": sorted(t for t, o in on.items() if o == "passed" and off.get(t) == "failed"),
          "expected_but_passing": sorted(t for t in expected if on.get(t) == "passed")}

def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("files", nargs="*", help="test files (or pytest node ids) relative to the tests folder (default: all of test/backend, test/unit)")
  ap.add_argument("--subset", choices=["all", "ci"], default="all")
  ap.add_argument("--device", default="CPU", choices=["CPU", "CL", "PYTHON", "CUDA", "METAL"])
  ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="pytest-xdist workers")
  ap.add_argument("--timeout", type=int, default=300, help="seconds a test may take (tinygrad's conftest aborts it)")
  ap.add_argument("--json", type=pathlib.Path, help="write the comparison here")
  ap.add_argument("--keep", type=pathlib.Path, help="keep both runs' junit xml in this folder")
  ap.add_argument("--baseline", type=pathlib.Path, help="the run without the extension from this junit xml (kept by --keep) instead of running it")
  args = ap.parse_args(argv)
  files = args.files or (CI_SUBSET if args.subset == "ci" else sorted(str(p.relative_to(TESTS)) for d in ("test/backend", "test/unit")
                                                                  for p in (TESTS / d).glob("test_*.py")))
  if missing := [f for f in files if not (TESTS / f.split("::")[0]).exists()]:
    print(f"tinygrad_gate: no such test file: {', '.join(missing)}", file=sys.stderr); return 2
  expected = read_expected()
  with tempfile.TemporaryDirectory(prefix="tgtests-") as tmp:
    work = pathlib.Path(tmp) / "t"
    shutil.copytree(TESTS, work)
    res = {}
    for ext in (False, True):
      junit = pathlib.Path(tmp) / f"{'with' if ext else 'without'}.xml"
      if not ext and args.baseline: shutil.copy(args.baseline, junit); secs = 0.0
      else: secs = run_pytest(files, work, junit, ext, args.device, args.jobs, args.timeout)
      res[ext] = outcomes(junit)
      print(f"{'with' if ext else 'without'} tinygrad_ext: {len(res[ext])} tests, "
            f"{sum(o == 'failed' for o in res[ext].values())} failed, {secs:.0f} s", flush=True)
      if args.keep: args.keep.mkdir(parents=True, exist_ok=True); shutil.copy(junit, args.keep / f"{args.device}-{junit.name}")
  cmp = compare(res[False], res[True], expected)
  report = {"device": args.device, "files": files, **cmp}
  if args.json: args.json.write_text(json.dumps(report, indent=1) + "\n")
  print(f"{args.device}: {cmp['tests']} tests; failed without {cmp['failed_without']}, with {cmp['failed_with']}; "
        f"new failures: {len(cmp['new_failures_expected'])} expected, {len(cmp['new_failures_unexpected'])} unexpected")
  for t, why in cmp["new_failures_expected"].items(): print(f"  expected: {t}  ({why})")
  for t in cmp["new_failures_unexpected"]: print(f"  UNEXPECTED: {t}")
  if not res[False] or not res[True]:
    print("tinygrad_gate: a run produced no results", file=sys.stderr); return 1
  return 1 if cmp["new_failures_unexpected"] else 0

if __name__ == "__main__": sys.exit(main())
