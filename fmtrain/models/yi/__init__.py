"""The Yi family: decoder-only LLMs (Yi-6B, Yi-34B) as megatron-core ``GPTModel``.

The whole family, one file per concern:

- :mod:`.config`: the ``model`` section (``YiModelConfig``), its rules, the objectives (lm)
  and layouts (TP, SP, PP, VPP) it supports: what the config needs before anything starts;
- :mod:`.model`: megatron's TransformerConfig and the GPTModel chunk of one pipeline stage;
- :mod:`.convert`: Yi <-> Hugging Face ``LlamaForCausalLM`` (config and weight mapping);
- :mod:`.family`: the registry entry (``FAMILY``): parts, forward step, sizes, data.

This package imports nothing itself, so reading a config stays light.
"""
