"""Metrics logging read back from disk, and throughput/MFU arithmetic checked by hand."""

import json
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmtrain.config import LoggingConfig
from fmtrain.train.metrics import (
    KNOWN_PEAK_TFLOPS,
    MetricsLogger,
    StepTimer,
    device_peak_tflops,
    format_duration,
    known_gpu_peak,
    throughput_metrics,
)

STEPS = [
    {"loss": 5.5, "lr": 1e-4, "grad_norm": 2.0, "tokens_per_s": 1000.0, "tflops": 0.1, "mfu": 0.25},
    {"loss": 5.0, "lr": 2e-4, "grad_norm": 1.5, "tokens_per_s": 1100.0, "tflops": 0.11, "mfu": 0.275},
    {"loss": 4.5, "lr": 3e-4, "grad_norm": 1.0, "tokens_per_s": 1200.0, "tflops": 0.12, "mfu": 0.3, "val_loss": 4.75},
]


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, is_writer=True, tensorboard=True, total_steps=3) as logger:
        for i, m in enumerate(STEPS, start=1):
            logger.log(i, m)
            # Flushed each call: the line is on disk before close().
            assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == i
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": i, **m} for i, m in enumerate(STEPS, start=1)]

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/tflops",
        "perf/mfu",
        "val/loss",
    } <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == [5.5, 5.0, 4.5]  # exactly representable in float32
    assert [e.value for e in acc.Scalars("perf/tokens_per_s")] == [1000.0, 1100.0, 1200.0]
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(3, 4.75)]
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-4, 2e-4, 3e-4])


def test_resumed_logger_appends(tmp_path):
    with MetricsLogger(tmp_path, True, False, total_steps=4) as logger:
        logger.log(1, {"loss": 3.0})
        logger.log(2, {"loss": 2.0})
    with MetricsLogger(tmp_path, True, False, total_steps=4, start_step=2) as logger:
        logger.log(3, {"loss": 1.0, "nan_loss": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert json.loads(lines[2])["loss"] == 1.0
    assert not (tmp_path / "tb").exists()


def test_non_writer_writes_nothing(tmp_path):
    run = tmp_path / "run"
    logger = MetricsLogger(run, is_writer=False, tensorboard=True, total_steps=3)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not run.exists()


def test_progress_line_format_and_eta(tmp_path):
    logger = MetricsLogger(tmp_path, False, False, total_steps=100)
    m = {"loss": 5.43214, "lr": 3e-4, "grad_norm": 1.2344, "tokens_per_s": 12345.4, "tflops": 0.1512, "mfu": 0.1234}
    # 12 steps in 10 s -> 88 remaining steps take 88 * 10/12 = 73.3 s = 1m13s.
    assert logger.progress_line(12, m, elapsed_s=10.0) == (
        "step 12/100 | loss 5.4321 | lr 3.00e-04 | grad 1.234 | 12,345 tok/s | 0.15 TFLOP/s | MFU 12.3% | ETA 1m13s"
    )
    # Resumed at step 50: 10 steps in 20 s -> 40 remaining take 80 s.
    resumed = MetricsLogger(tmp_path, False, False, total_steps=100, start_step=50)
    assert resumed.progress_line(60, {"loss": 1.0}, elapsed_s=20.0) == "step 60/100 | loss 1.0000 | ETA 1m20s"
    assert format_duration(45) == "45s"
    assert format_duration(7500) == "2h05m"


def test_throughput_and_mfu_by_hand():
    # 8 seqs x 1024 tokens in 2 s on 4 devices; 6e9 FLOPs/token.
    m = throughput_metrics(8 * 1024, 2.0, 6e9, 4, peak_tflops=989.4)
    assert m["tokens_per_s"] == 4096
    assert m["tflops"] == pytest.approx(6e9 * 4096 / 4 / 1e12)  # 6.144 TFLOP/s per device
    assert m["mfu"] == pytest.approx(6.144 / 989.4)


def test_step_timer_with_fake_clock():
    ticks = iter([10.0, 10.5])
    timer = StepTimer(flops_per_unit=1e9, num_devices=2, peak_tflops=1.0, clock=lambda: next(ticks))
    timer.start()
    m = timer.stop(units=1000)
    assert m["step_time_s"] == 0.5
    assert m["tokens_per_s"] == 2000
    assert m["tflops"] == pytest.approx(1e9 * 2000 / 2 / 1e12)
    assert m["mfu"] == pytest.approx(1.0)
    with pytest.raises(RuntimeError):
        timer.stop(units=1)


def test_known_gpu_names():
    assert KNOWN_PEAK_TFLOPS["H100 SXM"] == 989.4
    assert known_gpu_peak("NVIDIA H100 80GB HBM3") == (989.4, "H100 SXM")
    assert known_gpu_peak("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert known_gpu_peak("NVIDIA H200") == (989.4, "H200")
    assert known_gpu_peak("NVIDIA A100-SXM4-80GB") == (312.0, "A100")
    assert known_gpu_peak("NVIDIA H100 NVL") is None
    assert known_gpu_peak("NVIDIA GeForce RTX 4090") is None


def test_peak_from_config():
    assert device_peak_tflops(LoggingConfig(peak_tflops=123.0), torch.device("cpu")) == (123.0, "config")


def test_measured_cpu_peak_agrees_with_a_plain_timing():
    peak, source = device_peak_tflops(LoggingConfig(), torch.device("cpu"))
    assert source.startswith("measured CPU GEMM")
    # Independent timing of the same GEMM: 2 * 2048^3 FLOPs. The best-of-5 measurement
    # should match a single run; the wide band absorbs other processes sharing the CPU
    # while still catching unit errors (GFLOP vs TFLOP is 1000x).
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    t0 = time.perf_counter()
    torch.mm(a, b)
    single = 2 * 2048**3 / (time.perf_counter() - t0) / 1e12
    assert 0.2 * single < peak < 10 * single
    assert 1e-3 < peak < 100  # between 1 GFLOP/s and 100 TFLOP/s for any CPU
