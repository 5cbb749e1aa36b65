"""Model families and the layers they share.

A family is a package (``yi/``, ``step_video/``) with the whole definition of one model: its
config section and rules (``config``), modules (``model``), release converter (``convert``)
and registry entry (``family``: :class:`fmtrain.models.registry.ModelFamily`). Shared here:
attention, RoPE (1D and 3D), AdaLN modulation, norms, layout-invariant initialisation, the
megatron TransformerConfig fields every family sets alike, size arithmetic and the converter
helpers. See docs/adding_a_family.md.
"""
