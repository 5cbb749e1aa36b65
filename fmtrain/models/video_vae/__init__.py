"""The Step-Video-T2V Video-VAE family: a causal 3D-conv autoencoder with a diagonal Gaussian
posterior (16x16 spatial, 8x temporal compression to 64 channels), trained with the ``vae``
objective (L1 + KL + SSIM, an optional 3D PatchGAN discriminator with its own optimizer).

- :mod:`.config`: the ``model`` section, its rules, the objective (vae), data-parallel only;
- :mod:`.model`: the encoder, decoder and discriminator modules (the release's parameter names);
- :mod:`.codec`: encoding in causal 17-frame chunks, chunk-wise decoding with the release's
  seam blending, spatial tiling with blended overlaps;
- :mod:`.convert`: the released ``vae/vae_v2.safetensors`` in and out;
- :mod:`.family`: the registry entry (``FAMILY``): parts, forward steps, sizes, data.

This package imports nothing itself, so reading a config stays light.
"""
