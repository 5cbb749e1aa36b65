"""Training objectives: one module per ``objective.name``, each with its config section
(``CONFIG``) and its losses as pure functions of tensors.

- :mod:`fmtrain.objectives.lm`: next-token prediction (the LLM families);
- :mod:`fmtrain.objectives.flow_matching`: rectified-flow velocity matching and the Euler
  sampler (the DiTs);
- :mod:`fmtrain.objectives.vae`, :mod:`fmtrain.objectives.mae`: VAE reconstruction, masked
  video reconstruction;
- :mod:`fmtrain.objectives.dpo`: Direct Preference Optimization against a frozen reference.

A model family lists the objectives it trains with (``FamilySettings.objectives``) and
builds its forward step from the chosen one; the config refuses any other.
"""
