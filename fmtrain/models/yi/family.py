"""The Yi family's registry entry: the GPTModel trained with next-token prediction, or with DPO
beside a frozen reference GPTModel in the same layout; its size functions, its data (text, or
preference pairs) and its Hugging Face converter."""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from fmtrain.config import Config
from fmtrain.models.attention import DocumentLayout
from fmtrain.models.registry import ModelFamily, PartSpec, RunData, with_frozen_reference
from fmtrain.models.yi import convert
from fmtrain.models.yi.model import build_chunk, init_rule, transformer_config
from fmtrain.models.yi.sizes import flops_per_sample, param_count, workload
from fmtrain.objectives import dpo
from fmtrain.objectives.lm import masked_token_loss
from fmtrain.parallel import context


def _inputs(batch: dict, device, mask_documents: bool = False):
    """(tokens, labels, loss mask, position ids) [b, s] of this rank's slice of the sequence: all
    of it, or under context parallelism its CP rank's contiguous part (labels are shifted before
    the split, so each slice predicts its own next tokens); and the documents' layout when the
    batch carries per-document positions (``data.reset_position_ids``), for the core attention
    (whole rows: it sees the whole sequence), else None."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch.get("position_ids")
    documents = None
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    else:
        position_ids = position_ids.to(device, non_blocking=True)
        documents = DocumentLayout.from_position_ids(position_ids, mask_documents)
    sliced = (
        context.split(x, dim=1, what="the microbatch's sequence") for x in (tokens, labels, loss_mask, position_ids)
    )
    return (*sliced, documents)


def lm_forward_step(cfg: Config):
    """One microbatch through this rank's chunk: per-token cross entropy on the last stage
    (``objective.name=lm``), hidden states elsewhere."""
    mask_documents = cfg.data.reset_attention_mask

    def step(data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = next(data_iterator)
        tokens, labels, loss_mask, position_ids, documents = _inputs(
            batch, next(model.parameters()).device, mask_documents
        )
        # [b, s] per-token cross entropy on the last stage, hidden states elsewhere.
        output = model(tokens, position_ids, None, labels=labels, packed_seq_params=documents)
        return output, functools.partial(masked_token_loss, loss_mask)

    return step


# ----------------------------------------------------------------------------- DPO


def dpo_forward_step(cfg: Config):
    """The policy's DPO forward step: the rows' per-token cross entropy (vocab-parallel) on the
    last stage, paired into the DPO loss with the reference log-probs the batch carries."""
    settings = cfg.objective

    def step(data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = next(data_iterator)
        tokens, labels, loss_mask, position_ids, documents = _inputs(batch, next(model.parameters()).device, True)
        output = model(tokens, position_ids, None, labels=labels, packed_seq_params=documents)
        reference = batch.get("reference_logps")
        if reference is None:  # other stages never call the loss function
            return output, dpo.missing_reference("reference_logps")
        index = batch.get("sequence_index")
        return output, functools.partial(
            dpo.dpo_loss,
            settings,
            loss_mask,
            reference.to(loss_mask.device),
            sequence_index=None if index is None else index.to(loss_mask.device),
        )

    return step


def reference_logps_step(cfg: Config):
    """The reference's forward step: per row, the completion log-prob as the loss uses it."""
    settings = cfg.objective

    def step(data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = next(data_iterator)
        tokens, labels, loss_mask, position_ids, documents = _inputs(batch, next(model.parameters()).device, True)
        output = model(tokens, position_ids, None, labels=labels, packed_seq_params=documents)
        index = batch.get("sequence_index")
        index = None if index is None else index.to(loss_mask.device)
        sequences = batch.get("sequences")
        return output, lambda per_token_loss: dpo.completion_logps(
            settings, per_token_loss, loss_mask, index, sequences
        )

    return step


REFERENCE_TABLE = "reference_logps.json"
"""RUN_DIR/data/ file of precomputed reference log-probs (``objective.precompute_reference``)."""


def _index_digest(spec: str) -> str | None:
    """The digest of a shard directory's (or index file's) index.json: rewritten shards change it."""
    from fmtrain.data.text import _file_digest

    path = Path(spec) if spec else None
    if path is None:
        return None
    return _file_digest(str(path / "index.json" if path.is_dir() else path))


def _reference_table_meta(cfg: Config, tokenizer: Path) -> dict:
    from fmtrain.data.text import _file_digest

    o = cfg.objective
    return {
        "reference": dpo.reference_source(cfg) or f"run seed {cfg.run.seed}",
        "shards": [cfg.data.shards, _index_digest(cfg.data.shards)],
        "valid_shards": [cfg.data.valid_shards, _index_digest(cfg.data.valid_shards)],
        "tokenizer": _file_digest(str(tokenizer)),
        "seq_length": cfg.model.seq_length,
        "truncation": o.truncation,
        "add_bos": o.add_bos,
        "length_averaged": o.loss == "ipo",
    }


def partial_table_path(cfg: Config, topo) -> Path:
    """Where data-parallel replica ``topo.dp_rank`` keeps the log-probs it has computed so far."""
    return Path(cfg.run.dir) / "data" / f"reference_logps.part-{topo.dp_rank:05d}-of-{topo.dp:05d}.json"


def _partial_meta(cfg: Config, topo, tokenizer: Path) -> dict:
    return {**_reference_table_meta(cfg, tokenizer), "dp_rank": topo.dp_rank, "dp": topo.dp}


def compute_reference_table(cfg: Config, engine, step) -> dict[str, list[float]]:
    """Sample key -> [reference log-prob of chosen, of rejected] for every usable pair of
    ``data.shards`` and ``data.valid_shards``: data-parallel rank r scores the pairs r, r + DP,
    ..., through the reference's pipeline; the table is then shared by every rank.

    Resumable: after every pass of 64 microbatches replica r's last stage writes what it has to
    :func:`partial_table_path`; a pass interrupted and started again (same shards, reference,
    tokenizer, settings and DP size) reads it back on every rank of the replica and scores only
    the pairs it lacks."""
    import json

    import torch.distributed as dist

    from fmtrain.data.preference import PreferencePipeline, pairs_of_shards
    from fmtrain.data.shards import write_atomic
    from fmtrain.data.text import existing_tokenizer

    topo = engine.topo
    tokenizer = existing_tokenizer(cfg, cfg.run.dir)
    pipeline = PreferencePipeline.from_config(cfg, tokenizer)
    specs = [spec for spec in (cfg.data.shards, cfg.data.valid_shards) if spec]
    pairs = [pair for spec in specs for pair in pairs_of_shards(pipeline, spec)]
    counts = collections.Counter(key for key, _ in pairs)
    if len(counts) != len(pairs):
        twice = sorted(key for key, count in counts.items() if count > 1)[:3]
        raise ValueError(
            f"objective.precompute_reference keys the log-probs by sample key, and these repeat across "
            f"data.shards / data.valid_shards: {twice}"
        )
    partial = partial_table_path(cfg, topo)
    meta = _partial_meta(cfg, topo, tokenizer)
    saved = json.loads(partial.read_text()) if partial.is_file() else {}
    table: dict[str, list[float]] = saved["logps"] if saved.get("meta") == meta else {}
    mine = [pair for pair in pairs[topo.dp_rank :: topo.dp] if pair[0] not in table]
    writes = topo.is_last_stage and topo.tp_rank == 0  # where the log-probs come out
    size = cfg.train.micro_batch_size
    per_pass = 64  # microbatches per forward-only pass
    for start in range(0, len(mine), size * per_pass):
        chunk = mine[start : start + size * per_pass]
        microbatches = []
        for i in range(0, len(chunk), size):
            items = [item for _, item in chunk[i : i + size]]
            # a full microbatch even at the end: the pipeline's tensors have one shape
            microbatches.append(pipeline.collate(items + [items[0]] * (size - len(items))))
        logps = engine.forward_outputs(
            microbatches, part="reference", forward_step=step, collect=lambda output, loss_fn: loss_fn(output).detach()
        )
        for batch, values in zip(microbatches, logps):
            n = len(batch["key"])
            for i, key in enumerate(batch["key"]):
                table[key] = [float(values[i]), float(values[n + i])]
        if writes:
            partial.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(partial, json.dumps({"meta": meta, "logps": table}))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, table if writes else {})
    return {key: value for part in gathered for key, value in part.items()}


