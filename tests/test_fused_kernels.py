"""Which fused kernels a run gets, and that megatron's fused cross entropy computes the loss.

The end-to-end check (compiled SwiGLU at TP=2 + SP gives the reference run's losses and
gradient norms; foreach and fused AdamW agree) is in tests/test_layout_equivalence.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port

from fmtrain.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]


def _yi_config(fused_kernels: str):
    return config_from_dict(
        {
            "model": {
                "family": "yi",
                "num_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "ffn_hidden_size": 128,
                "vocab_size": 512,
                "seq_length": 64,
                "attention_backend": "sdpa",
                "fused_kernels": fused_kernels,
            }
        }
    )


@pytest.mark.parametrize(
    "choice,use_cpu,dtype,activation,cross_entropy",
    [
        ("auto", False, torch.bfloat16, True, True),  # CUDA default
        ("auto", True, torch.float32, False, False),  # CPU default
        ("on", True, torch.float32, True, False),  # fp32: the fused CE would round gradients to bf16
        ("on", True, torch.bfloat16, True, True),
        ("off", False, torch.bfloat16, False, False),
    ],
)
def test_yi_fused_kernel_selection(monkeypatch, choice, use_cpu, dtype, activation, cross_entropy):
    from fmtrain.models import megatron_config
    from fmtrain.models.yi import model as yi

    # As on a machine where torch.compile has what it needs (a C compiler; triton for CUDA).
    monkeypatch.setattr(megatron_config, "torch_compile_missing", lambda use_cpu: [])
    tconfig = yi.transformer_config(_yi_config(choice), params_dtype=dtype, use_cpu=use_cpu)
    assert tconfig.bias_activation_fusion is activation
    assert tconfig.cross_entropy_loss_fusion is cross_entropy
    assert tconfig.apply_rope_fusion is False  # needs Transformer Engine, absent here


def test_fused_kernels_without_a_compiler(monkeypatch):
    from fmtrain.config import ConfigError
    from fmtrain.models import megatron_config
    from fmtrain.models.yi import model as yi

    monkeypatch.setattr(
        megatron_config.importlib.util, "find_spec", lambda name: None if name == "triton" else object()
    )
    # auto quietly keeps the plain ops on a CUDA machine without triton; "on" says what is missing.
    tconfig = yi.transformer_config(_yi_config("auto"), params_dtype=torch.bfloat16, use_cpu=False)
    assert not tconfig.bias_activation_fusion and not tconfig.cross_entropy_loss_fusion
    with pytest.raises(ConfigError, match="model.fused_kernels=on.*triton"):
        yi.transformer_config(_yi_config("on"), params_dtype=torch.bfloat16, use_cpu=False)


def test_yaml_on_off_reads_as_choice(tmp_path):
    from fmtrain.config import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  fused_kernels: off\ntrain:\n  fused_adam: on\n")
    cfg = load_config(recipe, ["model.fused_kernels=on"])
    assert (cfg.model.fused_kernels, cfg.train.fused_adam) == ("on", "on")
    assert load_config(recipe, []).model.fused_kernels == "off"


def test_fused_cross_entropy_bf16_tensor_parallel(tmp_path):
    out = tmp_path / "ce.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "fused_ce_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = torch.load(out, weights_only=True)

    # Reference: single-process fp32 cross entropy over the full vocabulary of the same bf16 logits.
    logits = r["logits"].float().requires_grad_(True)
    vocab = logits.shape[-1]
    ref_loss = F.cross_entropy(logits.view(-1, vocab), r["labels"].view(-1), reduction="none").view_as(r["labels"])
    (ref_loss * r["weights"]).sum().backward()

    torch.testing.assert_close(r["fused_loss"].float(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["plain_loss"].float(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    # bf16 logits get bf16 gradients from either implementation: within bf16 rounding of the
    # fp32 gradient, and the same values as the unfused path's.
    assert r["fused_grad"].dtype == torch.bfloat16
    torch.testing.assert_close(r["fused_grad"].float(), logits.grad, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(r["fused_grad"], r["plain_grad"], rtol=2**-7, atol=1e-6)
