#!/usr/bin/env python
"""Training-step benchmark: fmtrain against a baseline measured side by side in the same run.

Modes (each command prints both sides and their ratio):

``single`` (CPU)
    fmtrain's single-rank step (Yi family, megatron engine, one-process gloo group) against
    transformers' ``LlamaForCausalLM`` with the identical architecture, batch, thread count,
    AdamW hyperparameters and gradient clipping, fp32. Both run in this process and are
    alternated step by step (ABBA order). fmtrain's initial weights are copied into the
    transformers model first, so the two first-step losses must agree: the same computation
    is being timed.
``parallel`` (CPU)
    TP=2 and DP=2 over 2 ranks (``torch.distributed.run``, 1 thread per rank) against the
    single-rank step with 2 threads on the same global batch; one subprocess per layout,
    results collected through JSON files.
``device`` (``--device cuda``)
    fmtrain in bf16 on one GPU for a ~1.1B Yi config at seq 4096, the micro-batch as large as
    fits (tried largest first, each in its own process), then the transformers baseline (bf16
    autocast over fp32 weights, sdpa) on the same GPU; with --profile, torch.profiler tables of
    one step of each side.
``cpu`` (default): ``single`` then ``parallel``.

Model FLOPs for both sides come from ``fmtrain.models.sizes.transformer_training_flops_per_token``
(Megatron-LM's count, causal attention counted half), so the TFLOP/s ratio equals the tokens/s ratio.

    .venv/bin/python tools/bench_train.py                      # single + parallel on CPU
    .venv/bin/python tools/bench_train.py --mode single --steps 6
    python3 tools/bench_train.py --device cuda --json-out out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# megatron and transformers warn at import about absent apex / TE / fused kernels; environment()
# records which of those are importable instead.
warnings.simplefilter("ignore")

# Model shapes. cpu-31m: ~31.7M parameters (the CPU anchor measured here: a 31M transformers Llama at
# batch 8 x 256). gpu-1b: TinyLlama-like 1.12B with head_dim 128 (flash-attention friendly).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=176,
        vocab_size=512,
        seq_length=64,
    ),
    "cpu-31m": dict(
        num_layers=8,
        hidden_size=512,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=1408,
        vocab_size=8192,
        seq_length=256,
    ),
    "gpu-1b": dict(
        num_layers=22,
        hidden_size=2048,
        num_attention_heads=16,
        num_query_groups=4,
        ffn_hidden_size=5632,
        vocab_size=32000,
        seq_length=4096,
    ),
}

OOM_EXIT = 3
# What device mode times next to fmtrain's defaults: the same step without the fused kernels.
DEFAULT_DEVICE_VARIANT = "unfused:model.fused_kernels=off,train.fused_adam=off"


# ----------------------------------------------------------------------------- shared pieces


def make_config(args, *, tp: int = 1, dp: int = 0, micro_batch: int | None = None):
    """The benchmark's config; ``--set`` overrides apply last (both sides read the model shape)."""
    from fmtrain.config import config_from_dict

    model = dict(PRESETS[args.preset], family="yi", attention_backend=args.attention_backend)
    return config_from_dict(
        {
            "run": {"seed": 1234},
            "model": model,
            "parallel": {"tp": tp, "dp": dp},
            "train": {
                "global_batch_size": args.global_batch,
                "micro_batch_size": micro_batch or args.global_batch,
                "precision": args.precision,
                "lr": 3e-4,
                "min_lr": 3e-5,
                "weight_decay": 0.1,
                "adam_beta1": 0.9,
                "adam_beta2": 0.95,
                "adam_eps": 1e-8,
                "grad_clip": 1.0,
            },
            "logging": {"tensorboard": False},
        },
        overrides=list(args.set),
    )


def flops_per_token(cfg) -> int:
    from fmtrain.models.sizes import transformer_training_flops_per_token

    m = cfg.model
    return transformer_training_flops_per_token(
        num_layers=m.num_layers,
        hidden=m.hidden_size,
        heads=m.num_attention_heads,
        kv_heads=m.num_query_groups,
        head_dim=cfg.head_dim,
        ffn=m.ffn_hidden_size,
        vocab=m.vocab_size,
        seq_len=m.seq_length,
        swiglu=True,
        causal=True,
    )


