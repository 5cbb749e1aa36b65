"""LaVin-DiT's ST-VAE family: a causal 3D-conv autoencoder with a diagonal Gaussian posterior
(8x8 spatial, 4x temporal compression to 16 channels; CogVideoX-style spatial-norm decoder),
trained with the ``vae`` objective (L1 + KL + SSIM, an optional 3D PatchGAN discriminator with
its own optimizer), as the shared VAE machinery trains the Step-Video Video-VAE.

- :mod:`.config`: the ``model`` section, its rules, the objective (vae), data-parallel only;
- :mod:`.model`: the encoder and decoder (the release's parameter names);
- :mod:`.codec`: pixels <-> the normalised latents LaVin-DiT's DiT sees, in chunks that share
  their boundary frame (the release's ``tiled_encode``) and spatial tiles;
- :mod:`.convert`: the released ``stvae.pt`` in, ``stvae.safetensors`` and ``stvae.pt`` out;
- :mod:`.family`: the registry entry (``FAMILY``).

This package imports nothing itself, so reading a config stays light.
"""
