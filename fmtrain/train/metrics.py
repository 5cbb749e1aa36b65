"""Throughput/MFU accounting and run logging (metrics.jsonl, TensorBoard, progress lines).

metrics.jsonl is the record of truth: one JSON object per logged step, flushed on every
call, so a killed run keeps everything it logged and a resumed run appends to it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from fmtrain.config import LoggingConfig

# bf16 dense (no sparsity) peak TFLOP/s per device, from NVIDIA's data sheets.
KNOWN_PEAK_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.4,
    "H100 PCIe": 756.0,
    "H200": 989.4,
    "A100": 312.0,
}


def known_gpu_peak(name: str) -> tuple[float, str] | None:
    """(peak, KNOWN_PEAK_TFLOPS key) for a CUDA device name, or None when not known.

    torch reports e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H200",
    "NVIDIA A100-SXM4-80GB". NVL parts run at lower clocks than the SXM peak, so they are
    left to measurement rather than guessed.
    """
    upper = name.upper()
    if "NVL" in upper:
        return None
    if "H100" in upper:
        key = "H100 PCIe" if "PCIE" in upper else "H100 SXM"
    elif "H200" in upper:
        key = "H200"
    elif "A100" in upper:
        key = "A100"
    else:
        return None
    return KNOWN_PEAK_TFLOPS[key], key


def measure_gemm_tflops(
    device: torch.device, n: int, dtype: torch.dtype, repeats: int = 5, calls_per_repeat: int = 1
) -> float:
    """Best observed TFLOP/s of an n x n x n matmul (2*n^3 FLOPs) on ``device``.

    One warm-up call first (allocation, kernel selection, thread-pool start-up), then the
    fastest of ``repeats`` timings: the best run is the least disturbed by other load.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls_per_repeat):
            torch.mm(a, b)
        sync()
        best = min(best, (time.perf_counter() - t0) / calls_per_repeat)
    return 2 * n**3 / best / 1e12


def device_peak_tflops(logging_cfg: LoggingConfig, device: torch.device) -> tuple[float, str]:
    """Peak TFLOP/s per device for MFU, and where the number came from.

    Order: ``logging.peak_tflops`` when set; the data-sheet bf16 peak of a known GPU; a
    measured bf16 8192^3 GEMM on an unknown GPU; a measured fp32 2048^3 GEMM on CPU (CPU
    training runs in fp32, so that is its practical ceiling).
    """
    if logging_cfg.peak_tflops > 0:
        return float(logging_cfg.peak_tflops), "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = known_gpu_peak(name)
        if known is not None:
            return known[0], f"known GPU {name}"
        # Several calls per timing: one 8192^3 bf16 GEMM is ~1 ms, close to timer noise.
        peak = measure_gemm_tflops(device, 8192, torch.bfloat16, repeats=3, calls_per_repeat=10)
        return peak, f"measured bf16 GEMM on unknown GPU {name}"
    peak = measure_gemm_tflops(device, 2048, torch.float32, repeats=5)
    return peak, f"measured CPU GEMM (fp32 2048^3, {torch.get_num_threads()} threads)"


def throughput_metrics(
    units: float, seconds: float, flops_per_unit: float, num_devices: int, peak_tflops: float, unit: str = "tokens"
) -> dict[str, float]:
    """``{unit}_per_s`` over all devices, model TFLOP/s per device, and MFU as a fraction of
    peak; ``unit`` is the family's throughput unit (tokens for an LLM)."""
    units_per_s = units / seconds
    tflops = flops_per_unit * units_per_s / num_devices / 1e12
    return {
        "step_time_s": seconds,
        f"{unit}_per_s": units_per_s,
        "tflops": tflops,
        "mfu": tflops / peak_tflops if peak_tflops > 0 else 0.0,
    }


class StepTimer:
    """Times optimizer steps and turns them into throughput metrics.

    On CUDA, start/stop synchronise the device so the interval covers the kernels launched
    in it, not just their launch. ``clock`` is injectable so tests can be exact.
    """

    def __init__(
        self,
        flops_per_unit: float,
        num_devices: int,
        peak_tflops: float,
        device: torch.device | None = None,
        clock: Callable[[], float] = time.perf_counter,
        unit: str = "tokens",
    ) -> None:
        self.flops_per_unit = flops_per_unit
        self.unit = unit
        self.num_devices = num_devices
        self.peak_tflops = peak_tflops
        self._cuda = device is not None and device.type == "cuda"
        self._device = device
        self._clock = clock
        self._t0: float | None = None

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self._device)

    def start(self) -> None:
        self._sync()
        self._t0 = self._clock()

    def stop(self, units: float) -> dict[str, float]:
        """Metrics for the ``units`` (global, all data-parallel ranks) since start()."""
        if self._t0 is None:
            raise RuntimeError("StepTimer.stop() called before start()")
        self._sync()
        seconds = self._clock() - self._t0
        self._t0 = None
        return throughput_metrics(units, seconds, self.flops_per_unit, self.num_devices, self.peak_tflops, self.unit)