def global_batch(cfg, device) -> torch.Tensor:
    """The same random token windows [global_batch, seq + 1] for every side and layout."""
    gen = torch.Generator().manual_seed(0)
    m, t = cfg.model, cfg.train
    return torch.randint(0, m.vocab_size, (t.global_batch_size, m.seq_length + 1), generator=gen).to(device)


def split_microbatches(windows: torch.Tensor, micro_batch: int, dp: int = 1, dp_rank: int = 0) -> list[dict]:
    per_rank = windows.shape[0] // dp
    mine = windows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    out = []
    for k in range(0, per_rank, micro_batch):
        w = mine[k : k + micro_batch]
        out.append(
            {
                "tokens": w[:, :-1].contiguous(),
                "labels": w[:, 1:].contiguous(),
                "loss_mask": torch.ones(w[:, :-1].shape, dtype=torch.float32, device=w.device),
            }
        )
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, cpu_times: list | None = None):
    """Wall seconds of ``fn()`` (device work included); appends its process CPU seconds."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    sync(device)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - c0)
    return time.perf_counter() - t0, value


def single_process_env() -> None:
    """What torchrun would set for a world of one (megatron's process groups are global)."""
    from fmtrain.launch.local import free_port

    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )


def summarize(times: list[float], tokens: int, fpt: int, num_devices: int, peak: float) -> dict:
    med = statistics.median(times)
    tps = tokens / med
    tflops = fpt * tps / num_devices / 1e12
    return {
        "step_times_s": times,
        "median_step_s": med,
        "min_step_s": min(times),
        "tokens_per_s": tps,
        "tflops_per_device": tflops,
        "mfu": tflops / peak if peak > 0 else 0.0,
    }


def peak_tflops(device: torch.device) -> tuple[float, str]:
    from fmtrain.config import LoggingConfig
    from fmtrain.train.metrics import device_peak_tflops

    return device_peak_tflops(LoggingConfig(), device)


def environment(device: torch.device) -> dict:
    import importlib.util
    import platform

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    for name in ("megatron.core", "transformers", "apex", "transformer_engine"):
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        env[name] = None
        if spec is not None:
            try:
                mod = __import__(name, fromlist=["__version__"])
                env[name] = getattr(mod, "__version__", "present")
            except Exception as exc:  # noqa: BLE001 - report, do not fail the benchmark
                env[name] = f"import failed: {exc!r}"[:200]
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


# ----------------------------------------------------------------------------- the two sides


class FmtrainSide:
    """fmtrain's engine for ``cfg`` on this process's rank (process groups started here)."""

    name = "fmtrain"

    def __init__(self, cfg):
        from fmtrain import parallel
        from fmtrain.engine import build_engine
        from fmtrain.models.registry import get_family

        self.cfg = cfg
        self.topo = parallel.initialize(cfg)
        self.device = self.topo.device
        self.engine = build_engine(cfg, self.topo, get_family(cfg.model.family))
        windows = global_batch(cfg, self.device)
        self.microbatches = split_microbatches(windows, cfg.train.micro_batch_size, self.topo.dp, self.topo.dp_rank)
        self.losses: list[float] = []

    def step(self) -> float:
        result = self.engine.train_step(self.microbatches, self.cfg.train.lr)
        self.losses.append(result.loss)
        return result.loss

    def module(self) -> torch.nn.Module:
        return self.engine.unwrapped_chunks()[0]


