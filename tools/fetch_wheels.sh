#!/usr/bin/env bash
# Downloads what the GPU machine (python 3.12, no network) needs into .whl/, to be carried there with every run.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
python3 -m pip download -q --no-deps -d .whl tinygrad==0.14.0 gguf==0.19.0 tqdm
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl pyyaml
# --plot draws with matplotlib
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 -d .whl matplotlib contourpy cycler fonttools kiwisolver packaging pillow pyparsing python-dateutil six
ls .whl
