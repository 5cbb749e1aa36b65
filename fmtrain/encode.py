"""``fmtrain data encode``: shards of pixels -> the latent shards a DiT trains on.

Two kinds of input, told apart by the shards' ``index.json``:

*Video + caption shards* (``fmtrain data shard video --captions``; the Step-Video DiT), per sample:

- one clip of ``frames`` frames ``stride`` apart, resized to shorter side ``size`` and centre
  cropped, pixels in [-1, 1] (the clip's start is drawn from the sample's own seed, as the
  training stream draws it; a video shorter than the clip repeats its last frame, as there);
- its latent by the VAE;
- the caption's embeddings by text encoders given as Hugging Face directories, loaded with
  transformers (``AutoModel``): the last hidden states, truncated to ``llm_tokens`` /
  ``clip_tokens``, with masks. The LLM slot takes a decoder LLM (or an fmtrain Yi checkpoint,
  exported once to a Hugging Face directory under OUT/.encode), the CLIP slot any encoder.

*In-context task shards* (``fmtrain data shard tasks``; LaVin-DiT), per sample: every example
input and output, the query and the target (images, or clips of ``frames`` frames; 0 keeps the
stored length) brought to ``size`` x ``size`` as :class:`fmtrain.data.tasks.PixelTaskPipeline`
does for training, each encoded by the VAE on its own (as LaVin-DiT's ``inference.py`` encodes
each image), then the context latents [in_1, out_1, ..., query] concatenated along time; all the
pairs a sample holds are kept (training takes the first ``data.task_pairs``).

The VAE is any VAE family's (the Step-Video Video-VAE, LaVin-DiT's ST-VAE): an fmtrain checkpoint
or a release, its family read from the checkpoint's config or recognised from the release; the
latents are what the DiT sees (the family's normalisation applied), in causal chunks and spatial
tiles as its config says, a posterior sample (noise from the sample's seed, so a re-run writes
the same latents; the releases' encoders sample) or the posterior mean.

Every rank (``--nproc N``, or one task of torchrun / srun) encodes the input shards
``rank, rank + N, ...`` on its own, each into one output shard named after its position, written
under a temporary name and renamed when whole, then marked done in ``OUT/.encode/``; a restarted
job skips the shards marked done. A sample that cannot be decoded (or a caption that is missing
or not UTF-8) is skipped and counted, naming the shard and key. When all shards are done, rank 0
writes ``OUT/index.json`` (kind ``latent`` or ``task_latents``, the skipped samples, the encode
settings, the time spent per stage).
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
STAGES = ("read_decode", "vae", "text", "write")
"""Where a rank's time goes, reported per stage."""
VIDEO_KIND, TASK_KIND = "video", "tasks"
"""The index kinds of the two inputs (``fmtrain data shard video`` / ``shard tasks``)."""


@dataclass(frozen=True)
class EncodeSettings:
    """What decides the output; a restarted job must match the one that started."""

    shards: str
    kind: str
    """What the input shards hold: video (+ captions) or tasks."""
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


