import os
# passes registered by tests live only in this process: compile here, not in tinygrad's worker pool
os.environ.setdefault("PARALLEL", "0")
import pytest
import tinygrad_ext
from testing_passes import DOUBLE_TO_ADD

@pytest.fixture
def double_to_add():
  tinygrad_ext.register(DOUBLE_TO_ADD)
  try: yield DOUBLE_TO_ADD
  finally: tinygrad_ext.unregister(DOUBLE_TO_ADD.name)
