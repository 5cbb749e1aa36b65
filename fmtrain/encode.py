"""``fmtrain data encode``: video + caption shards -> the latent shards a DiT trains on.

Per video sample of the input shards (``fmtrain data shard video --captions``):

- one clip of ``frames`` frames ``stride`` apart, resized to shorter side ``size`` and centre
  cropped, pixels in [-1, 1] (the clip's start is drawn from the sample's own seed, as the
  training stream draws it; a video shorter than the clip repeats its last frame, as there);
- its latent by the Video-VAE (an fmtrain ``video_vae`` checkpoint or the released
  ``vae/vae_v2.safetensors``), in causal chunks of the VAE's ``chunk_frames`` with its spatial
  tiling: a posterior sample, as the release's ``AutoencoderKL.encode`` returns (noise from the
  sample's seed, so a re-run writes the same latents), or the posterior mean;
- the caption's embeddings by text encoders given as Hugging Face directories, loaded with
  transformers (``AutoModel``): the last hidden states, truncated to ``llm_tokens`` /
  ``clip_tokens``, with masks. The LLM slot takes a decoder LLM (or an fmtrain Yi checkpoint,
  exported once to a Hugging Face directory under OUT/.encode), the CLIP slot any encoder.

Every rank (``--nproc N``, or one task of torchrun / srun) encodes the input shards
``rank, rank + N, ...`` on its own, each into one output shard named after its position, written
under a temporary name and renamed when whole, then marked done in ``OUT/.encode/``; a restarted
job skips the shards marked done. A video that cannot be decoded or a caption that is missing or
not UTF-8 is skipped and counted, naming the shard and key. When all shards are done, rank 0
writes ``OUT/index.json`` (kind ``latent``, the skipped samples, the encode settings, the time
spent per stage).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fmtrain.data.shards import INDEX_NAME, BadDataError, Shard, progress_bar, read_shard, resolve_shards, write_atomic

STATE_DIR = ".encode"
SETTINGS_FILE = "encode.json"
_SALT_POSTERIOR = 0x5A7E
STAGES = ("read_decode", "vae", "text", "write")
"""Where a rank's time goes, reported per stage."""


@dataclass(frozen=True)
class EncodeSettings:
    """What decides the output; a restarted job must match the one that started."""

    shards: str
    vae: str
    llm_encoder: str
    clip_encoder: str
    frames: int
    stride: int
    size: int
    llm_tokens: int
    clip_tokens: int
    posterior: str
    dtype: str
    seed: int


