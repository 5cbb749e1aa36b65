"""fmtrain: distributed pretraining of foundation models on megatron-core."""

import warnings

# megatron-core announces each fallback it takes when Apex / Transformer Engine are absent, once
# per import site and rank. fmtrain chooses its kernels itself (SDPA attention, torch RMSNorm,
# torch AdamW) and says so where it matters, so these notices are noise.
for _pattern in (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    # TransformerConfig's own default for cuda_graph_scope trips its deprecation note.
    r"full scope is deprecated.*",
    # megatron's optimizer probes `.grad` on its fp32 views of gradient buffers.
    r"The \.grad attribute of a Tensor that is not a leaf Tensor.*",
):
    warnings.filterwarnings("ignore", message=_pattern, category=UserWarning)
# megatron-core 0.16 calls the collectives torch 2.13 renamed; the old names still work.
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",
    category=FutureWarning,
)

__version__ = "0.1.0"
