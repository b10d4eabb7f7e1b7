"""Refuse any tinygrad but the one whose internals the hooks were written against."""
import importlib.metadata

SUPPORTED_TINYGRAD = "0.14.0"

def installed_tinygrad_version() -> str|None:
  try: return importlib.metadata.version("tinygrad")
  except importlib.metadata.PackageNotFoundError: return None

_INSTALLED = object()
def check_tinygrad_version(found:str|None|object=_INSTALLED) -> None:
  if found is _INSTALLED: found = installed_tinygrad_version()
  if found != SUPPORTED_TINYGRAD:
    raise ImportError(f"tinygrad_ext supports tinygrad=={SUPPORTED_TINYGRAD} only (it hooks its internals); found "
                      f"{'no tinygrad' if found is None else 'tinygrad ' + found}. Install it with: pip install tinygrad=={SUPPORTED_TINYGRAD}")
