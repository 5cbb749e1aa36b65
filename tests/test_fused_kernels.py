"""Which fused kernels a run gets, that megatron's fused cross entropy computes the loss, and
the fused weight-gradient accumulation and CPU multi-tensor kernels give unfused values.

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


def test_linear_accumulates_its_weight_gradient_into_main_grad():
    """fmtrain.models.linear.linear under megatron DDP's conventions (``main_grad`` buffer view,
    ``grad_added_to_main_grad``): two uses accumulate the weight gradient of F.linear into the
    buffer and mark it so DDP's hook adds nothing; input and bias gradients are F.linear's."""
    from fmtrain.models.linear import linear

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 5))
    bias = torch.nn.Parameter(torch.randn(6))
    xs = [torch.randn(3, 4, 5, requires_grad=True) for _ in range(2)]
    ref_w, ref_b = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    ref_xs = [x.detach().clone().requires_grad_(True) for x in xs]
    sum(F.linear(x, ref_w, ref_b).pow(2).sum() for x in ref_xs).backward()

    buffer = torch.zeros(40)
    weight.main_grad = buffer[:30].view(6, 5)
    weight.grad_added_to_main_grad = False
    sum(linear(x, weight, bias).pow(2).sum() for x in xs).backward()
    assert weight.grad_added_to_main_grad
    torch.testing.assert_close(weight.main_grad, ref_w.grad)
    torch.testing.assert_close(bias.grad, ref_b.grad)
    for x, ref in zip(xs, ref_xs):
        torch.testing.assert_close(x.grad, ref.grad)
    assert (buffer[30:] == 0).all()

    # Without a main_grad (no DDP) or without autograd it is F.linear itself.
    plain = torch.nn.Parameter(torch.randn(6, 5))
    ref_plain = plain.detach().clone().requires_grad_(True)
    x = xs[0].detach()
    linear(x, plain).pow(2).sum().backward()
    F.linear(x, ref_plain).pow(2).sum().backward()
    torch.testing.assert_close(plain.grad, ref_plain.grad)
    with torch.no_grad():
        torch.testing.assert_close(linear(xs[0], weight, bias), F.linear(xs[0], weight, bias))


def test_cpu_norm_and_scale_fallbacks_equal_megatrons():
    """The CPU backend's foreach replacements for megatron's multi-tensor L2 norm and scale give
    the values of megatron's own fallbacks (megatron.core.utils.local_multi_tensor_*)."""
    from megatron.core import utils as mcore_utils

    from fmtrain.parallel import cpu_backend

    torch.manual_seed(0)
    tensors = [torch.randn(17, 3), torch.randn(1000), torch.randn(4)]
    ours, _ = cpu_backend._foreach_l2_norm(0, None, [tensors], False)
    flag = torch.zeros(1, dtype=torch.int)
    theirs = torch.norm(torch.tensor([torch.norm(t) for t in tensors]))
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours[0], theirs, rtol=0, atol=0)
    in_place = [t.clone() for t in tensors]
    reference = [t.clone() for t in tensors]
    cpu_backend._foreach_scale(0, flag, [in_place, in_place], 0.37)
    mcore_utils.local_multi_tensor_scale(0, flag, [reference, reference], 0.37)
    for a, b in zip(in_place, reference):
        assert torch.equal(a, b)
    copies = [torch.empty_like(t) for t in tensors]
    cpu_backend._foreach_scale(0, flag, [tensors, copies], 2.0)
    for a, b in zip(copies, tensors):
        assert torch.equal(a, 2.0 * b)