class HFSide:
    """transformers' LlamaForCausalLM with the same shapes, batch, AdamW and clipping.

    fp32: plain fp32 training. bf16: fp32 weights under ``torch.autocast(bfloat16)`` (what the
    HF Trainer's ``bf16=True`` does), the usual mixed-precision counterpart of megatron's bf16
    weights + fp32 main weights.
    """

    name = "transformers"

    def __init__(self, cfg, device: torch.device):
        from transformers import LlamaConfig, LlamaForCausalLM

        m, t = cfg.model, cfg.train
        self.cfg = cfg
        self.device = device
        config = LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups,
            head_dim=cfg.head_dim,
            max_position_embeddings=m.seq_length,
            rms_norm_eps=m.norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=0.0,
            use_cache=False,
            initializer_range=m.init_method_std,
        )
        with torch.device(device):
            self.model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        self.model.train()
        if self.model.config._attn_implementation != "sdpa":
            raise RuntimeError(f"transformers picked {self.model.config._attn_implementation}, not sdpa")
        # megatron's default: no weight decay on 1-D parameters (norms, biases). Fused AdamW is
        # the HF Trainer's default optimizer with torch >= 2.8 ("adamw_torch_fused").
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            fused=True,
        )
        self.bf16 = cfg.train.precision == "bf16"
        windows = global_batch(cfg, device)
        self.microbatches = split_microbatches(windows, cfg.train.micro_batch_size)
        self.losses: list[float] = []

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        total = sum(mb["loss_mask"].sum() for mb in self.microbatches)
        loss_sum = 0.0
        vocab = self.cfg.model.vocab_size
        for mb in self.microbatches:
            ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
            with ctx:
                logits = self.model(input_ids=mb["tokens"]).logits  # (B, S, V)
            per_token = torch.nn.functional.cross_entropy(
                logits.float().view(-1, vocab), mb["labels"].view(-1), reduction="none"
            )
            loss = (per_token * mb["loss_mask"].view(-1)).sum()
            (loss / total).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        value = float(loss_sum / total)
        self.losses.append(value)
        return value


def fmtrain_state_as_hf(module: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
    """megatron GPTModel (TP=1, local spec) state -> LlamaForCausalLM state, for the loss check."""
    m = cfg.model
    h, hd, groups = m.hidden_size, cfg.head_dim, m.num_query_groups
    per_group = m.num_attention_heads // groups
    sd = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    out = {
        "model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
        "lm_head.weight": sd["output_layer.weight"],
        "model.norm.weight": sd["decoder.final_layernorm.weight"],
    }
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        # linear_qkv rows are grouped per query group: [q heads of the group, k, v] x head_dim.
        qkv = sd[src + "self_attention.linear_qkv.weight"].view(groups, (per_group + 2) * hd, h)
        out[dst + "self_attn.q_proj.weight"] = qkv[:, : per_group * hd].reshape(-1, h)
        out[dst + "self_attn.k_proj.weight"] = qkv[:, per_group * hd : (per_group + 1) * hd].reshape(-1, h)
        out[dst + "self_attn.v_proj.weight"] = qkv[:, (per_group + 1) * hd :].reshape(-1, h)
        out[dst + "self_attn.o_proj.weight"] = sd[src + "self_attention.linear_proj.weight"]
        gate, up = sd[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)  # SwiGLU: [gate; up]
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.linear_fc2.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "pre_mlp_layernorm.weight"]
    return out


def copy_fmtrain_weights_to_hf(module: torch.nn.Module, hf_model: torch.nn.Module, cfg) -> None:
    state = fmtrain_state_as_hf(module, cfg)
    hf_model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


# ----------------------------------------------------------------------------- mode: single


