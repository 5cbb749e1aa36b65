"""``fmtrain sample``: generate with a DiT checkpoint (Euler sampler, classifier-free guidance).

    fmtrain sample RECIPE --ckpt DIR --prompt-emb F.npz --out F.npy        Step-Video: text embeddings
    fmtrain sample RECIPE --ckpt DIR --prompt TEXT --llm-encoder DIR ...    ... embedded here
    fmtrain sample RECIPE --ckpt DIR --task-dir DIR --query FILE --vae SRC --out F.png|F.mp4
                                                                            LaVin-DiT: example pairs + a query
    fmtrain sample RECIPE --ckpt DIR --prompt-emb F.npz --out F.npy        LaVin-DiT: context latents

One process holds the whole model, whatever layout wrote the checkpoint. The latents go to
OUT.npy; with ``--vae`` (a checkpoint or release of the family's VAE: the Video-VAE for
Step-Video, the ST-VAE for LaVin-DiT) they are decoded to OUT.mp4, or OUT.png for one-frame
outputs (``-i`` before the suffix for ``--num`` > 1).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fmtrain.config import WHOLE_MODEL_LAYOUT, ConfigError, load_config, validate
from fmtrain.launch.local import free_port

OUTPUTS = (".npy", ".mp4", ".png")


def cmd_sample(args: argparse.Namespace) -> int:
    sampler = [
        f"objective.{key}={value}"
        for key, value in (
            ("sample_steps", args.steps),
            ("sample_shift", args.shift),
            ("guidance_scale", args.guidance),
        )
        if value is not None
    ]
    cfg = load_config(args.recipe, [*args.overrides, *WHOLE_MODEL_LAYOUT, *sampler])
    validate(cfg, 1)
    from fmtrain.config import parse_latent_shape
    from fmtrain.models.registry import get_family

    family = get_family(cfg.model.family)
    if family.sample is None:
        raise ConfigError(
            f"model.family={cfg.model.family!r} has no sampler (fmtrain sample is for generative families)"
        )
    shape = parse_latent_shape(args.shape, "--shape") if args.shape else None
    check_prompt_args(args)
    out = Path(args.out)
    if out.suffix not in OUTPUTS or (out.suffix != ".npy") != bool(args.vae):
        raise ConfigError(f"--out {out}: latents go to a .npy; with --vae the decoded frames to a .mp4 or .png")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import numpy as np

    from fmtrain import parallel
    from fmtrain.checkpoint import load_model_weights
    from fmtrain.engine.parts import build_for_inference, family_module

    vae_cfg = None
    if args.vae:
        from fmtrain.checkpoint.pretrained import latent_vae_config

        vae_cfg = latent_vae_config(args.vae, cfg.model.in_channels, "--vae", family.latent_vae)
    topo = parallel.initialize(cfg)
    try:
        model = build_for_inference(cfg, family.primary(cfg), topo.device)  # the run seed's weights...
        if args.ckpt:
            load_model_weights(args.ckpt, model, cfg)  # ...or a checkpoint's, from any layout
        if args.prompt:
            prompt_file = embed_prompt(args, cfg, topo.device)
        elif args.task_dir:
            prompt_file = encode_task_prompt(args, cfg, vae_cfg, topo.device)
        else:
            prompt_file = args.prompt_emb
        latents = family.sample(
            cfg,
            family_module(model),
            prompt_file=prompt_file,
            shape=shape,
            num=args.num,
            seed=args.seed,
            device=topo.device,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out.with_suffix(".npy"), latents.cpu().numpy(), allow_pickle=False)
        o = cfg.objective
        print(
            f"fmtrain sample: {tuple(latents.shape)} latents ({o.sample_steps} Euler steps, shift "
            f"{o.sample_shift}, guidance {o.guidance_scale}, seed {args.seed}) -> {out.with_suffix('.npy')}; "
            f"mean {latents.mean():.4f} std {latents.std():.4f}"
        )
        if args.vae:
            write_decoded(out, latents, vae_cfg, args, topo.device)
    finally:  # also after an error: the caller's process (a test, a notebook) may go on
        parallel.destroy()
    return 0


def check_prompt_args(args: argparse.Namespace) -> None:
    given = [flag for flag, value in (("--prompt-emb", args.prompt_emb), ("--prompt", args.prompt)) if value]
    given += ["--task-dir"] if args.task_dir else []
    if len(given) != 1:
        raise ConfigError(
            "give one condition: --prompt-emb FILE.npz, --prompt TEXT (with --llm-encoder), or --task-dir DIR "
            f"with --query FILE (and --vae); got {', '.join(given) or 'none'}"
        )
    if args.prompt and not args.llm_encoder:
        raise ConfigError("--prompt needs --llm-encoder DIR (and --clip-encoder DIR with a CLIP slot), as data encode")
    if bool(args.task_dir) != bool(args.query):
        raise ConfigError("--task-dir DIR (example pairs) and --query FILE go together")
    if args.task_dir and not args.vae:
        raise ConfigError("--task-dir encodes its images with the model's VAE: give --vae SRC")


def embed_prompt(args: argparse.Namespace, cfg, device) -> str:
    """``--prompt`` through the text encoders ``fmtrain data encode`` used; saved as OUT.prompt.npz."""
    import numpy as np

    from fmtrain.encode import TextEncoder

    m = cfg.model
    arrays = {"text_emb": TextEncoder(args.llm_encoder, m.caption_tokens, device, "--llm-encoder")(args.prompt)}
    if args.clip_encoder:
        arrays["clip_emb"] = TextEncoder(args.clip_encoder, m.clip_tokens, device, "--clip-encoder")(args.prompt)
    path = Path(args.out).with_suffix(".prompt.npz")
    np.savez(path, **arrays)
    return str(path)


def encode_task_prompt(args: argparse.Namespace, cfg, vae_cfg, device) -> str:
    """``--task-dir`` (its first ``data.task_pairs`` pairs, sorted by name) and ``--query``,
    brought to ``data.task_size`` as training data is, each item encoded by the VAE (posterior
    samples seeded by ``--seed``, as LaVin-DiT's ``inference.py`` samples), saved as
    OUT.prompt.npz: ``context`` [C, (2K+1) f, h, w] and ``item_frames``."""
    import numpy as np

    from fmtrain.checkpoint.pretrained import latent_encoder
    from fmtrain.data.tasks import encode_task_pixels, prompt_pixels, task_dir_pairs
    from fmtrain.models.vae_codec import posterior_generator

    d = cfg.data
    pairs = task_dir_pairs(args.task_dir)
    if len(pairs) < d.task_pairs:
        raise ConfigError(f"--task-dir {args.task_dir} holds {len(pairs)} pairs, data.task_pairs={d.task_pairs}")
    pixels = prompt_pixels(pairs[: d.task_pairs], args.query, size=d.task_size, fit=d.task_fit, frames=d.task_frames)
    encode = latent_encoder(vae_cfg, args.vae, device)
    context, target = encode_task_pixels(
        pixels[:-1], pixels[-1], lambda items: encode(items, generator=posterior_generator(args.seed, device))
    )
    path = Path(args.out).with_suffix(".prompt.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, context=context.float().cpu().numpy(), item_frames=np.int64(target.shape[1]))
    return str(path)


def write_decoded(out: Path, latents, vae_cfg, args: argparse.Namespace, device) -> None:
    """Each sample's latents decoded by ``--vae`` to OUT (.mp4, or .png for one frame)."""
    from fmtrain.checkpoint.pretrained import latent_decoder
    from fmtrain.data.tasks import encode_png
    from fmtrain.data.video import encode_mp4, to_uint8_frames

    decode = latent_decoder(vae_cfg, args.vae, device)
    for path, z in zip(output_paths(out, args.num), latents):
        frames = to_uint8_frames(decode(z[None])[0])
        if path.suffix == ".png":
            if frames.shape[0] != 1:
                raise ConfigError(f"--out {out}: the samples decode to {frames.shape[0]} frames; write an .mp4")
            path.write_bytes(encode_png(frames[0]))
        else:
            path.write_bytes(encode_mp4(frames, fps=args.fps))
        print(f"fmtrain sample: {frames.shape[0]} frame(s) of {frames.shape[2]}x{frames.shape[1]} -> {path}")


def output_paths(out: Path, num: int) -> list[Path]:
    return [out] if num == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(num)]


