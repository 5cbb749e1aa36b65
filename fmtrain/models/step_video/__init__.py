"""The Step-Video-T2V family: a text-to-video DiT trained with flow matching, as megatron modules.

The whole family, one file per concern:

- :mod:`.config`: the ``model`` section (``StepVideoModelConfig``), its rules, the objectives
  (flow_matching) and layouts (TP, SP, PP, VPP) it supports;
- :mod:`.model`: the DiT chunk of one pipeline stage (blocks, embedders, final layer);
- :mod:`.convert`: the DiT <-> the released ``transformer/`` layout;
- :mod:`.family`: the registry entry (``FAMILY``): flow-matching inputs and loss, pipeline
  packing, sizes, data (latent shards) and the Euler sampler.

This package imports nothing itself, so reading a config stays light.
"""
