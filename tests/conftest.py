import os
# passes registered by tests live only in this process: compile here, not in tinygrad's worker pool
os.environ.setdefault("PARALLEL", "0")
# run.py's synthetic models and stored JITs go to a folder of this test session (pytest-xdist's workers inherit it),
# removed when the session ends, not to the user's cache
import atexit, shutil, tempfile
if "GLM_CACHE_DIR" not in os.environ:
  os.environ["GLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="tinygrad_ext-tests-")
  atexit.register(shutil.rmtree, os.environ["GLM_CACHE_DIR"], ignore_errors=True)
import pytest
import tinygrad_ext
from testing_passes import DOUBLE_TO_ADD

@pytest.fixture
def double_to_add():
  tinygrad_ext.register(DOUBLE_TO_ADD)
  try: yield DOUBLE_TO_ADD
  finally: tinygrad_ext.unregister(DOUBLE_TO_ADD.name)