class VideoCaptionSamples:
    """A video + caption sample -> its latent shard sample (latent, caption embeddings)."""

    def __init__(self, settings: EncodeSettings, encode, llm: TextEncoder, clip: TextEncoder | None, seconds: dict):
        from fmtrain.data.video import VideoPipeline

        self.settings, self.encode, self.llm, self.clip, self.seconds = settings, encode, llm, clip, seconds
        self.pipeline = VideoPipeline(
            frames=settings.frames,
            stride=settings.stride,
            size=settings.size,
            crop="center",
            clips=1,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        )

    def __call__(self, sample: dict, ctx, key: str) -> tuple[dict, str]:
        from fmtrain.data.latents import latent_shard_sample, shape_name
        from fmtrain.data.stream import BadSample

        clock = time.perf_counter()
        if "txt" not in sample:
            raise BadSample("no caption (.txt)")
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadSample(f"unreadable caption: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not caption.strip():
            raise BadSample("empty caption")
        (clip,) = self.pipeline.units(sample, ctx)
        clock = _tick(self.seconds, "read_decode", clock)
        (latent,) = self.encode(clip["video"][None], clip["sample_seed"])
        clock = _tick(self.seconds, "vae", clock)
        record = {"latent": latent, "text_emb": self.llm(caption).astype(latent.dtype), "caption": caption}
        if self.clip is not None:
            record["clip_emb"] = self.clip(caption).astype(latent.dtype)
        _tick(self.seconds, "text", clock)
        return latent_shard_sample(record, key), shape_name(latent.shape[1:])


class TaskSamples:
    """An in-context task sample -> its latent task sample: each item encoded on its own, the
    context latents (example pairs, then the query) concatenated along time."""

    def __init__(self, settings: EncodeSettings, encode, seconds: dict):
        self.settings, self.encode, self.seconds = settings, encode, seconds

    def __call__(self, sample: dict, ctx, key: str) -> tuple[dict, str]:
        from fmtrain.data.latents import shape_name
        from fmtrain.data.stream import BadSample
        from fmtrain.data.tasks import PixelTaskPipeline, encode_task_pixels, latent_task_sample

        clock = time.perf_counter()
        try:
            pairs = int(json.loads(sample["json"])["pairs"])
        except (KeyError, ValueError, TypeError):
            raise BadSample("no readable .json with the sample's pair count") from None
        s = self.settings
        pipeline = PixelTaskPipeline(pairs=max(pairs, 1), size=s.size, frames=s.frames)
        (item,) = pipeline.units(sample, ctx)  # validates the sample (BadSample naming what is wrong)
        clock = _tick(self.seconds, "read_decode", clock)
        context, target = encode_task_pixels(
            item["context"], item["target"], lambda items: self.encode(items, item["sample_seed"])
        )
        _tick(self.seconds, "vae", clock)
        raw = latent_task_sample(
            key, context=context, target=target, task=item["task"], pairs=pairs, item_frames=target.shape[1]
        )
        return raw, shape_name(context.shape)


def _tick(seconds: dict, stage: str, since: float) -> float:
    now = time.perf_counter()
    seconds[stage] += now - since
    return now


class ShardEncoder:
    """One rank's models; ``encode_shard`` turns one input shard into one output shard."""

    def __init__(self, settings: EncodeSettings, vae_encode, text_encoders: tuple | None, device):
        self.settings, self.device = settings, device
        self.dtype = np.float16 if settings.dtype == "float16" else np.float32
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.vae_encode = vae_encode
        if settings.kind == TASK_KIND:
            self.samples = TaskSamples(settings, self._latents, self.seconds)
        else:
            self.samples = VideoCaptionSamples(settings, self._latents, *text_encoders, self.seconds)

    def _latents(self, pixels: torch.Tensor, seed: int) -> np.ndarray:
        """[B, 3, T, H, W] pixels -> [B, C, T', H', W'] latents as stored."""
        from fmtrain.models.vae_codec import posterior_generator

        generator = posterior_generator(seed, self.device) if self.settings.posterior == "sample" else None
        z = self.vae_encode(pixels, generator=generator)
        return z.float().cpu().numpy().astype(self.dtype)

    def encode_shard(self, shard: Shard, position: int, out: Path, bar) -> dict:
        """Write OUT/latent-POSITION.tar from ``shard`` (atomically) and mark it done; returns the
        shard's record (samples, skipped samples with reasons, latent shapes, seconds)."""
        import webdataset as wds

        from fmtrain.data.stream import BadSample, SampleContext

        s = self.settings
        name = f"{_shard_name(position)}.tar"
        tmp = out / f".{name}.partial.{os.getpid()}"
        skipped, shapes, written = [], {}, 0
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=0.0)
            for index, sample in read_shard(shard, warn=lambda m: skipped.append({"key": None, "reason": m})):
                bar.update(1)
                if sample is None:
                    continue  # the warning above names the shard and where it broke
                key = sample.get("__key__", f"position-{index}")
                ctx = SampleContext(seed=s.seed, epoch=0, stream=0, index=index, shard=shard.url, key=key)
                try:
                    raw, shape = self.samples(sample, ctx, key)
                except BadSample as exc:
                    skipped.append({"key": key, "reason": str(exc)})
                    continue
                clock = time.perf_counter()
                writer.write(raw)
                shapes[shape] = shapes.get(shape, 0) + 1
                written += 1
                _tick(self.seconds, "write", clock)
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
    if settings.kind == TASK_KIND:
        from fmtrain.data.tasks import LATENT_TASK_KIND

        kind, fields = LATENT_TASK_KIND, ["context.npy", "json", "target.npy", "task.txt"]
    else:
        kind = "latent"
        fields = ["json", "latent.npy", "text_emb.npy", "txt"] + (["clip_emb.npy"] if settings.clip_encoder else [])
    index = {
        "format": INDEX_FORMAT,
        "kind": kind,
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
    from fmtrain.checkpoint.pretrained import latent_encoder, pretrained_config, vae_family_of

    out = Path(out)
    shards = resolve_shards(settings.shards)
    vae_cfg = pretrained_config(settings.vae, vae_family_of(settings.vae))
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
        if settings.kind == VIDEO_KIND:  # every rank: it may hold a barrier
            llm_dir = llm_encoder_dir(Path(settings.llm_encoder), out, topo.rank)
        if mine:
            text = None
            if settings.kind == VIDEO_KIND:
                llm = TextEncoder(llm_dir, settings.llm_tokens, topo.device, "--llm-encoder")
                clip = None
                if settings.clip_encoder:
                    clip = TextEncoder(settings.clip_encoder, settings.clip_tokens, topo.device, "--clip-encoder")
                text = (llm, clip)
            worker = ShardEncoder(settings, latent_encoder(vae_cfg, settings.vae, topo.device), text, topo.device)
        started = time.perf_counter()
        total = sum(shards[p].samples for p in mine)
        bar = progress_bar(
            f"rank {topo.rank}: encoding {len(mine)} shards",
            total=total,
            unit="videos" if settings.kind == VIDEO_KIND else "tasks",
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
        rate = f", {encoded / elapsed:.2f} samples/s" if encoded and elapsed > 0 else ""
        split = " ".join(f"{k} {v:.1f}s" for k, v in seconds.items())
        print(
            f"fmtrain data encode: rank {topo.rank}: {encoded} samples from {len(mine)} shards in {elapsed:.1f}s{rate} "
            f"({split}); {skipped} skipped; {done_before} shards already done",
            flush=True,
        )
        dist.barrier()
        return write_index(out, len(shards), settings, seconds) if topo.is_writer else None
    finally:
        parallel.destroy()


__all__ = [
    "EncodeSettings",
    "ShardEncoder",
    "TaskSamples",
    "TextEncoder",
    "VideoCaptionSamples",
    "encode_shards",
    "write_index",
]
