"""Worker for tests/test_deepspeed.py: the same steps on the megatron backend and on DeepSpeed
ZeRO stages, in one process group, from the same seed and batches.

``python -m torch.distributed.run --nproc_per_node N tests/deepspeed_worker.py OUT.json RECIPE
STEPS BACKENDS [overrides]`` where BACKENDS is a comma list of ``megatron`` / ``zero1`` /
``zero2`` / ``zero3`` / ``zero3+offload``; writes ``{backend: {"loss": [...], "grad_norm": [...],
"state_bytes": N, "build_peak_elements": N, "largest_param": N}}`` (rank 0) where state_bytes sums
the parameter, gradient and optimizer-state tensors rank 0 holds after the last step,
build_peak_elements is the most parameter elements rank 0 held whole at once while the engine
was built (:func:`whole_parameters`), and largest_param the largest parameter's element count."""

from __future__ import annotations

import contextlib
import json
import sys
import weakref
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


_DATA = {}


@contextlib.contextmanager
def whole_parameters(peak: list[int]):
    """Track in ``peak[0]`` the most parameter elements this rank holds whole at once: sampled as
    each parameter is registered on a module (construction) and as DeepSpeed gathers parameters
    (ZeRO-3 initialisation). A partitioned ZeRO-3 parameter's data is empty between gathers."""
    import deepspeed

    params = weakref.WeakValueDictionary()

    def sample():
        peak[0] = max(peak[0], sum(p.data.numel() for p in params.values()))

    def registered(module, name, param):
        if param is not None:
            params[id(param)] = param
            sample()

    gather_enter = deepspeed.zero.GatheredParameters.__enter__

    def gathered(self):
        out = gather_enter(self)
        sample()
        return out

    hook = torch.nn.modules.module.register_module_parameter_registration_hook(registered)
    deepspeed.zero.GatheredParameters.__enter__ = gathered
    try:
        yield
    finally:
        hook.remove()
        deepspeed.zero.GatheredParameters.__enter__ = gather_enter


def batches_for(family_name: str, cfg, engine, step: int, dp_rank: int) -> list[dict]:
    """This rank's microbatches of ``step`` (a pure function of the step and rank): random tokens
    for Yi, the family's own (synthetic) data pipeline otherwise."""
    if family_name != "yi":
        from fmtrain.models.registry import get_family

        if family_name not in _DATA:
            _DATA[family_name] = get_family(family_name).prepare_data(cfg, engine.topo, Path(cfg.run.dir)).train
        return _DATA[family_name].microbatches(step, dp_rank)
    if family_name == "yi":
        m, t = cfg.model, cfg.train
        g = torch.Generator().manual_seed(1000 * step + dp_rank)
        out = []
        for _ in range(engine.num_microbatches):
            tokens = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length + 1), generator=g)
            mask = (torch.rand(t.micro_batch_size, m.seq_length, generator=g) > 0.2).float()
            out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
        return out
    raise ValueError(family_name)


def main() -> None:
    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family
    from fmtrain.train.schedules import lr_at

    out, recipe, steps, backends, *overrides = sys.argv[1:]
    results = {}
    topo = None
    for backend in backends.split(","):
        extra = ["engine.backend=megatron"]
        if backend.startswith("zero"):
            stage, _, offload = backend.removeprefix("zero").partition("+")
            extra = ["engine.backend=deepspeed", f"engine.zero_stage={stage}"]
            extra += [f"engine.offload={offload}"] if offload else []
        cfg = load_config(recipe, overrides + extra)
        topo = topo or parallel.initialize(cfg)
        family = get_family(cfg.model.family)
        peak = [0]
        with whole_parameters(peak):
            engine = build_engine(cfg, topo, family)
        params = [p for chunk in engine.unwrapped_chunks() for p in chunk.parameters()]
        largest = max(getattr(p, "ds_numel", p.numel()) for p in params)
        losses, norms = [], []
        for step in range(int(steps)):
            result = engine.train_step(
                batches_for(cfg.model.family, cfg, engine, step, topo.dp_rank), lr_at(step, cfg.train), step=step
            )
            losses.append(result.loss)
            norms.append(result.grad_norm)
        results[backend] = {
            "loss": losses,
            "grad_norm": norms,
            "state_bytes": engine.model_state_bytes(),
            "build_peak_elements": peak[0],
            "largest_param": largest,
        }
        del engine
    if topo.rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))


def checkpoints_main() -> None:
    """``... deepspeed_worker.py checkpoints OUT.json DIR [overrides]``: checkpoints moving between
    backends, in one process group: {name: losses of steps 4-6}."""
    from fmtrain import checkpoint, parallel
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family
    from fmtrain.train.schedules import lr_at

    _, out, work, *overrides = sys.argv[1:]
    work = Path(work)
    backends = {
        "megatron": ["engine.backend=megatron"],
        "zero1": ["engine.backend=deepspeed", "engine.zero_stage=1"],
        "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"],
        "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"],
    }
    topo = None

    def engine_for(backend):
        nonlocal topo
        cfg = load_config(
            REPO / "recipes" / "yi" / "tiny.yaml", overrides + backends[backend] + [f"run.dir={work / backend}"]
        )
        topo = topo or parallel.initialize(cfg)
        return cfg, build_engine(cfg, topo, get_family(cfg.model.family))

    def run(cfg, engine, steps):
        return [
            engine.train_step(batches_for("yi", cfg, engine, s, topo.dp_rank), lr_at(s, cfg.train), step=s).loss
            for s in steps
        ]

    results = {}
    # Uninterrupted references.
    for backend in ("megatron", "zero3"):
        cfg, engine = engine_for(backend)
        results[f"{backend} uninterrupted"] = run(cfg, engine, range(6))[3:]
    # Three steps on one backend, saved; three more after loading on another.
    for first, second in (
        ("zero3", "zero3"),
        ("zero3", "zero1"),
        ("megatron", "zero2"),
        ("zero2", "megatron"),
        ("zero3", "megatron"),
    ):
        cfg, engine = engine_for(first)
        run(cfg, engine, range(3))
        saved = checkpoint.save(cfg, work / f"{first}-{second}", 3, engine, topo)
        cfg, engine = engine_for(second)
        checkpoint.load(saved, engine, cfg)
        if (first, second) == ("zero3", "megatron"):  # the same weights in megatron's format, to export
            checkpoint.save(cfg, work / "zero3-as-megatron", 3, engine, topo)
        results[f"{first} -> {second}"] = run(cfg, engine, range(3, 6))
    # megatron -> deepspeed -> megatron, two steps each.
    cfg, engine = engine_for("megatron")
    run(cfg, engine, range(2))
    saved = checkpoint.save(cfg, work / "m-d-m-1", 2, engine, topo)
    cfg, engine = engine_for("zero3")
    checkpoint.load(saved, engine, cfg)
    losses = run(cfg, engine, range(2, 4))
    saved = checkpoint.save(cfg, work / "m-d-m-2", 4, engine, topo)
    cfg, engine = engine_for("megatron")
    checkpoint.load(saved, engine, cfg)
    results["megatron -> zero3 -> megatron"] = (losses + run(cfg, engine, range(4, 6)))[1:]
    if topo.rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    checkpoints_main() if sys.argv[1] == "checkpoints" else main()
