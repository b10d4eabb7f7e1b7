"""The roofline picture of `run.py --profile --plot PATH.png`: every kernel of one decode token as achieved GB/s (bytes
it must move / its time) against the bytes it moves, beside the read ceiling measured in the same run. Decode kernels
have no reuse to speak of, so GB/s is their roofline axis: a kernel under the ceiling by the bytes it moves is slow, a
kernel on the diagonal of one launch gap is launch-bound (too small to matter alone, costly by count)."""
from __future__ import annotations
import os, pathlib, tempfile

COLORS = {"matmul": "tab:blue", "attention": "tab:orange", "norm": "tab:green", "softmax": "tab:red", "activation": "tab:pink",
          "rope": "tab:purple", "routing": "tab:brown", "other": "tab:gray"}

def check_available():
  """Raises ImportError with what to install when matplotlib is missing (before minutes of loading and compiling)."""
  try: import matplotlib  # noqa: F401
  except ImportError: raise ImportError("--plot needs matplotlib: pip install -e '.[plot]'") from None

def plot(profiles:dict[str, dict], ceiling:dict, path:str|os.PathLike, title:str, gap_us:float=2.0):
  """profiles: run name -> stats.summarize() output (its "launches"); one panel per run. Written to a temporary file
  first, then renamed: a failed plot leaves nothing behind."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(profiles), figsize=(6.5 * len(profiles), 5.2), sharey=True, squeeze=False)
  all_bytes = [max(k["bytes"], 1) for p in profiles.values() for k in p["launches"]]
  lo, hi = min(all_bytes) / 2, max(all_bytes) * 2
  for ax, (name, prof) in zip(axes[0], profiles.items()):
    for kind, color in COLORS.items():
      ks = [k for k in prof["launches"] if k["kind"] == kind]
      if not ks: continue
      us = sum(k["us"] for k in ks)
      ax.scatter([max(k["bytes"], 1) for k in ks], [max(k["bytes"], 1) / max(k["us"], 1e-3) / 1e3 for k in ks], s=12, alpha=0.6,
                 color=color, label=f"{kind}: {len(ks)} kernels, {us/1e3:.2f} ms")
    ax.axhline(ceiling["gbs"], color="black", linestyle="--", linewidth=1, label=f"read ceiling {ceiling['gbs']:.0f} GB/s")
    ax.plot([lo, hi], [lo / gap_us / 1e3, hi / gap_us / 1e3], color="gray", linestyle=":", linewidth=1, label=f"{gap_us:g} us per kernel")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), xlabel="bytes the kernel moves", title=f"{name}: {prof['n_kernels']} kernels, "
           f"{prof['total_us']/1e3:.2f} ms of kernels ({prof.get('timing', 'timed')})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
  axes[0][0].set_ylabel("achieved GB/s")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(suffix=path.suffix or ".png", dir=path.parent if str(path.parent) else ".")
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=120, format=(path.suffix.lstrip(".") or "png"))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp): os.unlink(tmp)
    plt.close(fig)
