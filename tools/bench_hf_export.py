"""Peak memory of ``fmtrain convert to-hf`` against holding the whole model, on a scaled Yi.

    .venv/bin/python tools/bench_hf_export.py [--hidden 2048 --layers 4 --ffn 5504 --vocab 64000]

Builds a random ``LlamaForCausalLM`` with transformers (Yi's vocabulary and head size, fewer /
narrower layers), converts it with ``fmtrain convert from-hf --nproc T parallel.tp=T`` (``--tp``, default 2: the
export then reassembles tensor-parallel pieces), then measures, each in its own
process under ``/usr/bin/time`` (maximum resident set size):

- baseline: a process that imports what ``to-hf`` imports and nothing else;
- ``fmtrain convert to-hf`` in fp32 and in bf16 (streaming, one tensor at a time);
- whole-model: the same tensors read into one state dict and written with
  ``safetensors.torch.save_file`` (what an exporter that gathers the model first needs).

Prints peak RSS, peak minus baseline, that excess over the largest tensor, and the ratio
streaming / whole-model. docs/benchmarks.md ("Hugging Face export memory") has the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}

BASELINE = """
import torch, torch.distributed.checkpoint, safetensors.torch
import fmtrain.checkpoint.hf.convert, fmtrain.models.yi.convert, fmtrain.data.hf_tokenizer
"""

WHOLE_MODEL = """
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from fmtrain.checkpoint.hf.convert import DistCheckpointReader, converter
from fmtrain.config import config_from_dict
ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = config_from_dict(json.loads((ckpt / "fmtrain_state.json").read_text())["config"])
conv = converter("yi")
s = conv.YiShapes.from_config(cfg)
reader = DistCheckpointReader(ckpt)
state = {}
for key, index in conv.export_order(s, present=lambda k: k in reader):
    for name, t in conv.hf_tensors_from_megatron(key, index, reader.read(key, index), s).items():
        state[name] = t.contiguous().clone()
out.mkdir(parents=True, exist_ok=True)
save_file(state, str(out / "model.safetensors"))
"""

MAKE_MODEL = """
import sys, torch, transformers
kw = dict(vocab_size=int(sys.argv[2]), hidden_size=int(sys.argv[3]), intermediate_size=int(sys.argv[4]),
          num_hidden_layers=int(sys.argv[5]), num_attention_heads=int(sys.argv[6]),
          num_key_value_heads=int(sys.argv[7]), head_dim=128, rope_theta=5e6, rms_norm_eps=1e-5,
          max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).to(torch.float32)
model.save_pretrained(sys.argv[1], max_shard_size="1GB")
print(sum(p.numel() for p in model.parameters()))
"""


def peak_rss_mib(cmd: list[str]) -> float:
    """Maximum resident set size of ``cmd`` (and only it), from GNU time."""
    with tempfile.NamedTemporaryFile(suffix=".time") as f:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", f.name, *cmd], cwd=REPO, env=ENV, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return int(Path(f.name).read_text().split()[-1]) / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=5504)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=64000)
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the converted checkpoint")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_hf_export_"))
    hf_dir, ckpt = work / "hf", work / f"ckpt_tp{args.tp}"
    if not (hf_dir / "config.json").is_file():
        subprocess.run(
            [
                PY,
                "-c",
                MAKE_MODEL,
                str(hf_dir),
                str(args.vocab),
                str(args.hidden),
                str(args.ffn),
                str(args.layers),
                str(args.heads),
                str(args.kv_heads),
            ],
            check=True,
            env=ENV,
        )
    if not (ckpt / "fmtrain_state.json").is_file():
        subprocess.run(
            [
                PY,
                "-m",
                "fmtrain.cli",
                "convert",
                "from-hf",
                str(hf_dir),
                str(ckpt),
                "--nproc",
                str(args.tp),
                f"parallel.tp={args.tp}",
                "--overwrite",
            ],
            check=True,
            env=ENV,
            cwd=REPO,
        )
    config = json.loads((hf_dir / "config.json").read_text())
    h, v, ffn, layers = (
        config["hidden_size"],
        config["vocab_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
    )
    q = config["num_attention_heads"] * 128
    kv = config["num_key_value_heads"] * 128
    params = 2 * v * h + layers * (h * (q + 2 * kv) + q * h + 3 * h * ffn + 2 * h) + h
    largest = max(v * h, 2 * ffn * h, (q + 2 * kv) * h) * 4  # fp32 bytes of the largest megatron tensor
    print(f"checkpoint written at TP={args.tp}")
    print(
        f"model: {layers} layers, hidden {h}, FFN {ffn}, vocab {v}: {params / 1e6:.1f}M parameters, "
        f"{params * 4 / 2**20:.0f} MiB fp32; largest tensor {largest / 2**20:.0f} MiB fp32"
    )

    base = peak_rss_mib([PY, "-c", BASELINE])
    rows = [("baseline (imports only)", base)]
    for dtype in ("fp32", "bf16"):
        out = work / f"export_{dtype}"
        rows.append(
            (
                f"fmtrain convert to-hf --dtype {dtype}",
                peak_rss_mib(
                    [
                        PY,
                        "-m",
                        "fmtrain.cli",
                        "convert",
                        "to-hf",
                        str(ckpt),
                        str(out),
                        "--dtype",
                        dtype,
                        "--overwrite",
                        "--max-shard-size",
                        "1GB",
                    ]
                ),
            )
        )
    whole = peak_rss_mib([PY, "-c", WHOLE_MODEL, str(ckpt), str(work / "whole")])
    rows.append(("whole model in memory, save_file (fp32)", whole))
    for name, peak in rows:
        extra = (
            ""
            if name.startswith("baseline")
            else (f"  excess {peak - base:7.0f} MiB = {(peak - base) * 2**20 / largest:4.2f} x largest tensor")
        )
        print(f"{name:44s} peak {peak:7.0f} MiB{extra}")
    streaming = rows[1][1]
    print(
        f"ratio streaming / whole-model excess: {(streaming - base) / (whole - base):.3f} "
        f"(peak {streaming:.0f} / {whole:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
