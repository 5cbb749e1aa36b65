"""Devices the planner knows, and the efficiencies it assumes on them.

Peak numbers are the vendors' data-sheet values for dense bf16 tensor-core math (no sparsity),
HBM bandwidth, NVLink bandwidth per direction per GPU, and the usual InfiniBand/RoCE fabric of
a DGX/HGX node (one 400 Gb/s NIC per GPU; 200 Gb/s on A100 systems). ``memory_bytes`` is what
``torch.cuda.mem_get_info`` reports as total on the 80 GB / 141 GB parts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float
    """Dense bf16 FLOP/s."""
    memory_bytes: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float
    """Within a node, per GPU and direction."""
    internode_bytes_per_s: float
    """Between nodes, per GPU and direction."""


DEVICES: dict[str, Device] = {
    device.name: device
    for device in (
        # H100 SXM5: 989.4 TFLOP/s bf16 dense, 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s total.
        Device("h100", 989.4e12, 79.6 * GIB, 3.35e12, 450 * GB, 50 * GB),
        # H200 SXM: the H100's compute with 141 GB HBM3e at 4.8 TB/s.
        Device("h200", 989.4e12, 140.4 * GIB, 4.8e12, 450 * GB, 50 * GB),
        # H800 SXM: H100 compute, NVLink cut to 400 GB/s total.
        Device("h800", 989.4e12, 79.6 * GIB, 3.35e12, 200 * GB, 50 * GB),
        # A100 SXM4 80 GB: 312 TFLOP/s bf16, 2.04 TB/s, NVLink 3 600 GB/s total, HDR 200 Gb/s.
        Device("a100", 312e12, 79.2 * GIB, 2.04e12, 300 * GB, 25 * GB),
        # B200: 2.25 PFLOP/s bf16 dense, 180 GB HBM3e at 8 TB/s, NVLink 5 1.8 TB/s total.
        Device("b200", 2250e12, 178.4 * GIB, 8.0e12, 900 * GB, 50 * GB),
    )
}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the peaks that kernels and collectives reach, and the planner's overlaps.

    ``gemm``: large bf16 matmuls (cuBLAS on H100 sustains about 75-80% of the dense peak on
    transformer shapes; a matmul's time also pays its HBM traffic, so small ones fall below);
    ``attention``: fused (flash) attention's forward and backward on the FLOPs it executes
    (causal masks skip half); ``hbm`` and ``network``: achieved bandwidth of memory-bound
    kernels and of NCCL collectives (bus bandwidth over link bandwidth); ``latency_s``: the fixed
    cost of one collective or point-to-point transfer; ``kernel_s``: the launch and tail cost of
    one kernel.
    """

    gemm: float = 0.65
    attention: float = 0.45
    hbm: float = 0.80
    network: float = 0.80
    latency_s: float = 20e-6
    kernel_s: float = 15e-6

    def calibrated(self, gemm: float) -> Efficiency:
        return replace(self, gemm=gemm)


def device(name: str) -> Device:
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise ValueError(f"--gpu {name!r}: not one of {', '.join(sorted(DEVICES))}") from None


__all__ = ["DEVICES", "GIB", "Device", "Efficiency", "device"]
