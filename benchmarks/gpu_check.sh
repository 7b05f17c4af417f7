#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, then the loopback benchmark with the
# fold groups ablated side by side. Logs and JSON go to $OUT (default: ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
python3 -m pytest ${TESTS:-tests/test_runtime_cuda.py} -q -x -p no:cacheprovider 2>&1 \
  | tail -15 | tee "$OUT/tests.txt"
python3 benchmarks/ring_attention.py --seq "${SEQ:-128K}" --rings "${RINGS:-2,4,8}" --iters "${ITERS:-5}" \
  --ablate "${ABLATE:-RINGFX_TWO_STREAMS=0}" --out "$OUT/ring_attention.json" 2>&1 | tee "$OUT/bench.txt" | grep -v "^#"