def run_single(args) -> dict:
    from fmtrain import parallel

    torch.set_num_threads(args.threads)
    single_process_env()
    cfg = make_config(args, micro_batch=args.micro_batch)
    fm = FmtrainSide(cfg)
    device = fm.device
    hf = HFSide(cfg, device)
    copy_fmtrain_weights_to_hf(fm.module(), hf.model, cfg)
    fpt = flops_per_token(cfg)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    peak, peak_source = peak_tflops(device)
    n_params = sum(p.numel() for p in hf.model.parameters())
    print(
        f"[single] {args.preset}: {n_params / 1e6:.2f}M params, batch {cfg.train.global_batch_size} x "
        f"{cfg.model.seq_length}, {torch.get_num_threads()} threads, {device.type}, "
        f"{cfg.train.precision}; peak {peak:.3f} TFLOP/s ({peak_source})",
        flush=True,
    )

    times = {"fmtrain": [], "transformers": []}
    cpu = {"fmtrain": [], "transformers": []}
    sides = [fm, hf]
    for i in range(args.warmup + args.steps):
        order = sides if i % 2 == 0 else sides[::-1]  # ABBA: neither side always goes first
        for side in order:
            cpu_times = cpu[side.name] if i >= args.warmup else None
            seconds, loss = timed(side.step, device, cpu_times)
            if i >= args.warmup:
                times[side.name].append(seconds)
        print(
            f"  step {i + 1}/{args.warmup + args.steps}"
            f"{' (warm-up)' if i < args.warmup else ''}: fmtrain loss {fm.losses[-1]:.4f}, "
            f"transformers loss {hf.losses[-1]:.4f}",
            flush=True,
        )
    res = {name: summarize(t, tokens, fpt, 1, peak) for name, t in times.items()}
    for name, side in (("fmtrain", fm), ("transformers", hf)):
        res[name]["losses"] = side.losses
        res[name]["cpu_seconds_per_step"] = statistics.median(cpu[name])
    # Steps i of the two sides ran back to back, so load from other processes on the machine
    # hits both alike: the median of per-pair ratios is the statistic least moved by it.
    res["paired_ratio"] = statistics.median(h / f for f, h in zip(times["fmtrain"], times["transformers"]))
    res["cpu_time_ratio"] = res["transformers"]["cpu_seconds_per_step"] / res["fmtrain"]["cpu_seconds_per_step"]
    res.update(
        mode="single",
        preset=args.preset,
        params=n_params,
        threads=torch.get_num_threads(),
        global_batch=cfg.train.global_batch_size,
        seq=cfg.model.seq_length,
        flops_per_token=fpt,
        peak_tflops=peak,
        peak_source=peak_source,
        ratio=res["fmtrain"]["tokens_per_s"] / res["transformers"]["tokens_per_s"],
        first_loss_abs_diff=abs(fm.losses[0] - hf.losses[0]),
        env=environment(device),
    )
    if args.profile:
        res["profile_file"] = profile_sides(args, fm, hf)
    parallel.destroy()
    return res


def profile_sides(args, *sides) -> str:
    """torch.profiler op tables of one step of each side (CPU self time), into one text file."""
    from torch.profiler import ProfilerActivity, profile

    path = Path(args.profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    cuda = sides[0].device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(path, "w") as f:
        for side in sides:
            side.step()
            sync(side.device)
            with profile(activities=acts) as prof:
                side.step()
                sync(side.device)
            f.write(f"===== {side.name}: one training step\n")
            f.write(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=70))
            f.write("\n\n")
    return str(path)


def print_single(res: dict) -> None:
    print(
        f"\n== single rank vs transformers ({res['preset']}, {res['params'] / 1e6:.1f}M params, "
        f"batch {res['global_batch']}x{res['seq']}, {res['threads']} threads, fp32 CPU)"
    )
    print(
        f"   peak {res['peak_tflops'] * 1e3:.1f} GFLOP/s ({res['peak_source']}); "
        f"model FLOPs/token {res['flops_per_token'] / 1e6:.1f}M"
    )
    print(
        f"   {'':14s}{'median step':>12s}{'fastest':>9s}{'tokens/s':>11s}{'GFLOP/s':>9s}{'MFU':>7s}"
        f"{'loss 1st->last':>18s}"
    )
    for name in ("fmtrain", "transformers"):
        r = res[name]
        print(
            f"   {name:14s}{r['median_step_s']:11.3f}s{r['min_step_s']:8.3f}s{r['tokens_per_s']:11.0f}"
            f"{r['tflops_per_device'] * 1e3:9.1f}{100 * r['mfu']:6.1f}%"
            f"{r['losses'][0]:9.4f} ->{r['losses'][-1]:7.4f}"
        )
    print(f"   ratio fmtrain/transformers (tokens/s at median step): {res['ratio']:.3f}x (goal >= 1.0x)")
    print(
        f"   paired ratio (median over back-to-back step pairs of t_transformers/t_fmtrain): "
        f"{res['paired_ratio']:.3f}x; process CPU seconds per step fmtrain "
        f"{res['fmtrain']['cpu_seconds_per_step']:.2f} vs transformers "
        f"{res['transformers']['cpu_seconds_per_step']:.2f} ({res['cpu_time_ratio']:.3f}x)"
    )
    print(
        f"   first-step loss |diff| {res['first_loss_abs_diff']:.2e} (same weights, same batch); "
        f"1-min load average at the end {res['env']['loadavg_1min']} on {res['env']['cpu_count']} CPUs"
    )


