"""Conversational preference records (TRL's format) through a chat template.

The reference is transformers: ``PreTrainedTokenizerFast.apply_chat_template`` renders the same
templates, and TRL's ``maybe_apply_chat_template`` rule (prompt with the generation prompt;
each completion = the templated prompt + completion minus the templated prompt) is written out
on its output.
"""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fmtrain.data.chat import CHATML, ChatTemplateError, conversation_to_text, load_chat_template, render  # noqa: E402

# Zephyr's template (HuggingFaceH4/zephyr-7b-beta), without its eos_token.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
RECORD = {
    "prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}],
    "chosen": [{"role": "assistant", "content": "4."}],
    "rejected": [{"role": "assistant", "content": "It depends on the base."}],
}


def _hf_tokenizer(template: str):
    model = tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model))
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [CHATML, ZEPHYR], ids=["chatml", "zephyr"])
def test_records_render_as_transformers_and_trl_make_them(template):
    tok = _hf_tokenizer(template)
    prompt = tok.apply_chat_template(RECORD["prompt"], tokenize=False, add_generation_prompt=True)
    assert render(template, RECORD["prompt"], add_generation_prompt=True) == prompt
    want = {"prompt": prompt}
    for name in ("chosen", "rejected"):
        full = tok.apply_chat_template(RECORD["prompt"] + RECORD[name], tokenize=False)
        want[name] = full[len(prompt) :]
    assert conversation_to_text(RECORD, template) == want
    assert want["chosen"].startswith("4.") and "2 + 2" in want["prompt"]


def test_shard_conversational_records_and_the_errors(tmp_path, capsys):
    from fmtrain.cli import main as fmtrain_main
    from fmtrain.data.preference import read_preference_records

    records = tmp_path / "chat.jsonl"
    plain = {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "No."}
    records.write_text(json.dumps(RECORD) + "\n" + json.dumps(plain) + "\n")
    out = tmp_path / "shards"
    args = ["data", "shard", "preference", str(records), "--out", str(out)]
    assert fmtrain_main(args) == 1  # messages without a template
    err = capsys.readouterr().err
    assert "chat.jsonl:1: 'prompt' is a list" in err and "need --chat-template" in err
    assert fmtrain_main([*args, "--chat-template", "chatml"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 2 and index["chat_template"] == "chatml"
    # what the shards hold is what the reader hands them: the rendered text, plain records as they are
    rendered = [record for _, record in read_preference_records(records, CHATML)]
    assert rendered[0] == conversation_to_text(RECORD, CHATML) and rendered[1] == plain

    # A tokenizer_config.json's template; one whose completion does not extend the prompt is refused.
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": ZEPHYR}))
    assert load_chat_template(str(tmp_path)) == ZEPHYR
    reordering = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "bad.jinja").write_text(reordering)
    assert fmtrain_main([*args[:-1], str(tmp_path / "bad_out"), "--chat-template", str(tmp_path / "bad.jinja")]) == 1
    assert "chat.jsonl:1: the chat template applied to prompt + chosen does not begin" in capsys.readouterr().err
    with pytest.raises(ChatTemplateError, match="not a file, a directory with tokenizer_config.json"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_templates_run_sandboxed():
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="failed on these messages"):
        render(escape, RECORD["prompt"])
