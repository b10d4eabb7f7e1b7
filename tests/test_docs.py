"""The results shelf: every results file a doc or a comment cites exists, every file under benchmarks/results and
examples/glm/results is cited somewhere (LOG.md is the log that cites them), and every one is named DEVICE-DATE-what.ext.

Citations are read fresh from the files (no git, no tinygrad): a path under one of the two results folders (from the repo
root, or `results/...` from the citing file's own folder, as examples/glm/README.md writes them), a bare file name that
starts like a results file (`h200-2026-12-05-kernels.txt`, looked up in both folders), and shell braces
(`h100-2026-12-06-decode-legality{.txt,-before.json}`) expanded. A name cut to its tail (`-roofline.png`) is not seen."""
import re
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIRS = ("benchmarks/results", "examples/glm/results")
# where citations are read: the docs, and the code whose comments cite measurements
DOCS = ("README.md", "DESIGN.md", "LOG.md", "examples/glm/README.md")
CODE_DIRS = ("tinygrad_ext", "benchmarks", "examples", "tools", "tests")
SKIP_PARTS = {"third_party", ".git", "__pycache__", "results"}

# DEVICE-DATE[run letter]-what.ext: h200-2026-12-02e-kernels-sweep-attn.txt, h200-2026-11-23-full-q4_0-costly-act.txt
NAME = re.compile(r"^(?P<device>h100|h200|cpu|cl)-(?P<date>\d{4}-\d{2}-\d{2})[a-z]?-[A-Za-z0-9][A-Za-z0-9_.-]*\.[a-z0-9]+$")
_DIRS = "|".join(re.escape(d) for d in RESULTS_DIRS)
PATH = re.compile(rf"(?<![\w/.-])(?:\./)?({_DIRS})/([A-Za-z0-9_.-]*[A-Za-z0-9_-]\.[a-z0-9]+)\b")
# relative to the citing file's folder: examples/glm/README.md's results/h200-....json
RELATIVE = re.compile(r"(?<![\w/.-])(?:\./)?(results)/([A-Za-z0-9_.-]*[A-Za-z0-9_-]\.[a-z0-9]+)\b")
# a bare name: a device, then anything with a date in it, then an extension (old-style names too, so stale ones show)
BARE = re.compile(r"(?<![\w/.-])((?:h100|h200|cpu|cl)-[A-Za-z0-9_.-]*?\d{4}-\d{2}-\d{2}[A-Za-z0-9_.-]*?\.(?:txt|json|png|csv))\b")
TOKEN = re.compile(r"[\w./{},+-]+")

def _expand(token:str) -> list[str]:
  m = re.search(r"\{([^{}]*)\}", token)
  if m is None: return [token]
  return [e for alt in m.group(1).split(",") for e in _expand(token[:m.start()] + alt + token[m.end():])]

def citing_files() -> list[Path]:
  files = [ROOT / d for d in DOCS if (ROOT / d).exists()]
  for d in CODE_DIRS:
    files += [p for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".sh", ".md") and p.is_file()
              and not SKIP_PARTS & set(p.relative_to(ROOT).parts) and p != Path(__file__).resolve() and p not in files]
  return files

def results_files() -> list[Path]:
  return [p for d in RESULTS_DIRS for p in sorted((ROOT / d).iterdir()) if p.is_file()]

def citations() -> dict[str, set[str]]:
  """cited path (repo-relative, or the bare name where no folder has it) -> the files that cite it"""
  by_name = {}
  for p in results_files(): by_name.setdefault(p.name, []).append(p.relative_to(ROOT).as_posix())
  cited: dict[str, set[str]] = {}
  for src in citing_files():
    rel = src.relative_to(ROOT).as_posix()
    text = src.read_text(encoding="utf-8", errors="replace")
    texts = [text] + [e for tok in TOKEN.findall(text) if "{" in tok for e in _expand(tok)]
    here = src.parent.relative_to(ROOT).as_posix()
    for t in texts:
      for m in PATH.finditer(t):
        if "DEVICE-DATE" not in m.group(2): cited.setdefault(f"{m.group(1)}/{m.group(2)}", set()).add(rel)  # not the template
      for m in RELATIVE.finditer(t):
        if f"{here}/results" in RESULTS_DIRS: cited.setdefault(f"{here}/results/{m.group(2)}", set()).add(rel)
      for m in BARE.finditer(t):
        for path in by_name.get(m.group(1), [m.group(1)]): cited.setdefault(path, set()).add(rel)
  return cited

def test_every_cited_results_file_exists():
  missing = sorted(f"{src}: {path}" for path, srcs in citations().items() if not (ROOT / path).is_file() for src in srcs)
  assert not missing, "cited results files that do not exist:\n" + "\n".join(missing)

def test_every_results_file_is_cited():
  cited = citations()
  orphans = sorted(p.relative_to(ROOT).as_posix() for p in results_files() if p.relative_to(ROOT).as_posix() not in cited)
  assert not orphans, "results files no doc or comment cites (cite them in LOG.md, or delete them):\n" + "\n".join(orphans)

def test_results_files_are_named_device_date_what():
  bad = []
  for p in results_files():
    m = NAME.match(p.name)
    try: ok = m is not None and date.fromisoformat(m["date"]) is not None
    except ValueError: ok = False
    if not ok: bad.append(p.relative_to(ROOT).as_posix())
  assert not bad, "results files not named DEVICE-DATE-what.ext (e.g. h200-2026-12-02e-full-q4_0-policy-ab.txt):\n" + "\n".join(bad)