def precomputed_reference_logps(cfg: Config):
    """``prepare_microbatches`` of a DPO policy with ``objective.precompute_reference``: on the
    first call the table of reference log-probs is read from RUN_DIR/data (or computed and
    written there, then the reference is released); every microbatch then gets its
    ``reference_logps`` from the table by sample key."""
    import json

    import torch.distributed as dist

    from fmtrain.data.shards import write_atomic
    from fmtrain.data.text import existing_tokenizer

    table: dict[str, list[float]] = {}
    step = reference_logps_step(cfg)

    def prepare(engine, microbatches: list[dict]) -> list[dict]:
        if not table:
            path = Path(cfg.run.dir) / "data" / REFERENCE_TABLE
            meta = _reference_table_meta(cfg, existing_tokenizer(cfg, cfg.run.dir))
            saved = json.loads(path.read_text()) if path.is_file() else None
            if saved is not None and saved.get("meta") == meta:
                table.update(saved["logps"])
            else:
                table.update(compute_reference_table(cfg, engine, step))
                if engine.topo.is_writer:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(path, json.dumps({"meta": meta, "logps": table}))
                dist.barrier()  # the whole table is written: the replicas' partial ones can go
                partial_table_path(cfg, engine.topo).unlink(missing_ok=True)
            if "reference" in engine.parts:
                engine.release_part("reference")
        if not engine.topo.is_last_stage:
            return microbatches
        out = []
        for batch in microbatches:
            missing = [key for key in batch["key"] if key not in table]
            if missing:
                raise KeyError(f"objective.precompute_reference: no reference log-probs for samples {missing[:3]}")
            chosen = [table[key][0] for key in batch["key"]]
            rejected = [table[key][1] for key in batch["key"]]
            out.append({**batch, "reference_logps": torch.tensor(chosen + rejected, dtype=torch.float64)})
        return out

    return prepare


