#!/usr/bin/env bash
# The GPU proof on a bare GPU machine (its own torch, no internet), from the repository root, with the
# wheel built elsewhere carried in dist/: nothing is compiled there. Installs the wheel into that machine's
# python3 without touching its torch (--no-deps; the abi3 wheel loads on torch >= 2.10 and Python >= 3.10),
# then runs `part-fast check`, the op tests on CUDA tensors (conftest's DEVICE_BACKENDS: ids ending
# -on-cuda) and the memory section, writing everything under $OUT.
#
#   OUT=/some/folder bash bench/gpu_run.sh            # DEVICE=cpu: a dry run of the same steps on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="${OUT:?set OUT to the folder for the results}"
device="${DEVICE:-cuda}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

wheel=$(ls dist/part_fast-*-cp310-abi3-*.whl 2>/dev/null | head -n 1)
if [ -z "$wheel" ]; then
  echo "gpu_run: no dist/part_fast-*-cp310-abi3-*.whl: build it first (README, Install) and carry dist/" >&2
  exit 2
fi
"$python" -m pip install -q --no-deps --force-reinstall "$wheel" > "$out/install.log" 2>&1 || { tail -n 20 "$out/install.log"; exit 2; }

# Everything below imports the installed wheel: PYTHONSAFEPATH keeps the checkout's part_fast/ (which has no
# compiled kernels) off sys.path, and the bench section runs from a copy of bench/ alone.
PYTHONSAFEPATH=1 "$python" -c "
import torch, part_fast
from part_fast import ops
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| part_fast', part_fast.__file__)
print('EXTENSION_ERROR', repr(ops.EXTENSION_ERROR), '| CUDA_EXTENSION_ERROR', repr(ops.CUDA_EXTENSION_ERROR))
print('backends', ops.available_backends())
" 2>&1 | tee "$out/loaded.log"

status=0
PYTHONSAFEPATH=1 timeout 300 "$python" -m part_fast.check --device "$device" --out "$out" 2>&1 | tee "$out/check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
PYTHONSAFEPATH=1 timeout 200 "$python" -m pytest -q -p no:cacheprovider tests/test_pgd_step.py tests/test_cam_eps_map.py \
  tests/test_backends.py tests/test_loading.py -k "on-cuda or on_the_gpu or cuda" 2>&1 | tail -n 40 | tee "$out/pytest-cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
work=$(mktemp -d)
cp -r bench "$work/bench"
(cd "$work" && timeout 150 "$python" -m bench.memory_report --device "$device" --out "$out/memory-$device.json") 2>&1 \
  | tail -n 30 | tee "$out/memory-$device.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_run: exit $status"
exit $status
