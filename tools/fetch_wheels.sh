#!/usr/bin/env bash
# Downloads what the GPU machine (python 3.12, no network) needs into .whl/, to be carried there with every run, and
# matplotlib's wheels (`run.py --plot` only, 25 MB of a 64 MB carry) into .whl-plot/, carried only by a run that plots.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .whl .whl-plot; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$d/" >> .git/info/exclude; }; done
python3 -m pip download -q --no-deps -d .whl tinygrad==0.14.0 gguf==0.19.0 tqdm
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl pyyaml
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 -d .whl-plot matplotlib contourpy cycler fonttools kiwisolver packaging pillow pyparsing python-dateutil six
ls .whl .whl-plot
