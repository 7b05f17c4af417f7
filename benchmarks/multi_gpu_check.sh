#!/usr/bin/env bash
# One call on a lent multi-GPU machine (all its GPUs): the real NCCL ring benchmarks in the
# order BENCHMARKS.md asks for, the suspects of the NCCL forward gap told apart, and the
# scaling plot. Logs and JSON go to $OUT (default: ./gpu_out). NVLink multicast stays off.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
P=${P:-$(nvidia-smi -L | wc -l)}
SEQ=${SEQ:-32K,128K}
run() { python3 -m torch.distributed.run --nproc-per-node "$P" "$@"; }
nvidia-smi -L | tee "$OUT/gpus.txt"
# the zero-touch call on the real ring first: a transformers LLaMA checked on every rank, then timed
run benchmarks/zero_touch_ring.py --cuda --layers 8 --hidden 2048 --heads 32 --kv-heads 8 --vocab 32000 \
  --checkpointing --seq 16384 65536 --json "$OUT/zero_touch_p$P.json" 2>&1 | grep -v Warn | tail -8
run benchmarks/ring_attention.py --seq "$SEQ" --iters 3 --out "$OUT/ring_p$P.json" 2>&1 | tail -8
run benchmarks/ring_attention.py --seq 128K --iters 3 --nccl-high-priority --out "$OUT/ring_p${P}_hiprio.json" \
  2>&1 | tail -4
run benchmarks/ring_attention.py --seq 128K --iters 3 --pg-backend cpu:gloo,cuda:nccl \
  --out "$OUT/ring_p${P}_cpuagree.json" 2>&1 | tail -4
run benchmarks/vs_context_parallel.py --seq "$SEQ" --max-seq "${MAX_SEQ:-0}" --iters 3 --timeout 120 \
  --out "$OUT/vs_context_parallel_p$P.json" > "$OUT/vs_cp.log" 2>&1
tail -20 "$OUT/vs_cp.log"
python3 benchmarks/plot_scaling.py --cp "$OUT/vs_context_parallel_p$P.json" benchmarks/results/vs_context_parallel_p*.json \
  --out "$OUT/scaling.png" 2>&1 | tail -1
