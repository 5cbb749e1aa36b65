"""The LaVin-DiT family: a joint two-stream DiT (J-DiT) over ST-VAE latents, trained with flow
matching on in-context task samples, as megatron modules.

The whole family, one file per concern:

- :mod:`.config`: the ``model`` section (``LaVinDiTModelConfig``), its size presets and rules,
  the objective (flow_matching) and layouts (TP, SP, PP, VPP) it supports;
- :mod:`.sizes`: every tensor's shape, parameters and FLOPs (no torch);
- :mod:`.model`: the J-DiT chunk of one pipeline stage (joint blocks, embedders, final layer);
- :mod:`.convert`: the J-DiT <-> the released ``lavin_dit.safetensors``;
- :mod:`.family`: the registry entry (``FAMILY``): flow-matching inputs on the target stream,
  the null condition, pipeline packing, data (in-context task samples) and the Euler sampler.

The ST-VAE whose latents it reads is the ``st_vae`` family. This package imports nothing
itself, so reading a config stays light.
"""
