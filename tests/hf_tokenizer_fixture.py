"""Small real tokenizers for the Hugging Face tokenizer and chat-template tests.

`byte_level_bpe` trains a GPT-2 style byte-level BPE (the `tokenizers` trainer) and writes a
Hugging Face folder (tokenizer.json + tokenizer_config.json); `sentencepiece_llama` trains a
SentencePiece BPE model with byte fallback and writes a Llama-2 style folder holding only
tokenizer.model + tokenizer_config.json. Both train in well under a second on a few KB of text.
"""

from __future__ import annotations

import io
import json
import pathlib

import jaxllm.data.chat
import jaxllm.data.tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def corpus() -> list[str]:
    """A few KB of text: jaxllm's chat and tokenizer modules, plus non-ASCII lines."""
    text = pathlib.Path(jaxllm.data.chat.__file__).read_text(encoding="utf-8")[:5000]
    text += pathlib.Path(jaxllm.data.tokenizer.__file__).read_text(encoding="utf-8")[:3000]
    lines = [line for line in text.split("\n") if line.strip()]
    return lines + ["Grüße aus Köln, naïve café, déjà vu.", "日本語のテキストと絵文字 🙂 も少し。",
                    "Tabs\tand  double  spaces, numbers 12345 and 3.14159."]


def byte_level_bpe(directory: pathlib.Path, config: dict, vocab_size: int = 700) -> pathlib.Path:
    """Trains a byte-level BPE (special tokens `SPECIAL_TOKENS`, ids 0..7) and writes
    `directory/tokenizer.json` and `directory/tokenizer_config.json` (`config`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return directory


def sentencepiece_llama(directory: pathlib.Path, config: dict, vocab_size: int = 600) -> pathlib.Path:
    """Trains a SentencePiece BPE model (unk 0, `<s>` 1, `</s>` 2, a user-defined `<|user|>`, byte
    fallback) and writes `directory/tokenizer.model` and `directory/tokenizer_config.json`."""
    import sentencepiece as spm  # noqa: PLC0415

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, user_defined_symbols=["<|user|>"], minloglevel=2, num_threads=1)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return directory