# Metric name -> TensorBoard tag; names containing "/" are used as tags unchanged, any
# other name goes under train/.
TB_TAGS: dict[str, str] = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "step_time_s": "perf/step_time_s",
    "tokens_per_s": "perf/tokens_per_s",
    "tflops": "perf/tflops",
    "mfu": "perf/mfu",
    "val_loss": "val/loss",
    "checkpoint_wait_s": "perf/checkpoint_wait_s",
    "checkpoint_background_s": "perf/checkpoint_background_s",
}


def tb_tag(name: str) -> str:
    if name in TB_TAGS:
        return TB_TAGS[name]
    if name.endswith("_per_s"):  # a family's throughput unit (clips_per_s, ...)
        return f"perf/{name}"
    if name.startswith("val_"):  # val_psnr, ... beside val/loss
        return f"val/{name[4:]}"
    return name if "/" in name else f"train/{name}"


def format_duration(seconds: float) -> str:
    """Compact h/m/s: '45s', '1m23s', '2h05m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class MetricsLogger:
    """Writes metrics on the writer rank (rank 0); every other rank does nothing.

    ``step`` is the number of completed optimizer steps after the update being logged
    (1..total_steps). ``start_step`` is the step a resumed run started from, so the ETA
    only averages over steps this process ran.
    """

    def __init__(
        self, run_dir: Path, is_writer: bool, tensorboard: bool, total_steps: int, start_step: int = 0
    ) -> None:
        self.run_dir = Path(run_dir)
        self.is_writer = is_writer
        self.total_steps = total_steps
        self.start_step = start_step
        self._file = None
        self._tb = None
        if not is_writer:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run keeps the lines logged before it (readers should take
        # the last record of a step when a crash made some steps run twice).
        self._file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when used

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.is_writer:
            return
        if "step" in metrics:
            raise ValueError("'step' is passed as the step argument, not as a metric")
        # float() also unwraps 0-d tensors and numpy scalars; NaN/inf are kept (Python's
        # json writes and reads them) because a diverging loss must be on record.
        values = {k: float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(tb_tag(name), value, step)
            self._tb.flush()

    def log_video(self, step: int, name: str, frames, fps: float = 8) -> Path | None:
        """A video (uint8 frames (T, H, W, 3)) into TensorBoard as ``SummaryWriter.add_video``
        stores one (an image summary holding an animated GIF; encoded here with PyAV, since
        add_video's own encoder needs moviepy) and as RUN_DIR/videos/NAME-STEP.mp4. Returns
        the mp4's path (None on other ranks)."""
        if not self.is_writer:
            return None
        from fmtrain.data.video import encode_gif, encode_mp4

        folder = self.run_dir / "videos"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name.replace('/', '_')}-{step:07d}.mp4"
        path.write_bytes(encode_mp4(frames, fps=fps))
        if self._tb is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            _, height, width, _ = frames.shape
            image = Summary.Image(
                height=height, width=width, colorspace=3, encoded_image_string=encode_gif(frames, fps=fps)
            )
            self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)
            self._tb.flush()
        return path

    def progress_line(self, step: int, metrics: Mapping[str, float], elapsed_s: float) -> str:
        """One human line; fields missing from ``metrics`` are left out."""
        parts = [f"step {step}/{self.total_steps}"]
        fields = (
            ("loss", lambda v: f"loss {v:.4f}"),
            ("val_loss", lambda v: f"val {v:.4f}"),
            ("lr", lambda v: f"lr {v:.2e}"),
            ("grad_norm", lambda v: f"grad {v:.3f}"),
            ("tokens_per_s", lambda v: f"{v:,.0f} tok/s"),
            ("tflops", lambda v: f"{v:.2f} TFLOP/s"),
            ("mfu", lambda v: f"MFU {100 * v:.1f}%"),
            ("checkpoint_wait_s", lambda v: f"ckpt wait {v:.2f}s"),
        )
        for key, fmt in fields:
            if key in metrics:
                parts.append(fmt(float(metrics[key])))
            if key == "grad_norm":  # another family's throughput unit goes where tok/s goes
                parts += [
                    f"{float(v):,.1f} {k.removesuffix('_per_s')}/s"
                    for k, v in metrics.items()
                    if k.endswith("_per_s") and k != "tokens_per_s"
                ]
        done = step - self.start_step
        if done > 0 and elapsed_s > 0:
            remaining = max(self.total_steps - step, 0) * elapsed_s / done
            parts.append(f"ETA {format_duration(remaining)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "KNOWN_PEAK_TFLOPS",
    "MetricsLogger",
    "StepTimer",
    "TB_TAGS",
    "device_peak_tflops",
    "format_duration",
    "known_gpu_peak",
    "measure_gemm_tflops",
    "tb_tag",
    "throughput_metrics",
]