def parts(cfg: Config) -> list[PartSpec]:
    model = PartSpec(
        name="model",
        build=build_chunk,
        init_rule=init_rule,
        megatron_config=transformer_config,
        forward_step=lambda cfg, parts, progress: lm_forward_step(cfg),
    )
    if cfg.objective.name != "dpo":
        return [model]
    policy, reference = with_frozen_reference(
        model,
        cfg,
        forward_step=lambda cfg, parts, progress: dpo_forward_step(cfg),
        reference_step=reference_logps_step(cfg),
        collect=lambda output, logps: logps(output),
        key="reference_logps",
    )
    if cfg.objective.precompute_reference:
        policy = replace(policy, prepare_microbatches=precomputed_reference_logps(cfg))
    return [policy, reference]


def prepare_data(cfg: Config, topo, run_dir) -> RunData:
    """Text: in-memory corpus or streamed shards (DPO: preference shards); every checkpoint
    carries the tokenizer."""
    if cfg.objective.name == "dpo":
        from fmtrain.data.preference import prepare_preference_data as prepare
    else:
        from fmtrain.data.text import prepare_text_data as prepare

    tokenizer, train, valid = prepare(cfg, topo, run_dir)
    return RunData(train=train, valid=valid, files={"tokenizer.model": tokenizer})


FAMILY = ModelFamily(
    name="yi",
    parts=parts,
    prepare_data=prepare_data,
    param_count=param_count,
    flops_per_sample=flops_per_sample,
    units_per_sample=lambda cfg: cfg.model.seq_length * cfg.objective.ROWS_PER_SAMPLE,
    throughput_unit="tokens",
    first_step_check=dpo.first_step_check,
    converter=convert,
    workload=workload,
)
