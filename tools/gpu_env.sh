# Sourced first by every command on the GPU machine: installs the carried wheels (.whl, and .whl-plot where a run that
# plots carried it) and puts this checkout on the path.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl $(ls .whl-plot/*.whl 2>/dev/null) 2>&1 | grep -v -i warning || true
export PYTHONPATH=/tmp/site:$PWD DEV=${DEV:-CUDA}
