"""FLOP, parameter and memory arithmetic against published numbers and hand algebra."""

from fractions import Fraction

import pytest

from fmtrain.config import Config, load_config
from fmtrain.models.sizes import (
    activation_bytes_per_layer,
    in_flight_layer_microbatches,
    state_bytes_per_param,
    transformer_param_count,
    transformer_training_flops_per_token,
)
from fmtrain.models.workload import Layout, dense_transformer, family_workload, layout_of, peak_memory
from fmtrain.models.yi.sizes import flops_per_token as model_flops_per_token_from_config
from fmtrain.models.yi.sizes import param_count as param_count_from_config

YI_6B = dict(num_layers=32, hidden=4096, heads=32, kv_heads=4, head_dim=128, ffn=11008, vocab=64000)
YI_34B = dict(num_layers=60, hidden=7168, heads=56, kv_heads=8, head_dim=128, ffn=20480, vocab=64000)
# Llama2-7B: 32 layers, h 4096, 32 heads (MHA), SwiGLU 11008, vocab 32000, seq 4096.
LLAMA2_7B = dict(num_layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, ffn=11008, vocab=32000)


def test_yi_6b_param_count_matches_hf_checkpoint():
    # Sum of the tensor sizes in the 01-ai/Yi-6B safetensors checkpoint.
    assert transformer_param_count(**YI_6B) == 6_061_035_520


def test_yi_34b_param_count_matches_hf_checkpoint():
    assert transformer_param_count(**YI_34B) == 34_388_917_248


def test_param_count_by_hand_tiny_model():
    # 1 layer, h=8, 2 heads x 4, 1 kv head, ffn 16, vocab 10.
    # q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; swiglu 3*8*16 = 384; norms 16 -> 592 per layer.
    # + final norm 8 + embedding 80 (+ output 80 when untied).
    kw = dict(num_layers=1, hidden=8, heads=2, kv_heads=1, head_dim=4, ffn=16, vocab=10)
    assert transformer_param_count(**kw) == 592 + 8 + 160
    assert transformer_param_count(**kw, tied=True) == 592 + 8 + 80
    # Plain MLP: 2*8*16 = 256 instead of 384.
    assert transformer_param_count(**kw, swiglu=False) == 592 - 128 + 8 + 160
    # Biases: q 8 + k 4 + v 4 + o 8 = 24, gate 16 + up 16 + down 8 = 40.
    assert transformer_param_count(**kw, bias=True) == 592 + 64 + 8 + 160


def test_config_wrappers_use_yi_layout():
    cfg = load_config(
        overrides=[
            "model.num_layers=32",
            "model.hidden_size=4096",
            "model.num_attention_heads=32",
            "model.num_query_groups=4",
            "model.ffn_hidden_size=11008",
            "model.vocab_size=64000",
            "model.seq_length=4096",
        ]
    )
    assert param_count_from_config(cfg) == 6_061_035_520
    cfg.model.tie_embeddings = True
    assert param_count_from_config(cfg) == 6_061_035_520 - 64000 * 4096
    # Per token, by hand: projections 6*4096*(4096+512+512+4096) = 226,492,416;
    # MLP 6*4096*11008*3 = 811,597,824; causal core attention 6*4096*4096 = 100,663,296;
    # times 32 layers, plus output 6*4096*64000 = 1,572,864,000.
    per_layer = 226_492_416 + 811_597_824 + 100_663_296
    assert model_flops_per_token_from_config(cfg) == 32 * per_layer + 1_572_864_000


def test_config_wrappers_reject_other_families():
    cfg = Config()
    cfg.model.family = "stepvideo"
    with pytest.raises(ValueError, match="decoder-only"):
        param_count_from_config(cfg)


