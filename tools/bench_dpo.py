#!/usr/bin/env python
"""DPO step time against an SFT step over the same tokens, side by side in one process.

Both engines are the Yi family at TP = PP = DP = 1 with the same shapes and the same rows: n
preference pairs are 2n sequences of ``--seq`` tokens whose second half is the completion. The
SFT step trains next-token prediction on those 2n sequences (loss on the completion tokens);
the DPO step trains the policy on them as n pairs with the co-located frozen reference (one
extra forward-only pass). Steps alternate ABBA after warm-up; the medians give the ratio
(issue goal: DPO <= 1.35x SFT with the co-located reference; the floor is 4/3, a forward is a
third of forward + backward).

    .venv/bin/python tools/bench_dpo.py --seq 256 --pairs 8 --steps 12
    .venv/bin/python tools/bench_dpo.py --seq 256 --pairs 8 --steps 12 --precompute   # goal <= 1.05x

``--trl`` (needs ``pip install trl``, not a dependency of fmtrain) instead compares fmtrain's DPO
step with TRL's ``DPOTrainer`` on the same tiny Llama (transformers' ``LlamaForCausalLM`` of the
shapes above; fmtrain imports its weights), the same tokenizer, pairs and batch, fp32 on CPU,
each side with its reference model co-located. The pairs are chunks of the built-in corpus
(prompt, chosen and rejected of ``--seq`` / 2 tokens each) so both sides see the same token
counts; fmtrain pads every row to ``model.seq_length`` = the longest pair, TRL to the batch's
longest. Reports pairs/s per side (steps timed by a callback on TRL's side) and the ratio.

    PYTHONPATH=/path/to/trl .venv/bin/python tools/bench_dpo.py --trl --seq 256 --pairs 8 --steps 8
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

warnings.simplefilter("ignore")


def config(args, objective: str, rows_per_microbatch: int):
    from fmtrain.config import load_config

    samples = rows_per_microbatch if objective == "lm" else rows_per_microbatch // 2
    return load_config(
        None,
        [
            f"objective.name={objective}",
            f"model.num_layers={args.layers}",
            f"model.hidden_size={args.hidden}",
            f"model.num_attention_heads={args.heads}",
            f"model.num_query_groups={args.kv_heads}",
            f"model.ffn_hidden_size={args.ffn}",
            f"model.vocab_size={args.vocab}",
            f"model.seq_length={args.seq}",
            f"train.global_batch_size={samples}",
            f"train.micro_batch_size={samples}",
            "train.precision=fp32",
            "model.attention_backend=sdpa",
            "logging.tensorboard=false",
            "run.dir=" + tempfile.mkdtemp(prefix="bench_dpo_"),
        ],
    )


def rows(args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab, (2 * args.pairs, args.seq + 1), generator=g)
    loss_mask = torch.zeros(2 * args.pairs, args.seq)
    loss_mask[:, args.seq // 2 :] = 1.0  # the completion: the second half of every sequence
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": loss_mask}


def corpus_records(args, tokenizer_path: Path) -> list[dict]:
    """Pairs whose prompt, chosen and rejected are --seq / 4 pieces of built-in corpus text each."""
    from fmtrain.data.text import load_tokenizer, read_documents

    sp = load_tokenizer(tokenizer_path)
    ids = [i for doc in read_documents("builtin:shakespeare")[:200] for i in sp.encode(doc)]
    n = args.seq // 4
    records = []
    for k in range(args.pairs * (args.steps + args.warmup + 1)):
        chunk = ids[k * 3 * n : (k + 1) * 3 * n]
        prompt, chosen, rejected = (sp.decode(chunk[i * n : (i + 1) * n]) for i in range(3))
        records.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return records


def _records_in_order(records):
    yield from records


def compare_with_trl(args) -> None:
    import transformers
    from datasets import IterableDataset
    from trl import DPOConfig, DPOTrainer

    from fmtrain import checkpoint, parallel
    from fmtrain.data.hf_tokenizer import write_hf_tokenizer
    from fmtrain.data.preference import PreferencePipeline, pair_batch
    from fmtrain.data.text import read_documents, train_tokenizer
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    work = Path(tempfile.mkdtemp(prefix="bench_dpo_trl_"))
    tokenizer_path = train_tokenizer(read_documents("builtin:shakespeare"), args.vocab, work / "tokenizer")
    records = corpus_records(args, tokenizer_path)
    torch.manual_seed(0)
    llama_config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        rope_theta=5e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=4 * args.seq,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hf_dir = work / "llama"
    transformers.LlamaForCausalLM(llama_config).float().save_pretrained(hf_dir, safe_serialization=True)
    write_hf_tokenizer(tokenizer_path, hf_dir, model_max_length=4 * args.seq, log=lambda message: None)

    # fmtrain: the policy and its reference both from hf_dir (the reference is the starting point).
    pipeline = PreferencePipeline(tokenizer_path, 4 * args.seq)
    longest = max(
        len(seq) for r in records for seq in pipeline.encode_pair(r["prompt"], r["chosen"], r["rejected"])[::2]
    )
    cfg = config(args, "dpo", 2 * args.pairs)
    from fmtrain.config import load_config
    from fmtrain.models.release import overrides_as_args
    from fmtrain.models.yi.convert import fmtrain_model_overrides_from_hf

    overrides = overrides_as_args(fmtrain_model_overrides_from_hf(json.loads((hf_dir / "config.json").read_text())))
    cfg = load_config(
        None,
        ["objective.name=dpo", *overrides]
        + [
            f"model.seq_length={longest - 1}",
            f"model.init_from_hf={hf_dir}",
            f"data.tokenizer={tokenizer_path}",
            f"train.global_batch_size={args.pairs}",
            f"train.micro_batch_size={args.pairs}",
            "train.precision=fp32",
            "model.attention_backend=sdpa",
            f"run.dir={work / 'run'}",
        ],
    )
    pipeline = PreferencePipeline(tokenizer_path, cfg.model.seq_length)
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family("yi"))
    from fmtrain.checkpoint.hf.convert import load_hf_weights

    load_hf_weights(engine.unwrapped_chunks(), hf_dir, cfg)
    engine.weights_changed()
    checkpoint.load_frozen_parts(cfg, engine, log=lambda message: None)
    fmtrain_times = []
    for step in range(args.warmup + args.steps):
        batch = pair_batch(pipeline, records[step * args.pairs : (step + 1) * args.pairs])
        start = time.perf_counter()
        result = engine.train_step([batch], 1e-6, step=step)
        if step >= args.warmup:
            fmtrain_times.append(time.perf_counter() - start)
        if step == 0:
            fmtrain_first = result.loss
    parallel.destroy()

    # TRL on the same model, tokenizer and pairs, in order (no shuffling), one batch per step.
    trl_times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, state_args, state, control, **k):
            if state.global_step > args.warmup:
                trl_times.append(time.perf_counter() - self.start)

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    trainer = DPOTrainer(
        model=transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32),
        args=DPOConfig(
            output_dir=str(work / "trl"),
            per_device_train_batch_size=args.pairs,
            max_steps=args.warmup + args.steps,
            learning_rate=1e-6,
            beta=0.1,
            max_length=None,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            dataloader_num_workers=0,
            seed=0,
        ),
        # An iterable dataset: read in order, and datasets' fingerprinting (which cannot pickle
        # every pyarrow type) is skipped.
        train_dataset=IterableDataset.from_generator(
            _records_in_order, gen_kwargs={"records": records[: args.pairs * (args.warmup + args.steps)]}
        ),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    trl_first = next(log["loss"] for log in trainer.state.log_history if "loss" in log)
    ours, theirs = statistics.median(fmtrain_times), statistics.median(trl_times)
    print(
        json.dumps(
            {
                "shape": f"{args.layers}x{args.hidden}, vocab {args.vocab}, {args.pairs} pairs, "
                f"longest {longest} tokens",
                "threads": torch.get_num_threads(),
                "fmtrain_step_s": round(ours, 4),
                "trl_step_s": round(theirs, 4),
                "fmtrain_pairs_per_s": round(args.pairs / ours, 2),
                "trl_pairs_per_s": round(args.pairs / theirs, 2),
                "fmtrain_over_trl_speed": round(theirs / ours, 3),
                "first_loss": {"fmtrain": round(fmtrain_first, 6), "trl": round(trl_first, 6)},
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step (2x as many sequences)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trl", action="store_true", help="compare with TRL's DPOTrainer instead of an SFT step")
    ap.add_argument("--precompute", action="store_true", help="DPO with precomputed reference log-probs")
    args = ap.parse_args()
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    from fmtrain.launch.local import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if args.trl:
        compare_with_trl(args)
        return
    from fmtrain import parallel
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    family = get_family("yi")
    cfg_sft, cfg_dpo = config(args, "lm", 2 * args.pairs), config(args, "dpo", 2 * args.pairs)
    batch = rows(args)
    if args.precompute:
        # The table a precompute pass would have written, for these rows' keys: the run reads it
        # on its first step and releases the reference.
        from fmtrain.config import apply_overrides
        from fmtrain.data.text import existing_tokenizer
        from fmtrain.models.yi.family import REFERENCE_TABLE, _reference_table_meta

        apply_overrides(cfg_dpo, ["objective.precompute_reference=true"])
        batch["key"] = [f"pair-{i}" for i in range(args.pairs)]
        table = Path(cfg_dpo.run.dir) / "data" / REFERENCE_TABLE
        table.parent.mkdir(parents=True)
        meta = _reference_table_meta(cfg_dpo, existing_tokenizer(cfg_dpo, cfg_dpo.run.dir))
        table.write_text(json.dumps({"meta": meta, "logps": {key: [-300.0, -300.0] for key in batch["key"]}}))
    topo = parallel.initialize(cfg_sft)
    engines = {"sft": build_engine(cfg_sft, topo, family), "dpo": build_engine(cfg_dpo, topo, family)}
    times: dict[str, list[float]] = {"sft": [], "dpo": []}
    order = ["sft", "dpo", "dpo", "sft"]
    for i in range(args.warmup * 2 + args.steps * 2):
        name = order[i % 4]
        start = time.perf_counter()
        engines[name].train_step([dict(batch)], 1e-5, step=i)
        if i >= args.warmup * 2:
            times[name].append(time.perf_counter() - start)
    sft, dpo = statistics.median(times["sft"]), statistics.median(times["dpo"])
    tokens = 2 * args.pairs * args.seq
    print(
        json.dumps(
            {
                "shape": f"{args.layers}x{args.hidden}, vocab {args.vocab}, {args.pairs} pairs x 2 x {args.seq} tokens",
                "threads": torch.get_num_threads(),
                "sft_step_s": round(sft, 4),
                "dpo_step_s": round(dpo, 4),
                "sft_tokens_per_s": round(tokens / sft),
                "dpo_tokens_per_s": round(tokens / dpo),
                "dpo_over_sft": round(dpo / sft, 3),
                "reference": "precomputed" if args.precompute else "co-located",
            }
        )
    )
    parallel.destroy()


if __name__ == "__main__":
    main()