class TextEncoder:
    """A Hugging Face text model (``AutoTokenizer`` + ``AutoModel``, local files only): a caption's
    last hidden states [n, hidden] for its first ``tokens`` tokens."""

    def __init__(self, path: str | Path, tokens: int, device: torch.device, what: str):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{what} {path}: not a Hugging Face model directory (no config.json)")
        self.what, self.tokens, self.device = what, tokens, device
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()

    @torch.no_grad()
    def __call__(self, caption: str) -> np.ndarray:
        ids = self.tokenizer(caption, truncation=True, max_length=self.tokens, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            raise ValueError(f"the {self.what} tokenizer gives no token for caption {caption!r}")
        hidden = self.model(input_ids=ids.to(self.device)).last_hidden_state[0]
        return hidden.float().cpu().numpy()


def llm_encoder_dir(source: Path, out: Path, rank: int) -> Path:
    """A Hugging Face directory for the LLM slot: ``source`` itself, or an fmtrain Yi checkpoint
    exported once (by rank 0) into OUT/.encode/llm-hf (tokenizer included)."""
    import torch.distributed as dist

    from fmtrain.checkpoint.pretrained import is_fmtrain_checkpoint

    if not is_fmtrain_checkpoint(source):
        return source
    target = out / STATE_DIR / "llm-hf"
    if rank == 0 and not (target / "config.json").is_file():
        from fmtrain.checkpoint.hf.convert import export_to_hf

        export_to_hf(source, target, overwrite=True, log=lambda m: None)
    if dist.is_initialized():
        dist.barrier()
    if not (target / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"--llm-encoder {source}: the checkpoint carries no tokenizer.model, so its captions cannot be tokenized"
        )
    return target


def check_settings(out: Path, settings: EncodeSettings) -> None:
    """Refuse to continue a job in OUT started with other settings (naming them)."""
    path = out / STATE_DIR / SETTINGS_FILE
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    differ = {k: (before.get(k), v) for k, v in asdict(settings).items() if before.get(k) != v}
    if differ:
        text = ", ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in differ.items())
        raise BadDataError(
            f"{out} holds an encode job started with other settings ({text}); use a new --out or remove {out}"
        )


def _shard_name(position: int) -> str:
    """The output shard of the input shard at ``position`` (without extension)."""
    return f"latent-{position:06d}"


def _done_file(out: Path, position: int) -> Path:
    return out / STATE_DIR / f"{_shard_name(position)}.json"


class ShardEncoder:
    """One rank's models; ``encode_shard`` turns one input shard into one output shard."""

    def __init__(self, settings: EncodeSettings, vae, vae_cfg, llm: TextEncoder, clip: TextEncoder | None, device):
        from fmtrain.data.video import VideoPipeline
        from fmtrain.models.video_vae import codec

        self.settings, self.vae, self.llm, self.clip, self.device = settings, vae, llm, clip, device
        self.codec_options = codec.options(vae_cfg.model)
        self.pipeline = VideoPipeline(
            frames=settings.frames,
            stride=settings.stride,
            size=settings.size,
            crop="center",
            clips=1,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        )
        self.dtype = np.float16 if settings.dtype == "float16" else np.float32
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def _latent(self, clip: torch.Tensor, seed: int) -> np.ndarray:
        from fmtrain.models.video_vae import codec

        x = clip[None].to(self.device, next(self.vae.parameters()).dtype)
        generator = None
        if self.settings.posterior == "sample":
            generator = torch.Generator(device=self.device).manual_seed((seed ^ _SALT_POSTERIOR) % 2**63)
        z = codec.encode(self.vae, x, generator=generator, **self.codec_options)
        return z[0].float().cpu().numpy().astype(self.dtype)

    def encode_shard(self, shard: Shard, position: int, out: Path, bar) -> dict:
        """Write OUT/latent-POSITION.tar from ``shard`` (atomically) and mark it done; returns the
        shard's record (samples, skipped samples with reasons, latent shapes, seconds)."""
        import webdataset as wds

        from fmtrain.data.latents import latent_shard_sample, shape_name
        from fmtrain.data.stream import BadSample, SampleContext

        s = self.settings
        name = f"{_shard_name(position)}.tar"
        tmp = out / f".{name}.partial.{os.getpid()}"
        skipped, shapes, written = [], {}, 0
        clock = time.perf_counter()
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=0.0)
            for index, sample in read_shard(shard, warn=lambda m: skipped.append({"key": None, "reason": m})):
                bar.update(1)
                if sample is None:
                    continue  # the warning above names the shard and where it broke
                key = sample.get("__key__", f"position-{index}")
                ctx = SampleContext(seed=s.seed, epoch=0, stream=0, index=index, shard=shard.url, key=key)
                try:
                    if "txt" not in sample:
                        raise BadSample("no caption (.txt)")
                    try:
                        caption = sample["txt"].decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise BadSample(f"unreadable caption: not UTF-8 ({exc.reason} at byte {exc.start})") from None
                    if not caption.strip():
                        raise BadSample("empty caption")
                    (clip,) = self.pipeline.units(sample, ctx)
                except BadSample as exc:
                    self.seconds["read_decode"] += time.perf_counter() - clock
                    skipped.append({"key": key, "reason": str(exc)})
                    clock = time.perf_counter()
                    continue
                now = time.perf_counter()
                self.seconds["read_decode"] += now - clock
                latent = self._latent(clip["video"], clip["sample_seed"])
                clock, now = now, time.perf_counter()
                self.seconds["vae"] += now - clock
                record = {"latent": latent, "text_emb": self.llm(caption).astype(self.dtype), "caption": caption}
                if self.clip is not None:
                    record["clip_emb"] = self.clip(caption).astype(self.dtype)
                clock, now = now, time.perf_counter()
                self.seconds["text"] += now - clock
                writer.write(latent_shard_sample(record, key))
                shapes[shape_name(latent.shape[1:])] = shapes.get(shape_name(latent.shape[1:]), 0) + 1
                written += 1
                clock = time.perf_counter()
                self.seconds["write"] += clock - now
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
        for item in skipped:
            where = f"key {item['key']}" if item["key"] else "shard"
            print(f"fmtrain data encode: skipped {shard.url} {where}: {item['reason']}", flush=True)
        if written:
            os.replace(tmp, out / name)
        else:
            tmp.unlink()
        record = {"source": shard.url, "url": name if written else None, "samples": written}
        record |= {"skipped": [dict(item, shard=shard.url) for item in skipped], "shapes": shapes}
        write_atomic(_done_file(out, position), json.dumps(record) + "\n")
        return record