# ----------------------------------------------------------------------------- worker (subprocess side)


def run_worker(args) -> int:
    """One side, one layout, in this process (under torchrun for several ranks)."""
    torch.set_num_threads(args.threads)
    single_process_env()
    device_type = args.device
    out: dict = {
        "side": args.worker,
        "tp": args.tp,
        "dp": args.dp,
        "micro_batch": args.micro_batch,
        "variant": args.variant_name,
        "overrides": list(args.set),
    }
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = make_config(args, tp=args.tp, dp=args.dp, micro_batch=args.micro_batch)
        if args.simulate_oom_above and args.micro_batch > args.simulate_oom_above:
            raise torch.OutOfMemoryError("simulated (--simulate-oom-above)")
        if args.worker == "fmtrain":
            side = FmtrainSide(cfg)
            if args.save_init and rank == 0 and args.tp == 1:
                state = {
                    k: v.detach().to("cpu", copy=True).contiguous()
                    for k, v in fmtrain_state_as_hf(side.module(), cfg).items()
                }
                torch.save(state, args.save_init)
                del state
        else:
            device = torch.device(device_type)
            side = HFSide(cfg, device)
            if args.load_init and Path(args.load_init).exists():
                state = torch.load(args.load_init, map_location=device)
                side.model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
                del state
                out["init_from_fmtrain"] = True
        device = side.device
        world = int(os.environ.get("WORLD_SIZE", "1"))
        fpt = flops_per_token(cfg)
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        times = []
        for i in range(args.warmup + args.steps):
            seconds, loss = timed(side.step, device)
            if i >= args.warmup:
                times.append(seconds)
            if rank == 0:
                print(
                    f"  [{args.worker} tp={args.tp} dp={args.dp} mbs={args.micro_batch}] step {i + 1}: "
                    f"{seconds:.3f}s loss {loss:.4f}",
                    flush=True,
                )
        peak, source = peak_tflops(device) if rank == 0 else (0.0, "")
        out.update(
            summarize(times, tokens, fpt, world, peak),
            peak_tflops=peak,
            peak_source=source,
            world_size=world,
            threads=torch.get_num_threads(),
            losses=side.losses,
            flops_per_token=fpt,
            global_batch=cfg.train.global_batch_size,
            seq=cfg.model.seq_length,
            env=environment(device),
        )
        if device.type == "cuda":
            out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.worker == "fmtrain":
            out["params"] = sum(p.numel() for p in side.module().parameters()) * args.tp
        else:
            out["params"] = sum(p.numel() for p in side.model.parameters())
        if args.profile and rank == 0:
            out["profile_file"] = profile_sides(args, side)
    except torch.OutOfMemoryError as exc:
        out.update(oom=True, error=str(exc)[:300])
        if rank == 0 and args.json_out:
            Path(args.json_out).write_text(json.dumps(out))
        print(f"  [{args.worker} mbs={args.micro_batch}] out of memory", flush=True)
        return OOM_EXIT
    if rank == 0 and args.json_out:
        Path(args.json_out).write_text(json.dumps(out))
    if args.worker == "fmtrain":
        from fmtrain import parallel

        parallel.destroy()
    return 0


def worker_command(
    args,
    *,
    side: str,
    tp: int = 1,
    dp: int = 0,
    threads: int,
    micro_batch: int,
    json_out: str,
    nproc: int = 1,
    profile: str = "",
    init_file: str = "",
    variant: tuple[str, list[str]] | None = None,
) -> list[str]:
    base = [sys.executable]
    if nproc > 1:
        base += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = base + [
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--global-batch",
        str(args.global_batch),
        "--micro-batch",
        str(micro_batch),
        "--tp",
        str(tp),
        "--dp",
        str(dp),
        "--threads",
        str(threads),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--attention-backend",
        args.attention_backend,
        "--json-out",
        json_out,
    ]
    if args.simulate_oom_above:
        cmd += ["--simulate-oom-above", str(args.simulate_oom_above)]
    if init_file:
        cmd += ["--save-init" if side == "fmtrain" else "--load-init", init_file]
    overrides = list(args.set)
    if variant is not None:
        cmd += ["--variant-name", variant[0]]
        overrides += variant[1]
    for item in overrides:
        cmd += ["--set", item]
    if profile:
        cmd += ["--profile", profile, "--profile-rows", str(args.profile_rows)]
    return cmd


