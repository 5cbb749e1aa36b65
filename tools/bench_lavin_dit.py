#!/usr/bin/env python
"""LaVin-DiT benchmark: fmtrain's J-DiT training step against a plain-PyTorch implementation of
the same block stack, at the same size, on the same data.

``PlainJDiT`` below is the J-DiT written directly from the paper and the official repository's
``lib/model/blocks.py`` (DerrickWang005/LaVin-DiT) in plain PyTorch: ``torch.nn.Linear``
projections, full-width q/k RMSNorm, joint GQA attention through
``torch.nn.functional.scaled_dot_product_attention``, 3D RoPE, sandwich RMSNorm, scale-only
modulation with tanh gates, the release's parameter names. It loads fmtrain's weights as they
are (tests/test_lavin_dit.py uses it as the single-process reference for fmtrain's forward).

Both sides train on the same microbatches with the same flow-matching draw (fmtrain's, from the
samples' seeds) and loss (MSE + 0.1 L1 on the target stream), torch's AdamW (fused) with
fmtrain's hyperparameters and gradient clipping; the first-step losses must agree (checked).
Steps alternate ABBA after warm-up; the median step time gives samples/s per side and the ratio.

    .venv/bin/python tools/bench_lavin_dit.py --layers 4 --hidden 384 --heads 8 --kv-heads 2 \\
        --pairs 2 --latent 16 --batch 4 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

warnings.simplefilter("ignore")


# ----------------------------------------------------------------------------- the plain J-DiT


def _rms(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, axes) -> torch.Tensor:
    """3D RoPE on x [B, L, heads, d]: each axis chunk rotated (rotate-half) by its positions."""
    out, start = [], 0
    for dim in axes:
        chunk = x[..., start : start + dim].float()
        c, s = cos[:, None, start : start + dim], sin[:, None, start : start + dim]
        half = torch.cat([-chunk[..., dim // 2 :], chunk[..., : dim // 2]], dim=-1)
        out.append(chunk * c + half * s)
        start += dim
    return torch.cat(out, dim=-1).to(x.dtype)


def rope_tables(grid, axes, theta: float = 10000.0):
    t, h, w = grid
    pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).double()
    angles = []
    for i, dim in enumerate(axes):
        freqs = pos[:, i : i + 1] / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(torch.cat([freqs, freqs], dim=-1))
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


class _Attention(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.d, self.eps = heads, kv_heads, hidden // heads, eps
        for s in ("cond", "x"):
            self.add_module(f"{s}_q", torch.nn.Linear(hidden, hidden, bias=False))
            self.add_module(f"{s}_k", torch.nn.Linear(hidden, kv_heads * self.d, bias=False))
            self.add_module(f"{s}_v", torch.nn.Linear(hidden, kv_heads * self.d, bias=False))
            self.register_parameter(f"{s}_qnorm_weight", torch.nn.Parameter(torch.ones(hidden)))
            self.register_parameter(f"{s}_knorm_weight", torch.nn.Parameter(torch.ones(kv_heads * self.d)))
            self.add_module(f"{s}_proj", torch.nn.Linear(hidden, hidden, bias=False))

    def forward(self, cond, x, cos, sin, axes):
        def qkv(s, y):
            b, n, _ = y.shape
            q = _rms(getattr(self, f"{s}_q")(y), self.eps, getattr(self, f"{s}_qnorm_weight"))
            k = _rms(getattr(self, f"{s}_k")(y), self.eps, getattr(self, f"{s}_knorm_weight"))
            v = getattr(self, f"{s}_v")(y)
            return q.view(b, n, -1, self.d), k.view(b, n, -1, self.d), v.view(b, n, -1, self.d)

        (cq, ck, cv), (xq, xk, xv) = qkv("cond", cond), qkv("x", x)
        q = _rotate(torch.cat([cq, xq], 1), cos, sin, axes).transpose(1, 2)
        k = _rotate(torch.cat([ck, xk], 1), cos, sin, axes).transpose(1, 2)
        v = torch.cat([cv, xv], 1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv_heads != self.heads)
        out = out.transpose(1, 2).flatten(2)
        n = cond.shape[1]
        return self.cond_proj(out[:, :n]), self.x_proj(out[:, n:])


class _SwiGLU(torch.nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, ffn, bias=False)
        self.down_proj = torch.nn.Linear(ffn, hidden, bias=False)
        self.up_proj = torch.nn.Linear(hidden, ffn, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(torch.nn.Module):
    def __init__(self, hidden, heads, kv_heads, ffn, eps):
        super().__init__()
        self.eps = eps
        self.joint_attn = _Attention(hidden, heads, kv_heads, eps)
        self.cond_mlp, self.x_mlp = _SwiGLU(hidden, ffn), _SwiGLU(hidden, ffn)
        self.cond_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(hidden, 4 * hidden))
        self.x_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(hidden, 4 * hidden))

    def forward(self, cond, x, t_cond, t_x, cos, sin, axes):
        e = self.eps
        cs, cg, cs2, cg2 = self.cond_modulation(t_cond)[:, None].chunk(4, dim=-1)
        xs, xg, xs2, xg2 = self.x_modulation(t_x)[:, None].chunk(4, dim=-1)
        ca, xa = self.joint_attn(_rms(cond, e) * (1 + cs), _rms(x, e) * (1 + xs), cos, sin, axes)
        cond = cond + cg.tanh() * _rms(ca, e)
        x = x + xg.tanh() * _rms(xa, e)
        cond = cond + cg2.tanh() * _rms(self.cond_mlp(_rms(cond, e) * (1 + cs2)), e)
        return cond, x + xg2.tanh() * _rms(self.x_mlp(_rms(x, e) * (1 + xs2)), e)


class PlainJDiT(torch.nn.Module):
    """The J-DiT in plain PyTorch (one process, no parallelism): latents in, velocity out."""

    def __init__(self, *, layers, hidden, heads, kv_heads, ffn, in_channels, patch, eps=1e-6, embed_eps=1e-5):
        super().__init__()
        pf = in_channels * patch * patch
        self.patch, self.channels, self.eps = patch, in_channels, eps
        self.axes = (hidden // heads // 3,) * 3
        self.prompt_embed = torch.nn.Parameter(torch.zeros(1, hidden))
        self.answer_embed = torch.nn.Parameter(torch.zeros(1, hidden))
        self.cond_embedder = torch.nn.Sequential(torch.nn.Linear(pf, hidden), torch.nn.LayerNorm(hidden, eps=embed_eps))
        self.x_embedder = torch.nn.Sequential(torch.nn.Linear(pf, hidden), torch.nn.LayerNorm(hidden, eps=embed_eps))
        self.t_embedder = torch.nn.Module()
        self.t_embedder.mlp = torch.nn.Sequential(
            torch.nn.Linear(256, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden)
        )
        self.blocks = torch.nn.ModuleList(_Block(hidden, heads, kv_heads, ffn, eps) for _ in range(layers))
        self.final_layer = torch.nn.Module()
        self.final_layer.linear = torch.nn.Linear(hidden, pf)
        self.final_layer.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(hidden, hidden))

    def load_fmtrain_state(self, state: dict) -> None:
        """fmtrain's (= the release's) names; the q/k norm weights live flat here."""
        renamed = {}
        for key, value in state.items():
            if key.endswith("_extra_state"):
                continue
            for s in ("cond", "x"):
                for n in ("qnorm", "knorm"):
                    key = key.replace(f"joint_attn.{s}_{n}.weight", f"joint_attn.{s}_{n}_weight")
            renamed[key] = value
        self.load_state_dict(renamed, strict=True)

    def _tokens(self, z):  # [B, C, T, H, W] -> [B, T*(H/p)*(W/p), p*p*C]
        b, c, t, h, w = z.shape
        p = self.patch
        return z.reshape(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 4, 6, 1).reshape(b, -1, p * p * c)

    def forward(self, condition: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = 128
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        temb = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        t_cond, t_x = temb + self.prompt_embed, temb + self.answer_embed
        cond, x = self.cond_embedder(self._tokens(condition)), self.x_embedder(self._tokens(x_t))
        b, _, tx, h, w = x_t.shape
        p = self.patch
        cos, sin = rope_tables((condition.shape[2] + tx, h // p, w // p), self.axes)
        for block in self.blocks:
            cond, x = block(cond, x, t_cond, t_x, cos, sin, self.axes)
        scale = self.final_layer.adaLN_modulation(t_x)[:, None]
        out = self.final_layer.linear(_rms(x, self.eps) * (1 + scale))
        out = out.reshape(b, tx, h // p, w // p, p, p, self.channels).permute(0, 6, 1, 2, 4, 3, 5)
        return out.reshape(b, self.channels, tx, h, w).float()


# ----------------------------------------------------------------------------- benchmark


def bench_config(args):
    from fmtrain.config import load_config

    overrides = [
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.kv_heads}",
        f"model.ffn_hidden_size={args.ffn or int(4 * args.hidden * 2 / 3 / 64) * 64}",
        "model.in_channels=16",
        "model.patch_size=2",
        f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        "train.precision=fp32",
        "train.lr=1e-4",
        "train.min_lr=1e-5",
        "train.grad_clip=1.0",
        "train.weight_decay=0.0",
        "objective.l1_weight=0.1",
        "objective.text_drop_prob=0.0",
        "eval.interval=0",
        "logging.tensorboard=false",
        "run.dir=" + tempfile.mkdtemp(prefix="bench_lavin_"),
    ]
    return load_config(ROOT / "recipes" / "lavin_dit" / "tiny.yaml", overrides + list(args.overrides))


def microbatches(cfg, args, count: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    b, c, n = args.batch, cfg.model.in_channels, args.latent
    return [
        {
            "context": torch.randn(b, c, 2 * args.pairs + 1, n, n, generator=g),
            "target": torch.randn(b, c, 1, n, n, generator=g),
            "item_frames": 1,
            "pairs": args.pairs,
            "sample_seed": torch.arange(b) + 1000 * i,
        }
        for i in range(count)
    ]


def abba(first, second, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for i in range(steps):
        order = (first, second) if i % 2 == 0 else (second, first)
        for fn in order:
            t0 = time.perf_counter()
            fn()
            (a if fn is first else b).append(time.perf_counter() - t0)
    return a, b


def run(args) -> dict:
    from fmtrain import parallel
    from fmtrain.engine.megatron import MegatronEngine
    from fmtrain.engine.parts import family_module
    from fmtrain.models import dit
    from fmtrain.models.registry import get_family

    cfg = bench_config(args)
    topo = parallel.initialize(cfg)
    engine = MegatronEngine(cfg, topo, get_family("lavin_dit"))
    (chunk,) = engine.unwrapped_chunks()
    m, t = cfg.model, cfg.train
    plain = PlainJDiT(
        layers=m.num_layers,
        hidden=m.hidden_size,
        heads=m.num_attention_heads,
        kv_heads=m.num_query_groups,
        ffn=m.ffn_hidden_size,
        in_channels=m.in_channels,
        patch=m.patch_size,
    )
    plain.load_fmtrain_state(family_module(chunk).state_dict())
    optimizer = torch.optim.AdamW(
        plain.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=0.0, fused=True
    )
    batches = microbatches(cfg, args, 4)
    index = {"fmtrain": 0, "plain": 0}
    losses: dict[str, float] = {}

    def next_batch(side: str) -> dict:
        batch = batches[index[side] % len(batches)]
        index[side] += 1
        return batch

    def fmtrain_step():
        result = engine.train_step([next_batch("fmtrain")], lr=t.lr)
        losses.setdefault("fmtrain", result.loss)

    def plain_step():
        batch = next_batch("plain")
        draw = dit.flow_draw(
            cfg.objective, batch["target"], batch["sample_seed"], training=True, need_x_t=True, need_target=True
        )
        v = plain(batch["context"], draw.x_t, draw.t)
        err = v - draw.target
        loss = err.square().mean() + cfg.objective.l1_weight * err.abs().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.setdefault("plain", float(loss))

    fmtrain_step()
    plain_step()
    if abs(losses["fmtrain"] - losses["plain"]) > 1e-4 * abs(losses["plain"]):
        raise SystemExit(f"first-step losses differ: {losses}")
    ours, theirs = abba(fmtrain_step, plain_step, args.steps, args.warmup)
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    tokens = (2 * args.pairs + 2) * (args.latent // 2) ** 2
    return {
        "model": f"{m.num_layers} x {m.hidden_size} ({m.num_attention_heads} heads, {m.num_query_groups} KV)",
        "tokens_per_sample": tokens,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "first_loss": losses,
        "fmtrain_samples_per_s": args.batch / ours_s,
        "plain_samples_per_s": args.batch / theirs_s,
        "ratio": theirs_s / ours_s,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=0, help="SwiGLU width (default: the release's 2/3 x 4h)")
    parser.add_argument("--pairs", type=int, default=2, help="in-context example pairs per sample")
    parser.add_argument("--latent", type=int, default=16, help="latent height = width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json-out", default="")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    from fmtrain.launch.local import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    result = run(args)
    print(json.dumps(result, indent=2))
    print(
        f"fmtrain {result['fmtrain_samples_per_s']:.2f} samples/s vs plain PyTorch "
        f"{result['plain_samples_per_s']:.2f} samples/s -> ratio {result['ratio']:.3f} (goal >= 1.0)"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
