"""VideoMAE V2's sizes: parameters, FLOPs, and the workload ``fmtrain info`` and ``fmtrain plan``
estimate memory and time with. Arithmetic on the config; no model code is imported (the token
counts come from :mod:`.masking`'s per-frame rules)."""

from __future__ import annotations

from fmtrain.config import Config
from fmtrain.models.videomae_v2.config import SETTINGS, token_counts, token_grid
from fmtrain.models.workload import AttentionCore, Block, Matmul, SavedValues, Tower, Workload


def _pixels(cfg: Config) -> int:
    """Values of one tubelet: the patch embedding's input and the head's output per token."""
    m = cfg.model
    return m.in_channels * m.tubelet_size * m.patch_size**2


def _split_params(h: int, ffn: int, qv_bias: bool) -> int:
    """A block's weights tensor parallelism divides: the qkv, proj, fc1 and fc2 weights, the q
    and v biases (split with their heads) and fc1's bias."""
    return 4 * h * h + 2 * h * ffn + (2 * h if qv_bias else 0) + ffn


def _whole_params(h: int) -> int:
    """A block's weights every TP rank holds: the row-parallel proj and fc2 biases, two LayerNorms."""
    return h + h + 4 * h


def _block_params(h: int, ffn: int, qv_bias: bool) -> int:
    """Linear weights 4h^2 + 2 h ffn; biases (q, v, proj, fc1, fc2) and two LayerNorms."""
    return _split_params(h, ffn, qv_bias) + _whole_params(h)


def parameter_breakdown(cfg: Config) -> dict[str, int]:
    """Exact parameter counts of the encoder and the decoder (with ``encoder_to_decoder`` and the
    mask token); checked against the built module in tests."""
    m = cfg.model
    h, dh = m.hidden_size, m.decoder_hidden_size
    pixels = _pixels(cfg)
    encoder = pixels * h + h + m.num_layers * _block_params(h, m.ffn_hidden_size, m.qv_bias) + 2 * h
    decoder = h * dh + dh + m.decoder_num_layers * _block_params(dh, m.decoder_ffn_hidden_size, m.qv_bias)
    decoder += 2 * dh + dh * pixels + pixels
    return {"encoder": encoder, "decoder": decoder}


def param_count(cfg: Config) -> int:
    return sum(parameter_breakdown(cfg).values())


def flops_per_sample(cfg: Config) -> float:
    """Model FLOPs (forward + backward = 3x forward) of one clip: per block and token 2 x (4h^2 +
    2 h ffn) for the linears and 2 x 2 S h for the (non-causal) attention over the S tokens the
    tower sees; the patch embedding of every token (the release embeds the whole clip; fmtrain
    embeds the visible tokens only, which the planner's time counts), ``encoder_to_decoder``
    and the head."""
    m = cfg.model
    t, hp, wp = token_grid(cfg)
    encoder_tokens, decoder_tokens = token_counts(cfg)
    pixels = _pixels(cfg)

    def tower(layers: int, h: int, ffn: int, s: int) -> float:
        return layers * s * (2 * (4 * h * h + 2 * h * ffn) + 2 * 2 * s * h)

    h, dh = m.hidden_size, m.decoder_hidden_size
    forward = tower(m.num_layers, h, m.ffn_hidden_size, encoder_tokens)
    forward += tower(m.decoder_num_layers, dh, m.decoder_ffn_hidden_size, decoder_tokens)
    forward += 2 * t * hp * wp * pixels * h + 2 * encoder_tokens * h * dh
    forward += 2 * (decoder_tokens - encoder_tokens) * dh * pixels
    return 3.0 * forward


