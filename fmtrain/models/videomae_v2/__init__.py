"""The VideoMAE V2 family: a dual-masking video masked autoencoder, as megatron modules.

The whole family, one file per concern:

- :mod:`.config`: the ``model`` section (``VideoMAEModelConfig``), the size presets S / B / L /
  H / g, its rules, the objective (mae) and layouts (TP, SP, PP) it supports;
- :mod:`.masking`: encoder tube masking and decoder running-cell masking, drawn per sample;
- :mod:`.model`: the ViT encoder and decoder of one pipeline stage;
- :mod:`.convert`: fmtrain <-> transformers' ``VideoMAEForPreTraining`` / ``VideoMAEModel``
  and the official VideoMAE V2 ``.pth`` checkpoints;
- :mod:`.sizes`: parameters, FLOPs and the planner's workload (``fmtrain plan`` / ``info``),
  arithmetic on the config;
- :mod:`.family`: the registry entry (``FAMILY``): the forward step and loss, data and the
  validation pictures.

This package imports nothing itself, so reading a config stays light.
"""
