"""Training objectives as pure functions of tensors (flow matching; next-token lives in the
LLM family, DPO and masked reconstruction come with their families)."""
