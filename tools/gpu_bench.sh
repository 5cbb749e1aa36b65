#!/usr/bin/env bash
# The GPU half of docs/benchmarks.md ("Training step"), as one command for a machine with one
# CUDA GPU and no network: install the wheels carried in $WHEELS (megatron-core, transformers)
# offline, record the card, measure a bf16 GEMM, check SDPA numerics, then run
# tools/bench_train.py --device cuda: fmtrain (fused kernels on, the CUDA default) vs
# transformers on a ~1.1B Yi config at seq 4096 in bf16, from the same initial weights (the two
# loss curves must agree), then fmtrain again without the fused kernels (the
# "unfused" variant: what they are worth), and the checkpoint-save benchmark. Everything lands
# in $OUT.
#
# Prepare the wheels on a machine with pip access (from the repo root):
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     megatron-core==0.16.1 transformers==5.24.0
# Then, on the GPU machine:  OUT=/tmp/out WHEELS=.whl bash tools/gpu_bench.sh
set -u -o pipefail
OUT=${OUT:-/tmp/fmtrain_gpu_bench}
WHEELS=${WHEELS:-.whl}
PY=${PY:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

# megatron-core always from the wheel; transformers from the wheel when it imports (its
# requirements must be met by what the machine has), else the machine's own.
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_mcore "$WHEELS"/megatron_core-*.whl || exit 1
export PYTHONPATH=/tmp/site_mcore
if ls "$WHEELS"/transformers-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site_tf "$WHEELS"/transformers-*.whl \
    && PYTHONPATH=/tmp/site_tf:/tmp/site_mcore $PY -c "from transformers import LlamaForCausalLM" \
    && export PYTHONPATH=/tmp/site_tf:/tmp/site_mcore
fi
echo "PYTHONPATH=$PYTHONPATH" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu,driver_version \
    --format=csv 2>&1 | tee -a "$OUT/env.txt"

PYTHONWARNINGS=ignore $PY - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import torch
from fmtrain.train.metrics import measure_gemm_tflops
dev = torch.device("cuda")
print(f"torch {torch.__version__} cuda {torch.version.cuda} on {torch.cuda.get_device_name(dev)}")
print(f"bf16 8192^3 GEMM: {measure_gemm_tflops(dev, 8192, torch.bfloat16, repeats=3, calls_per_repeat=10):.1f} TFLOP/s")
import shutil
from fmtrain.models.megatron_config import torch_compile_missing
print(f"torch.compile for megatron's fused kernels: missing {torch_compile_missing(use_cpu=False) or 'nothing'} "
      f"(cc: {shutil.which('cc')})")
for name in ("apex", "transformer_engine", "flash_attn", "triton"):
    try:
        __import__(name); print(f"{name}: importable")
    except Exception as exc:
        print(f"{name}: absent ({type(exc).__name__})")
EOF

# Attention numerics as fmtrain calls SDPA on this GPU: megatron leaves K/V as strided views of
# the fused QKV output, which some cuDNN attention builds mishandle (cf. TransformerEngine #1195).
PYTHONWARNINGS=ignore $PY - <<'EOF' 2>&1 | tee "$OUT/attention_check.txt"
# SDPA as fmtrain's SDPACoreAttention calls it (megatron's fused-QKV split views, SBHD permuted to
# BHSD, GQA) against the same call on contiguous copies and an fp32 math-backend reference.
import os, torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
dev = "cuda"
torch.manual_seed(0)
s, b, heads, groups, hd = (4096, 2, 16, 4, 128) if dev == "cuda" else (256, 2, 8, 2, 64)
per = heads // groups
mixed = torch.randn(s, b, groups, (per + 2) * hd, device=dev, dtype=torch.bfloat16)
dout = torch.randn(b, heads, s, hd, device=dev, dtype=torch.bfloat16)

def run(make_contig, backend=None, dtype=torch.bfloat16):
    m = mixed.detach().to(dtype).requires_grad_(True)
    q, k, v = torch.split(m, [per * hd, hd, hd], dim=3)
    q = q.reshape(s, b, heads, hd)
    k = k * 1.0  # stands for RoPE: a fresh contiguous tensor
    qkv = [t.permute(1, 2, 0, 3) for t in (q, k, v)]
    if make_contig:
        qkv = [t.contiguous() for t in qkv]
    ctx = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
    with ctx:
        o = F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=True)
    o.backward(dout.to(dtype))
    return o.detach().float(), m.grad.float()

ref_o, ref_g = run(True, SDPBackend.MATH, torch.float32)
rel = lambda a, r: float((a - r).norm() / r.norm())
backends = [("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
for bname, backend in backends:
    for name, contig in (("megatron strides", False), ("contiguous q/k/v", True)):
        try:
            o, g = run(contig, backend)
        except RuntimeError as exc:
            print(f"sdpa {bname:9s} {name:16s}: not available ({str(exc).splitlines()[0][:80]})")
            continue
        gq, gk, gv = torch.split(g, [per * hd, hd, hd], dim=3)
        rq, rk, rv = torch.split(ref_g, [per * hd, hd, hd], dim=3)
        print(f"sdpa {bname:9s} {name:16s}: rel err vs fp32 math: out {rel(o, ref_o):.2e} "
              f"dq {rel(gq, rq):.2e} dk {rel(gk, rk):.2e} dv {rel(gv, rv):.2e}")
EOF

PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-420}" $PY tools/bench_train.py --device cuda \
    --json-out "$OUT/bench_gpu.json" --profile "$OUT/profile_gpu.txt" --timeout 150 "$@" 2>&1 \
  | tee "$OUT/bench_gpu.log"

# docs/benchmarks.md "Checkpoint save" on the GPU (CKPT_BENCH=0 skips it): the loop's wait for
# sync and async saves of 25M-400M Yi models, side by side with megatron's gathering save.
if [ "${CKPT_BENCH:-1}" != 0 ]; then
  PYTHONUNBUFFERED=1 timeout "${CKPT_TIMEOUT:-300}" $PY -m torch.distributed.run --standalone --nproc-per-node 1 \
      tools/bench_checkpoint.py --sizes 25M,100M,400M --checkpoints 2 --every 20 --seq 256 --gbs 8 --mbs 4 \
      --gathered --out "$OUT/checkpoint" 2>&1 | tee "$OUT/bench_checkpoint.log"
fi