def write_index(out: Path, positions: int, settings: EncodeSettings, seconds: dict[str, float]) -> dict:
    """OUT/index.json from the done records of all ``positions`` shards."""
    from fmtrain.data.shards import INDEX_FORMAT

    missing = [p for p in range(positions) if not _done_file(out, p).is_file()]
    if missing:
        raise BadDataError(f"{len(missing)} input shards (positions {missing[:8]}) are not encoded: a rank failed?")
    records = [json.loads(_done_file(out, p).read_text()) for p in range(positions)]
    shards = [
        {"url": r["url"], "samples": r["samples"], "bytes": (out / r["url"]).stat().st_size}
        for r in records
        if r["url"]
    ]
    if not shards:
        raise BadDataError(f"no sample of {settings.shards} could be encoded (see the skipped samples above)")
    shapes: dict[str, int] = {}
    for r in records:
        for shape, count in r["shapes"].items():
            shapes[shape] = shapes.get(shape, 0) + count
    fields = ["json", "latent.npy", "text_emb.npy", "txt"] + (["clip_emb.npy"] if settings.clip_encoder else [])
    index = {
        "format": INDEX_FORMAT,
        "kind": "latent",
        "fields": sorted(fields),
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "shapes": shapes,
        "skipped": [item for r in records for item in r["skipped"]],
        "encode": asdict(settings),
        "seconds_rank0": {k: round(v, 3) for k, v in seconds.items()},
    }
    write_atomic(out / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    return index


def encode_shards(settings: EncodeSettings, out: str | Path, *, progress: bool = True) -> dict | None:
    """Run this rank's share of the job (all ranks call it); rank 0 returns the index."""
    import torch.distributed as dist

    from fmtrain import parallel
    from fmtrain.checkpoint.pretrained import load_pretrained, pretrained_config

    out = Path(out)
    shards = resolve_shards(settings.shards)
    vae_cfg = pretrained_config(settings.vae, "video_vae")
    topo = parallel.initialize(vae_cfg)
    try:
        if topo.is_writer:
            check_settings(out, settings)
            (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
            write_atomic(out / STATE_DIR / SETTINGS_FILE, json.dumps(asdict(settings), indent=1) + "\n")
        dist.barrier()
        check_settings(out, settings)
        mine = [p for p in range(topo.rank, len(shards), topo.world_size) if not _done_file(out, p).is_file()]
        done_before = len(range(topo.rank, len(shards), topo.world_size)) - len(mine)
        llm_dir = llm_encoder_dir(Path(settings.llm_encoder), out, topo.rank)  # every rank: it may hold a barrier
        if mine:
            vae = load_pretrained(vae_cfg, settings.vae, topo.device)
            llm = TextEncoder(llm_dir, settings.llm_tokens, topo.device, "--llm-encoder")
            clip = None
            if settings.clip_encoder:
                clip = TextEncoder(settings.clip_encoder, settings.clip_tokens, topo.device, "--clip-encoder")
            worker = ShardEncoder(settings, vae, vae_cfg, llm, clip, topo.device)
        started = time.perf_counter()
        total = sum(shards[p].samples for p in mine)
        bar = progress_bar(
            f"rank {topo.rank}: encoding {len(mine)} shards",
            total=total,
            unit="videos",
            enabled=progress and topo.is_writer,
        )
        encoded = skipped = 0
        for p in mine:
            record = worker.encode_shard(shards[p], p, out, bar)
            encoded += record["samples"]
            skipped += len(record["skipped"])
        bar.close()
        seconds = worker.seconds if mine else dict.fromkeys(STAGES, 0.0)
        elapsed = time.perf_counter() - started
        rate = f", {encoded / elapsed:.2f} clips/s" if encoded and elapsed > 0 else ""
        split = " ".join(f"{k} {v:.1f}s" for k, v in seconds.items())
        print(
            f"fmtrain data encode: rank {topo.rank}: {encoded} clips from {len(mine)} shards in {elapsed:.1f}s{rate} "
            f"({split}); {skipped} skipped; {done_before} shards already done",
            flush=True,
        )
        dist.barrier()
        return write_index(out, len(shards), settings, seconds) if topo.is_writer else None
    finally:
        parallel.destroy()


__all__ = ["EncodeSettings", "ShardEncoder", "TextEncoder", "encode_shards", "write_index"]