def _block(h: int, heads: int, ffn: int, qv_bias: bool, on_gpu: bool) -> Block:
    """One pre-norm ViT block (``model.Block``) of width ``h``.

    Saved per token (fmtrain's block, counted with saved-tensor hooks on fp32 CPU runs), whole on
    every TP rank (divided under SP): each LayerNorm's input and output (the output is the
    column-parallel layer's input; under SP megatron keeps its sharded input and gathers it
    again for the weight gradient), 4h, and each LayerNorm's mean and reciprocal std, 4 fp32.
    Split over TP: the fused qkv output, whose q, k and v SDPA keeps (as views on CPU, as
    copies on GPU where they are made contiguous: 3h either way), SDPA's output (h), fc1's
    output (GELU's input) and GELU's output (2 ffn), and SDPA's log-sum-exp, one fp32 per head.
    The projection reads SDPA's output permuted to [S, b, h]: on CPU SDPA lays its output out
    like its (strided) query, [S, b, heads, d], so that is a view (measured); on GPU the flash
    and memory-efficient kernels lay it out [b, S, heads, d] (cuDNN's like its contiguous query,
    [b, heads, S, d]), so the projection keeps a copy (h more; read from PyTorch's kernels, not
    measured: a microbatch of one clip under flash keeps a view). At TP > 1 the q and v biases
    are added after the sharded GEMM: on CPU SDPA then keeps those new q and v (2h) beside the
    GEMM output its k still views; on GPU the three contiguous copies replace them. Full
    recompute keeps the block's input (h)."""
    matmuls = (
        Matmul("attn.qkv", h, 3 * h),
        Matmul("attn.proj", h, h, "row"),
        Matmul("mlp.fc1", h, ffn),
        Matmul("mlp.fc2", ffn, h, "row"),
    )
    return Block(
        matmuls=matmuls,
        attention=(AttentionCore(heads, h // heads),),
        saved=SavedValues(whole=4 * h, split=(5 if on_gpu else 4) * h + 2 * ffn, fp32_whole=4, fp32_split=heads),
        saved_selective=None,  # the family refuses selective recompute (SDPA keeps no scores)
        saved_input=SavedValues(whole=h),
        split_params=_split_params(h, ffn, qv_bias),
        whole_params=_whole_params(h),
        tp_reductions=2,  # proj and fc2
        # two LayerNorms (read, write), two residual adds; the q/v bias add and GELU
        elementwise_whole=4 * h + 6 * h,
        elementwise_split=2 * 2 * h + 2 * ffn,
        tp_saved=SavedValues() if on_gpu or not qv_bias else SavedValues(split=2 * h),
    )


def workload(cfg: Config, on_gpu: bool) -> Workload:
    """VideoMAE V2 for ``fmtrain plan``: the encoder's blocks over the visible tokens (split
    over the pipeline stages), and on the last stage the decoder (:class:`Tower`) over the
    visible tokens plus a mask token at each position the decoder reconstructs.

    First stage, per visible token: the patch embedding's input (the tubelet's pixels, gathered
    from the clip for the visible tokens alone; the embedding is replicated, so whole on every
    TP rank). Last stage: between the towers, per visible token, the
    encoder's final norm's input (gathered from the SP ranks), statistics and output (2h + 2
    fp32, whole on every rank). After the decoder, per reconstructed token: the decoder
    norm's input, a view into the whole [visible + reconstructed] output of the last decoder
    block (gathered under SP), its two fp32 statistics and output (the head's input), and the
    loss's fp32 prediction, target and loss weight, on every TP rank. The sinusoidal position
    tables are buffers (nothing autograd keeps)."""
    m = cfg.model
    h, dh, pixels = m.hidden_size, m.decoder_hidden_size, _pixels(cfg)
    encoder_tokens, decoder_tokens = token_counts(cfg)
    reconstructed = decoder_tokens - encoder_tokens
    # the last stage's tensors outside the towers are counted per encoder token
    out_share = reconstructed / encoder_tokens
    all_share = decoder_tokens / encoder_tokens
    encoder = _block(h, m.num_attention_heads, m.ffn_hidden_size, m.qv_bias, on_gpu)
    decoder = _block(dh, m.decoder_num_attention_heads, m.decoder_ffn_hidden_size, m.qv_bias, on_gpu)
    breakdown = parameter_breakdown(cfg)
    first = pixels * h + h  # the patch embedding
    last = breakdown["encoder"] - first - m.num_layers * _block_params(h, m.ffn_hidden_size, m.qv_bias)
    last += breakdown["decoder"] - m.decoder_num_layers * _block_params(dh, m.decoder_ffn_hidden_size, m.qv_bias)
    return Workload(
        family="videomae_v2",
        layers=m.num_layers,
        hidden=h,
        heads=m.num_attention_heads,
        kv_heads=m.num_attention_heads,
        tokens=encoder_tokens,
        block=encoder,
        first_params_whole=first,
        last_params_whole=last,
        head_matmuls=(
            Matmul("encoder_to_decoder", h, dh, "none"),
            Matmul("decoder.head", dh, pixels, "none", share=out_share),
        ),
        first_saved=SavedValues(gathered=pixels),
        last_tower=Tower(
            layers=m.decoder_num_layers,
            hidden=dh,
            tokens=decoder_tokens,
            block=decoder,
            entry_saved=SavedValues(gathered=2 * h, fp32_gathered=2),
        ),
        last_saved=SavedValues(
            gathered=all_share * dh + out_share * dh, fp32_gathered=out_share * (2 + 2 * pixels + 1)
        ),
        # SP: the patch embedding's output scattered (its gradient gathered); on the last stage
        # the encoder's output gathered, the decoder's input scattered (its gradient gathered)
        # and its output gathered, in units of the encoder's [tokens, hidden]
        first_sp_scatter=1.0,
        last_sp_gather=1.0 + 2 * all_share * dh / h,
        model_flops_per_sample=flops_per_sample(cfg),
        virtual_pipeline="vpp" in SETTINGS.parallel,
        context_parallel="cp" in SETTINGS.parallel,
    )


__all__ = ["flops_per_sample", "param_count", "parameter_breakdown", "workload"]