def launch(cmd: list[str], threads: int, timeout: float) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(cmd, env=env, timeout=timeout).returncode


# ----------------------------------------------------------------------------- mode: parallel


def run_parallel(args) -> dict:
    layouts = [
        ("single rank, 2 threads", 1, 1, 2),
        ("TP=2 (2 ranks x 1 thread)", 2, 1, 1),
        ("DP=2 (2 ranks x 1 thread)", 1, 2, 1),
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for label, tp, dp, threads in layouts:
                nproc = tp * dp
                micro = args.global_batch // dp  # one microbatch per rank: same GEMM sizes as the baseline
                out = Path(tmp) / f"{rnd}_{tp}_{dp}.json"
                print(f"[parallel] round {rnd + 1}: {label}", flush=True)
                rc = launch(
                    worker_command(
                        args,
                        side="fmtrain",
                        tp=tp,
                        dp=dp,
                        threads=threads,
                        micro_batch=micro,
                        json_out=str(out),
                        nproc=nproc,
                    ),
                    threads,
                    args.timeout,
                )
                if rc != 0 or not out.exists():
                    raise SystemExit(f"[parallel] {label} failed (exit code {rc})")
                results.append(dict(json.loads(out.read_text()), label=label, round=rnd))
    by_label: dict[str, list[dict]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    summary = {}
    for label, runs in by_label.items():
        best = max(runs, key=lambda r: r["tokens_per_s"])  # best round per layout
        best["rounds"] = [r["tokens_per_s"] for r in runs]
        summary[label] = best
    base = summary[layouts[0][0]]["tokens_per_s"]
    for r in summary.values():
        r["ratio_vs_single"] = r["tokens_per_s"] / base
    return {
        "mode": "parallel",
        "preset": args.preset,
        "layouts": summary,
        "global_batch": args.global_batch,
        "seq": PRESETS[args.preset]["seq_length"],
    }


def print_parallel(res: dict) -> None:
    print(
        f"\n== parallel efficiency ({res['preset']}, global batch {res['global_batch']}x{res['seq']}, "
        f"fp32 CPU, same total threads)"
    )
    print(
        f"   {'layout':28s}{'median step':>12s}{'fastest':>9s}{'tokens/s':>11s}{'GFLOP/s total':>15s}{'vs single':>11s}"
    )
    for label, r in res["layouts"].items():
        total = r["tflops_per_device"] * r["world_size"] * 1e3
        print(
            f"   {label:28s}{r['median_step_s']:11.3f}s{r['min_step_s']:8.3f}s{r['tokens_per_s']:11.0f}"
            f"{total:15.1f}{r['ratio_vs_single']:10.3f}x"
        )


# ----------------------------------------------------------------------------- mode: device


def run_device(args, tmp: Path) -> dict:
    candidates = [int(x) for x in args.micro_batches.split(",")]
    res: dict = {
        "mode": "device",
        "preset": args.preset,
        "precision": args.precision,
        "global_batch": args.global_batch,
        "seq": PRESETS[args.preset]["seq_length"],
    }
    chosen = None
    for side in ("fmtrain", "transformers"):
        # Start from the micro-batch fmtrain fitted: the baseline rarely needs less memory.
        tries = candidates if chosen is None else [c for c in candidates if c <= chosen] or candidates
        for mbs in tries:
            if args.global_batch % mbs:
                continue
            out = tmp / f"{side}_mbs{mbs}.json"
            profile = str(tmp / f"profile_{side}.txt") if args.profile else ""
            print(f"[device] {side}: micro-batch {mbs}", flush=True)
            t0 = time.perf_counter()
            # The baseline starts from fmtrain's initial weights, so the two loss curves must
            # agree: a check that both sides compute the same thing on this device.
            init_file = str(tmp / "init_hf_layout.pt") if args.parity else ""
            rc = launch(
                worker_command(
                    args,
                    side="hf" if side == "transformers" else "fmtrain",
                    threads=args.threads,
                    micro_batch=mbs,
                    json_out=str(out),
                    profile=profile,
                    init_file=init_file,
                ),
                args.threads,
                args.timeout,
            )
            print(
                f"[device] {side}: micro-batch {mbs} exit code {rc} after {time.perf_counter() - t0:.0f}s", flush=True
            )
            data = json.loads(out.read_text()) if out.exists() else {"error": f"exit code {rc}"}
            res.setdefault("attempts", []).append(
                {"side": side, "micro_batch": mbs, "rc": rc, "oom": bool(data.get("oom"))}
            )
            if rc == 0 and "tokens_per_s" in data:
                res[side] = data
                if side == "fmtrain":
                    chosen = mbs
                break
            if rc != OOM_EXIT and not data.get("oom"):  # torchrun maps exit codes to 1
                res[side] = data  # a real failure: keep the error, do not try smaller
                break
    # Variants of fmtrain's own step (config overrides) at the micro-batch the default fitted,
    # e.g. without the fused kernels: what each kernel choice is worth on this device.
    for name, overrides in args.fmtrain_variants:
        if chosen is None:
            break
        out = tmp / f"fmtrain_{name}.json"
        print(f"[device] fmtrain variant {name} ({' '.join(overrides)}): micro-batch {chosen}", flush=True)
        rc = launch(
            worker_command(
                args,
                side="fmtrain",
                threads=args.threads,
                micro_batch=chosen,
                json_out=str(out),
                variant=(name, overrides),
            ),
            args.threads,
            args.timeout,
        )
        data = json.loads(out.read_text()) if out.exists() else {"error": f"exit code {rc}"}
        res.setdefault("variants", {})[name] = data
    hf = res.get("transformers", {})
    for r in res.get("variants", {}).values():
        if "tokens_per_s" in r and "tokens_per_s" in res.get("fmtrain", {}):
            r["default_speedup"] = res["fmtrain"]["tokens_per_s"] / r["tokens_per_s"]
    for r in [res.get("fmtrain", {})] + list(res.get("variants", {}).values()):
        if "tokens_per_s" in r and "tokens_per_s" in hf:
            r["ratio_vs_transformers"] = r["tokens_per_s"] / hf["tokens_per_s"]
            if hf.get("init_from_fmtrain"):
                r["loss_abs_diff_vs_transformers"] = [abs(a - b) for a, b in zip(r["losses"], hf["losses"])]
    if "ratio_vs_transformers" in res.get("fmtrain", {}):
        res["ratio"] = res["fmtrain"]["ratio_vs_transformers"]
        if "loss_abs_diff_vs_transformers" in res["fmtrain"]:
            res["loss_abs_diff"] = res["fmtrain"]["loss_abs_diff_vs_transformers"]
    return res


def print_device(res: dict) -> None:
    print(f"\n== {res['preset']} on one device, {res['precision']}, global batch {res['global_batch']}x{res['seq']}")
    for name in ("fmtrain", "transformers"):
        r = res.get(name)
        if not r or "tokens_per_s" not in r:
            print(f"   {name}: no result ({(r or {}).get('error', 'not run')})")
            continue
        env = r.get("env", {})
        print(
            f"   {name:13s} mbs {r['micro_batch']}: {r['median_step_s']:.3f}s/step, "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops_per_device']:.1f} TFLOP/s, "
            f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.1f} ({r['peak_source']}), "
            f"peak mem {r.get('max_memory_gib', 0):.1f} GiB, loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
        )
    env = (res.get("fmtrain") or res.get("transformers") or {}).get("env", {})
    if env:
        print(f"   env: {json.dumps(env)}")
    if "loss_abs_diff" in res:
        diffs = res["loss_abs_diff"]
        print(
            f"   same initial weights: |loss fmtrain - transformers| step 1 {diffs[0]:.4f}, "
            f"max over {len(diffs)} steps {max(diffs):.4f}"
        )
        print("   losses fmtrain     : " + " ".join(f"{x:.3f}" for x in res["fmtrain"]["losses"]))
        print("   losses transformers: " + " ".join(f"{x:.3f}" for x in res["transformers"]["losses"]))
    for name, r in res.get("variants", {}).items():
        if "tokens_per_s" not in r:
            print(f"   fmtrain [{name}]: no result ({r.get('error', '?')})")
            continue
        line = (
            f"   fmtrain [{name}: {' '.join(r.get('overrides', []))}]: {r['median_step_s']:.3f}s/step, "
            f"{r['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {100 * r['mfu']:.1f}%, ratio vs transformers {r.get('ratio_vs_transformers', 0):.3f}x; "
            f"fmtrain's defaults are {r.get('default_speedup', 0):.3f}x this"
        )
        if "loss_abs_diff_vs_transformers" in r:
            line += f", max |loss diff| {max(r['loss_abs_diff_vs_transformers']):.4f}"
        print(line)
        print(f"   losses fmtrain [{name}]: " + " ".join(f"{x:.3f}" for x in r["losses"]))
    if "ratio" in res:
        print(
            f"   ratio fmtrain/transformers: {res['ratio']:.3f}x; fmtrain MFU "
            f"{100 * res['fmtrain']['mfu']:.1f}% (goal >= 50%)"
        )


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--mode",
        choices=("cpu", "single", "parallel", "device"),
        default=None,
        help="cpu = single + parallel (default on CPU); device is the default with --device cuda",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="model shape (default cpu-31m on CPU, gpu-1b on CUDA)"
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="single mode and workers: micro-batch size (default: the global batch)",
    )
    p.add_argument(
        "--micro-batches", default="4,2,1", help="device mode: micro-batch sizes to try, largest first (default 4,2,1)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 CPU, 3 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8 CPU, 10 CUDA)")
    p.add_argument("--rounds", type=int, default=1, help="parallel mode: repeat the three layouts")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--profile", default="", help="write torch.profiler op tables of one step here")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--json-out", default="", help="write all results as JSON here")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    # internal: one side in a subprocess
    p.add_argument("--worker", choices=("fmtrain", "hf"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--dp", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--simulate-oom-above", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--save-init", default="", help=argparse.SUPPRESS)
    p.add_argument("--load-init", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (e.g. train.fused_adam=off); repeatable",
    )
    p.add_argument(
        "--fmtrain-variant",
        action="append",
        default=None,
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="device mode: also time fmtrain with these overrides at the same micro-batch "
        f"(default: {DEFAULT_DEVICE_VARIANT}); 'none' for no variant; repeatable",
    )
    p.add_argument("--variant-name", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--no-parity",
        dest="parity",
        action="store_false",
        help="device mode: let the baseline draw its own weights instead of starting "
        "from fmtrain's (skips the loss-curve agreement check)",
    )
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.mode = args.mode or ("device" if gpu else "cpu")
    args.preset = args.preset or ("gpu-1b" if gpu else "cpu-31m")
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.warmup = 3 if args.warmup is None else args.warmup
    args.steps = (10 if gpu else 8) if args.steps is None else args.steps
    if args.micro_batch is None:
        args.micro_batch = args.global_batch
    args.fmtrain_variants = (
        []
        if args.fmtrain_variant == ["none"]
        else [_parse_variant(v) for v in (args.fmtrain_variant or [DEFAULT_DEVICE_VARIANT])]
    )
    return args


def _parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    items = [o for o in overrides.split(",") if o]
    if not sep or not name or not items or any("=" not in o for o in items):
        raise SystemExit(f"--fmtrain-variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    return name, items


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    results: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv)}
    if args.mode in ("cpu", "single"):
        results["single"] = run_single(args)
    if args.mode in ("cpu", "parallel"):
        results["parallel"] = run_parallel(args)
    if args.mode == "device":
        with tempfile.TemporaryDirectory() as tmp:
            results["device"] = run_device(args, Path(tmp))
            tables = [Path(tmp) / f"profile_{side}.txt" for side in ("fmtrain", "transformers")]
            if args.profile and any(t.exists() for t in tables):
                Path(args.profile).write_text("".join(t.read_text() for t in tables if t.exists()))
                results["device"]["profile_file"] = args.profile
    if "single" in results:
        print_single(results["single"])
    if "parallel" in results:
        print_parallel(results["parallel"])
    if "device" in results:
        print_device(results["device"])
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
