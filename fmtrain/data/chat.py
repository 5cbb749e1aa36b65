"""Chat templates for conversational preference records (TRL's conversational format).

A conversational record holds lists of messages::

    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}

and becomes plain text the way TRL's ``maybe_apply_chat_template`` makes it: the prompt is the
template applied to the prompt messages with the generation prompt, and each completion is what
the template applied to prompt + completion adds after that prompt (it must begin with the
prompt, else the record is refused). The result is tokenized like any plain-text record
(:mod:`fmtrain.data.preference`).

Templates are Hugging Face's Jinja chat templates, rendered in Jinja's immutable sandbox as
transformers renders them (templates are data, never code run unsandboxed): ``chatml`` (built
in), a template file, or a Hugging Face ``tokenizer_config.json`` (or its directory) whose
``chat_template`` it reads. ``bos_token`` and ``eos_token`` render as empty strings: fmtrain's
tokenizers add BOS (``objective.add_bos``) and EOS (after each completion) as token ids, which a
template's text would only spell out as characters.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, the format of Yi's chat models (``<|im_start|>role\\ncontent<|im_end|>``)."""

BUILTIN_TEMPLATES = {"chatml": CHATML}


class ChatTemplateError(ValueError):
    """A template that cannot be read or rendered, or a record it cannot render."""


def load_chat_template(spec: str) -> str:
    """The Jinja source of ``spec``: a built-in name (chatml), a template file, or a Hugging Face
    ``tokenizer_config.json`` / its directory (its ``chat_template``; of named templates, the
    ``default`` one)."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer_config.json"
    if not path.is_file():
        known = ", ".join(BUILTIN_TEMPLATES)
        raise ChatTemplateError(
            f"chat template {spec}: not a file, a directory with tokenizer_config.json, or a built-in ({known})"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return text
    try:
        template = json.loads(text).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        raise ChatTemplateError(f"chat template {path}: not a JSON object") from None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template {path}: no 'chat_template' string (or named 'default' template)")
    return template


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not parse: {exc}") from None


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """``messages`` through ``template`` (as transformers' ``apply_chat_template(tokenize=False)``)."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=""
        )
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from None


def _messages(value, name: str) -> list[dict]:
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok or not value:
        raise ChatTemplateError(f"{name!r} is not a list of {{'role': str, 'content': str}} messages")
    return value


def conversation_to_text(record: dict, template: str) -> dict[str, str]:
    """A conversational preference record as plain text: ``{"prompt", "chosen", "rejected"}``."""
    prompt_messages = _messages(record["prompt"], "prompt")
    prompt = render(template, prompt_messages, add_generation_prompt=True)
    out = {"prompt": prompt}
    for name in ("chosen", "rejected"):
        full = render(template, prompt_messages + _messages(record[name], name))
        if not full.startswith(prompt):
            raise ChatTemplateError(
                f"the chat template applied to prompt + {name} does not begin with the templated prompt, "
                "so the completion cannot be cut from it"
            )
        out[name] = full[len(prompt) :]
    return out


__all__ = ["BUILTIN_TEMPLATES", "CHATML", "ChatTemplateError", "conversation_to_text", "load_chat_template", "render"]
