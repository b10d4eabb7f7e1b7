"""The errors tinygrad_ext raises about its setup, each with a one-line message."""

class SettingError(ValueError):
  """A TINYGRAD_EXT_* setting with a value it cannot take. From the environment at import, it ends the process: one line
  on stderr, exit status 2 (tinygrad_ext/__init__.py)."""

class PipelineError(RuntimeError):
  """The installed tinygrad lacks a step or attribute the pipeline hooks, or a pass hooks where the table does not place
  it (pipeline.py)."""
