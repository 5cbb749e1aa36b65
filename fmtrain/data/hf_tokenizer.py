"""Hugging Face tokenizer files for a SentencePiece model with Yi's special tokens.

Writes ``tokenizer.model`` (copied), ``tokenizer_config.json`` and ``special_tokens_map.json``
so that ``transformers.AutoTokenizer.from_pretrained(dir)`` encodes exactly the ids the
SentencePiece model does (``sp.encode(text)``): no BOS / EOS added, special-token strings in
the text not parsed as special tokens (SentencePiece never does that either, and fmtrain's
data pipeline inserts EOS by id), leading whitespace kept.

transformers 5 builds every ``LlamaTokenizer`` on the ``tokenizers`` library from the
vocabulary alone, with a ``Metaspace`` pre-tokenizer, whatever the SentencePiece model says.
Which configuration reproduces SentencePiece depends on the model's ``add_dummy_prefix``:

- ``add_dummy_prefix: false``: ``LlamaTokenizer`` with ``add_prefix_space: false`` is exact.
- ``add_dummy_prefix: true`` (Llama's setting, and the tokenizers ``fmtrain`` trains):
  ``LlamaTokenizer`` with ``add_prefix_space: true`` differs on text that starts with a space
  (``Metaspace`` does not prepend "▁" to text already starting with one; SentencePiece does:
  ``"  a"`` is ``▁ ▁ ▁a`` there, ``▁ ▁a`` in transformers). The export then also writes
  ``tokenizer.json``, converted by transformers' own SentencePiece converter (normalizer
  ``Replace(" ", "▁")`` + ``Replace(^▁, ▁▁)`` + ``Metaspace(always)``), and names the generic
  ``PreTrainedTokenizerFast`` class, which loads that file as is (transformers 4 and 5).
  Without transformers installed at export time it falls back to ``LlamaTokenizer`` and
  says what differs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from fmtrain.data.text import BOS_PIECE, EOS_PIECE, UNK_PIECE

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def _add_dummy_prefix(model_file: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def _check_special_pieces(model_file: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    found = {
        "unk": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
        "bos": sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None,
        "eos": sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None,
    }
    want = {"unk": UNK_PIECE, "bos": BOS_PIECE, "eos": EOS_PIECE}
    if found != want:
        raise ValueError(f"{model_file}: special pieces {found} are not Yi's {want}")


def _tokenizer_json(model_file: Path, out: Path) -> bool:
    """Write transformers' exact conversion of the SentencePiece model; False without transformers."""
    try:
        from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter
    except ImportError:
        return False
    extractor = SentencePieceExtractor(str(model_file))
    vocab = extractor.extract(None)["vocab"]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto=extractor.proto, vocab=vocab, legacy=True)
    backend.save(str(out))
    return True


def write_hf_tokenizer(
    model_file: str | Path, out_dir: str | Path, *, model_max_length: int, log: Callable[[str], None] = print
) -> list[str]:
    """Write the tokenizer files for ``model_file`` into ``out_dir``; returns the names written."""
    model_file, out_dir = Path(model_file), Path(out_dir)
    _check_special_pieces(model_file)
    shutil.copy2(model_file, out_dir / "tokenizer.model")
    specials = {"bos_token": BOS_PIECE, "eos_token": EOS_PIECE, "unk_token": UNK_PIECE}
    config: dict = {
        "tokenizer_class": "LlamaTokenizer",
        **specials,
        "pad_token": UNK_PIECE,  # as Yi's release: batches pad with <unk> (id 0)
        "add_bos_token": False,
        "add_eos_token": False,
        # SentencePiece never reads "<|endoftext|>" in text as the EOS id; neither does this.
        "split_special_tokens": True,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "sp_model_kwargs": {},
    }
    written = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    if _add_dummy_prefix(model_file):
        if _tokenizer_json(model_file, out_dir / "tokenizer.json"):
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            written.append("tokenizer.json")
        else:
            config["add_prefix_space"] = True
            log(
                "note: transformers is not installed, so no tokenizer.json was written; transformers 5's "
                "LlamaTokenizer will encode text that starts with a space differently from SentencePiece"
            )
    else:
        config["add_prefix_space"] = False
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return written


def find_tokenizer(directory: Path) -> Path | None:
    path = Path(directory) / "tokenizer.model"
    return path if path.is_file() else None


__all__ = ["write_hf_tokenizer", "find_tokenizer", "TOKENIZER_FILES"]