def register_sample(sub) -> None:
    smp = sub.add_parser("sample", help="generate with a DiT checkpoint (Euler sampler, CFG), decoded by its VAE")
    smp.add_argument("recipe")
    smp.add_argument("overrides", nargs="*")
    smp.add_argument("--ckpt", default="", help="checkpoint or run directory (latest); empty: initial weights")
    smp.add_argument(
        "--prompt-emb",
        default="",
        help="the condition as an .npz: step_video text_emb [L, caption_dim] (+ text_mask, clip_emb, clip_mask); "
        "lavin_dit context [C, T, H, W] latents of the example pairs and the query (+ item_frames)",
    )
    smp.add_argument(
        "--prompt", default="", help="step_video: prompt text, embedded by --llm-encoder (+ --clip-encoder)"
    )
    smp.add_argument("--llm-encoder", default="", help="Hugging Face LLM directory for --prompt")
    smp.add_argument("--clip-encoder", default="", help="Hugging Face text encoder for --prompt (the CLIP slot)")
    smp.add_argument(
        "--task-dir", default="", help="lavin_dit: example pairs NAME_input.EXT / NAME_target.EXT (images or clips)"
    )
    smp.add_argument("--query", default="", help="lavin_dit: the query image or clip (with --task-dir)")
    smp.add_argument(
        "--out",
        required=True,
        help="output .npy: [num, C, T, H, W] float32 latents; with --vae an .mp4 or .png (OUT-i for --num > 1), "
        "the latents beside it as .npy",
    )
    smp.add_argument(
        "--vae", default="", help="the family's VAE (video_vae / st_vae checkpoint or release): decode, encode prompts"
    )
    smp.add_argument("--fps", type=float, default=25.0, help="frame rate of the mp4 (default 25)")
    smp.add_argument(
        "--shape",
        default="",
        help="latent T x H x W (step_video default: the first data.synthetic_latent_shapes; lavin_dit: the query's)",
    )
    smp.add_argument("--num", type=int, default=1, help="samples for the prompt")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--steps", type=int, default=None, help="Euler steps (default objective.sample_steps)")
    smp.add_argument("--shift", type=float, default=None, help="time shift (default objective.sample_shift)")
    smp.add_argument("--guidance", type=float, default=None, help="CFG scale (default objective.guidance_scale)")
    smp.set_defaults(func=cmd_sample)


__all__ = ["register_sample"]