@pytest.mark.parametrize(
    "l,h,a,s,V", [(24, 2048, 16, 2048, 51200), (96, 12288, 96, 2048, 51200), (2, 64, 4, 128, 1000)]
)
def test_dense_flops_match_korthikanti_eq7(l, h, a, s, V):
    """Korthikanti eq. 7, 72*B*s*l*h^2*(1 + s/(6h) + V/(12lh)), expands per token to
    72lh^2 (QKV+O: 24lh^2, 4h MLP: 48lh^2) + 12lsh + 6hV. The 12lsh is QK^T plus
    attention*V over the *full* s x s score matrix (2 GEMMs x 2 FLOP x s x h, times 3 for
    training), so the closed form is the non-causal count; a causal mask halves it to 6lsh.
    """
    B = 3
    closed_form = 72 * B * s * l * h * h * (1 + Fraction(s, 6 * h) + Fraction(V, 12 * l * h))
    per_token_closed = closed_form / (B * s)
    kw = dict(num_layers=l, hidden=h, heads=a, kv_heads=a, head_dim=h // a, ffn=4 * h, vocab=V, seq_len=s, swiglu=False)
    assert transformer_training_flops_per_token(**kw, causal=False) == per_token_closed
    assert transformer_training_flops_per_token(**kw, causal=True) == per_token_closed - 6 * l * s * h


def test_flops_close_to_6n_for_long_model():
    # Sanity against the 6N rule: with short sequences, FLOPs/token ~ 6 * (non-embedding
    # params + output layer). Yi-6B at s=4096: causal core attention adds 6*l*s*h, 9.3% on top.
    n = transformer_param_count(**YI_6B) - 64000 * 4096  # the input lookup costs no FLOPs
    f = transformer_training_flops_per_token(**YI_6B, seq_len=4096)
    norms = 32 * 2 * 4096 + 4096  # norm weights are counted in N but not as matmul FLOPs
    assert f == 6 * (n - norms) + 6 * 32 * 4096 * 4096


def test_state_bytes_per_param_reference_values():
    assert state_bytes_per_param(True, False, 8) == 18
    assert state_bytes_per_param(True, True, 1) == 18
    assert state_bytes_per_param(True, True, 4) == 9
    assert state_bytes_per_param(False, False, 8) == 16
    assert state_bytes_per_param(False, True, 8) == 9


def test_activation_cases_from_table_2():
    s, b, h, a, t = 2048, 2, 1024, 16, 4
    sbh = s * b * h
    assert activation_bytes_per_layer(s, b, h, a) == sbh * (34 + 5 * a * s / h)
    assert activation_bytes_per_layer(s, b, h, a, tp=t) == sbh * (10 + 24 / t + 5 * a * s / (h * t))
    assert activation_bytes_per_layer(s, b, h, a, tp=t, sequence_parallel=True) == pytest.approx(
        sbh / t * (34 + 5 * a * s / h)
    )
    for kw in (dict(recompute="selective"), dict(flash_attention=True)):
        assert activation_bytes_per_layer(s, b, h, a, tp=t, sequence_parallel=True, **kw) == 34 * sbh / t
    assert activation_bytes_per_layer(s, b, h, a, tp=t, recompute="full") == 2 * sbh
    with pytest.raises(ValueError):
        activation_bytes_per_layer(s, b, h, a, recompute="some")


def test_pipeline_in_flight_microbatches():
    # 1F1B: first stage p microbatches of l/p layers = l layers; last stage l/p.
    assert in_flight_layer_microbatches(0, 32, 4) == 32
    assert in_flight_layer_microbatches(3, 32, 4) == 8
    assert in_flight_layer_microbatches(0, 32, 4, num_microbatches=2) == 16
    # Interleaved: first stage l * (1 + (p-1)/(p*v)).
    assert in_flight_layer_microbatches(0, 32, 4, vpp=2) == pytest.approx(32 * (1 + 3 / 8))
    assert in_flight_layer_microbatches(0, 48, 4, vpp=3) == pytest.approx(48 * (1 + 3 / 12))
    assert in_flight_layer_microbatches(0, 1, 1) == 1


LLAMA = dict(layers=32, hidden=4096, heads=32, ffn=11008, vocab=32000, seq=4096)


def test_memory_by_hand_tp8_stage():
    """Llama2-7B at TP 8 + SP, micro-batch 4, DP 1: the stage's parameters, 18 bytes each (the
    distributed optimizer over one rank), and per layer and token the counted values over 8."""
    e = peak_memory(dense_transformer(**LLAMA), Layout(tp=8, mbs=4, sequence_parallel=True), global_batch=4, bf16=True)
    linear = 4 * 4096 * 4096 + 3 * 4096 * 11008
    params = 32 * (linear // 8 + 2 * 4096) + 2 * 32000 * 4096 // 8 + 4096
    assert e.params == params
    assert e.state_bytes == params * 18
    # fused SwiGLU: 6h whole + (3 q + 2 kv + 3 ffn) split, 2-byte values; fp32: 2 norm
    # reciprocals whole, one log-sum-exp per head split
    per_token = (2 * (6 * 4096 + 5 * 4096 + 3 * 11008) + 4 * (2 + 32)) / 8
    tokens = 4 * 4096
    last = (2 * 3 * 4096 + 4 * 32000) / 8 * tokens  # final norm + output-layer input, fp32 softmax shard
    tables = 2 * 128 * 4096 * 2
    assert e.activation_bytes == pytest.approx(32 * per_token * tokens + last + tables)
    assert e.workspace_bytes == pytest.approx(per_token * tokens)


def test_memory_worst_stage_tied_copy_and_fp32():
    lay = Layout(pp=4, mbs=1)
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    emb = 32000 * 4096
    e = peak_memory(dense_transformer(**LLAMA), lay, global_batch=8, bf16=True)
    # the first stage holds 4 microbatches of 8 layers and the embedding: it is the busiest
    assert e.params == 8 * layer + emb
    one = peak_memory(dense_transformer(**LLAMA, tied=True), Layout(), global_batch=8, bf16=True)
    assert one.params == 32 * layer + emb + 4096  # tied: stored once on one stage
    tied = dense_transformer(**LLAMA, tied=True)
    from fmtrain.models.workload import stage_params

    assert stage_params(tied, lay, 3) == 8 * layer + 4096 + emb  # pp > 1 keeps a copy on the last
    fp32 = peak_memory(dense_transformer(**LLAMA), Layout(distributed_optimizer=False), global_batch=8, bf16=False)
    assert fp32.state_bytes == fp32.params * 16


def test_memory_from_config_follows_its_layout():
    """fmtrain info's estimate: the config's layout; CP divides the activations and shares the
    optimizer shards with DP; DPO adds the reference's 16-bit weights; megatron's local attention
    adds the score matrix."""
    recipe = "recipes/yi/6b_32k.yaml"
    cp4, cp1 = load_config(recipe), load_config(recipe, ["parallel.cp=1"])
    at_cp4 = peak_memory(family_workload(cp4, True), layout_of(cp4, 8), global_batch=16 * 8, bf16=True)
    at_cp1 = peak_memory(family_workload(cp1, True), layout_of(cp1, 32), global_batch=4 * 32, bf16=True)
    # the same micro-batch of 32K tokens, 1/4 of them per rank; DP x CP = 32 both ways
    assert at_cp4.activation_bytes == pytest.approx(at_cp1.activation_bytes / 4)
    assert at_cp4.state_bytes == pytest.approx(at_cp1.state_bytes)

    base = load_config("recipes/yi/tiny.yaml", [])
    plain = peak_memory(family_workload(base, True), layout_of(base, 1), global_batch=8, bf16=True)
    dpo = load_config("recipes/yi/dpo_tiny.yaml", [])
    with_reference = peak_memory(family_workload(dpo, True), layout_of(dpo, 1), global_batch=8, bf16=True)
    assert with_reference.state_bytes == pytest.approx(with_reference.params * (18 + 2))
    local = load_config("recipes/yi/tiny.yaml", ["model.attention_backend=local"])
    scores = peak_memory(family_workload(local, True), layout_of(local, 1), global_batch=8, bf16=True)
    m = base.model
    extra = m.num_layers * 2 * m.num_attention_heads * m.seq_length * 2 * m.seq_length * base.train.micro_batch_size
    assert scores.activation_bytes - plain.activation_bytes == pytest.approx(extra)
