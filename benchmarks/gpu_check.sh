#!/usr/bin/env bash
# One device call: native (compiled) kernel tests, the kernel benchmark, captured decode with static caches
# (and with every head at 16, 8 and 4 bits, and half the layers streaming 2048 tokens at 4 bits, 32k), the 32k
# memory benchmark.
# The device image has torch/transformers/triton but not this package: put a copy of it on PYTHONPATH.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
PKG=/tmp/ilc_pkg; rm -rf $PKG; mkdir -p $PKG
cp -r ilc $PKG/ilc && cp -r runtime $PKG/ilc/runtime && cp -r kernels $PKG/ilc/kernels
export PYTHONPATH=$PKG:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
REPO=$PWD; (cd /tmp && python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_kernels.py" "$REPO/tests/test_runtime_rule.py" "$REPO/tests/test_static_cache.py" "$REPO/tests/test_quant_kernels.py" -W ignore) 2>&1 | tail -8 | tee "$OUT/tests.log"
python3 benchmarks/kernel_speed.py --contexts "${CONTEXTS:-4096,16384,32768,65536}" --out "$OUT/kernels.md" 2>&1 | tee "$OUT/kernels.log" | tail -12
python3 benchmarks/static_decode.py --contexts "${STATIC_CONTEXTS:-8192,32768,65536}" --out "$OUT/static_decode.md" 2>&1 | tee "$OUT/static_decode.log" | tail -10
python3 benchmarks/static_decode.py --contexts 32768 --batches 1,8 --precisions K16V16,K8V8,K4cV4 --streams 2048:K4cV4 --out "$OUT/static_decode_bits.md" 2>&1 | tee "$OUT/static_decode_bits.log" | tail -8
python3 benchmarks/memory.py --llama8b --context 32768 --out "$OUT/memory_gpu.md" 2>&1 | tee "$OUT/memory.log" | tail -4
