"""Hugging Face tokenizers behind jaxllm's tokenizer interface.

`HFTokenizer` wraps a `tokenizers.Tokenizer` (the Rust library `transformers` uses for every "fast"
tokenizer) and offers the members of `jaxllm.data.tokenizer.Tokenizer` that data builders, the
sampler and the CLI use (`encode`, `encode_batch_arrays`, `decode`, the special ids, `fingerprint`).
Token ids equal `transformers.AutoTokenizer.from_pretrained(dir).encode(text,
add_special_tokens=False)`; `encode(text, add_special_tokens=True)` equals the
`add_special_tokens=True` ids (bos / eos per `add_bos` / `add_eos`).

**Folders** (`HFTokenizer.load`), as `transformers` 5 reads them:
- `tokenizer.json`: the serialized `tokenizers.Tokenizer`, used as it is. (transformers rebuilds
  the backend of some model-specific classes, e.g. `LlamaTokenizer`, from the vocabulary and
  merges of tokenizer.json with its own pre-tokenizer; for the files it writes itself and those of
  `save`, `tokenizer_class` is `PreTrainedTokenizerFast` and the file is used as it is, as here.)
- `tokenizer_config.json` (optional): the special tokens (`bos_token`, `eos_token`, `unk_token`,
  `pad_token`, ... as strings or `{"content": ...}` objects), `add_bos_token` / `add_eos_token`,
  `chat_template` (a string, or a list of `{"name", "template"}` of which "default" is used),
  `clean_up_tokenization_spaces`, `legacy`, `add_prefix_space`. A `chat_template.jinja` file beside
  it takes precedence over the config's `chat_template`; `special_tokens_map.json` fills special
  tokens the config lacks.
- `tokenizer.model` alone (no tokenizer.json; Llama-2 style): the SentencePiece model proto is
  converted the way transformers' `LlamaTokenizer` converts it: the pieces' ids as a BPE vocabulary,
  merges generated from it (`generate_merges`), byte fallback, no normalizer, a `Metaspace`
  pre-tokenizer (prepend scheme "first"; "always" with `legacy: true`; "never" with
  `add_prefix_space: false`), control pieces as special added tokens and user-defined pieces as
  plain added tokens.

Named special tokens are made special added tokens of the backend when they are not already added
tokens (as transformers does), so their text in an input string encodes to their id.

**Special ids.** `bos_id`, `eos_id`, `unk_id` are -1 when the tokenizer has no such token. `pad_id`
is the pad token's id; without one it falls back to `eos_id`, then 0 (training masks never compare
ids, so the fallback only fills padding).

**bos / eos flags.** With tokenizer.json, `add_bos` / `add_eos` are read off its post-processor (by
encoding a probe with and without special tokens): transformers 5 drops the config's
`add_bos_token` / `add_eos_token` when tokenizer.json exists. With tokenizer.model alone they are
the config's `add_bos_token` / `add_eos_token` (False when missing, as in transformers 5). Other
post-processors (BERT's `[CLS] ... [SEP]`) are not reproduced: `encode(..., add_special_tokens=True)`
adds bos / eos only. `save` writes the flags both ways (the post-processor and the config keys).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers, processors

from jaxllm import fs
from jaxllm.data.tokenizer import MissingPieceError, sentinel_piece
from jaxllm.hub import HubError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SENTENCEPIECE_MODEL = "tokenizer.model"
# The named special tokens transformers passes to chat templates (`special_tokens_map`), in order.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")
# tokenizer_config.json keys kept in `extra` and written back by `save`.
_KEPT_CONFIG_KEYS = ("sep_token", "cls_token", "mask_token", "model_max_length", "padding_side",
                     "clean_up_tokenization_spaces", "additional_special_tokens", "extra_special_tokens")
_SP_CONTROL, _SP_USER_DEFINED = 3, 4  # sentencepiece_model.proto piece types


def _token_text(value: Any) -> str | None:
    """A special token from a config: a string, or an AddedToken object `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A `tokenizers.Tokenizer` with transformers' special-token settings (module docstring).

    Attributes:
      tok: The backend. Its post-processor is left as loaded; `encode` does not use it.
      path: Folder or file it came from, for messages.
      vocab_size: Number of ids, added tokens included (`tok.get_vocab_size(with_added_tokens=True)`).
      bos_token, eos_token, pad_token, unk_token: Token strings, or None.
      bos_id, eos_id, unk_id: Their ids; -1 when absent. pad_id: see the module docstring.
      add_bos, add_eos: Whether `encode(..., add_special_tokens=True)` adds bos / eos.
      chat_template: The jinja chat template source, or None.
      extra: Other tokenizer_config.json settings (sep/cls/mask tokens, model_max_length, ...).
      num_sentinels: How many T5 `<extra_id_i>` tokens exist (i = 0, 1, ...).
      fingerprint: sha256 (hex) of the serialized backend (without its post-processor) and the
        special-token settings; identifies the vocabulary in caches.
      model_type: "hf". markers: {} (no jaxllm role markers).
    """

    model_type = "hf"

    def __init__(self, tok: tokenizers.Tokenizer, *, path: str, bos_token: str | None,
                 eos_token: str | None, pad_token: str | None, unk_token: str | None, add_bos: bool,
                 add_eos: bool, chat_template: str | None, extra: dict | None = None):
        """Raises:
          HubError: add_bos / add_eos set without a bos / eos token in the vocabulary.
        """
        self.tok = tok
        self.path = str(path)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.extra = dict(extra or {})
        self.chat_template = chat_template or None
        self.markers: dict[str, str] = {}
        specials = [t for t in (*self.special_tokens_map.values(), *self._extra_special_tokens()) if t]
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        missing = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)
                   if t not in added]
        if missing:  # transformers makes every named special token a special added token
            tok.add_special_tokens(missing)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.unk_id = (self._id(t) for t in (bos_token, eos_token, unk_token))
        pad = self._id(pad_token)
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id >= 0 else 0)
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        for flag, tid, name in ((self.add_bos, self.bos_id, "bos"), (self.add_eos, self.eos_id, "eos")):
            if flag and tid < 0:
                raise HubError(f"{self.path}: add_{name}_token is set but the tokenizer has no {name} token")
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        n = 0
        while tok.token_to_id(sentinel_piece(n)) is not None:
            n += 1
        self.num_sentinels = n
        self.fingerprint = hashlib.sha256(self._canonical().encode("utf-8")).hexdigest()

    # -- properties ---------------------------------------------------------------------------

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, as transformers' `special_tokens_map` (what chat
        templates see as `bos_token`, `eos_token`, ...)."""
        values = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                  "pad_token": self.pad_token}
        values.update({k: _token_text(self.extra.get(k)) for k in ("sep_token", "cls_token", "mask_token")})
        return {k: values[k] for k in SPECIAL_TOKEN_KEYS if values.get(k)}

    def _extra_special_tokens(self) -> list[str]:
        out = []
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = self.extra.get(key) or []
            items = value.values() if isinstance(value, dict) else value
            out += [t for t in map(_token_text, items) if t]
        return out

    def _id(self, token: str | None) -> int:
        i = self.tok.token_to_id(token) if token else None
        return -1 if i is None else int(i)

    def _canonical(self) -> str:
        backend = json.loads(self.tok.to_str())
        backend.pop("post_processor", None)  # replaced by `save`; the flags below stand for it
        settings = [self.special_tokens_map, self.add_bos, self.add_eos, backend]
        return json.dumps(settings, sort_keys=True, ensure_ascii=False)

    # -- the jaxllm tokenizer interface ------------------------------------------------------

    def role_id(self, role: str) -> int:
        """Always raises: Hugging Face tokenizers have no jaxllm role markers.

        Raises:
          MissingPieceError: (a KeyError) for every role.
        """
        raise MissingPieceError(f"tokenizer {self.path} is a Hugging Face tokenizer: it has no jaxllm "
                                f"{role} marker (its chat template is `chat.template_for(tokenizer)`)")

    def sentinel_id(self, i: int) -> int:
        """Id of `<extra_id_i>`.

        Raises:
          IndexError: `i` is not in `[0, num_sentinels)`.
        """
        if not 0 <= i < self.num_sentinels:
            raise IndexError(f"sentinel {i} out of range: tokenizer {self.path} has {self.num_sentinels}")
        return int(self.tok.token_to_id(sentinel_piece(i)))

    def _with_specials(self, ids: list[int]) -> list[int]:
        return [self.bos_id] * self.add_bos + ids + [self.eos_id] * self.add_eos

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`: `AutoTokenizer.encode(text, add_special_tokens=...)`.

        Special tokens' text inside `text` (e.g. `<|im_end|>`) encodes to their ids, as in
        transformers. With `add_special_tokens`, bos / eos are added per `add_bos` / `add_eos`.
        """
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return self._with_specials(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0,
                     add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` of each text, in parallel (tokenizers' Rayon pool: `RAYON_NUM_THREADS`; the
        `num_threads` argument of the SentencePiece interface is ignored)."""
        del num_threads
        out = [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]
        return [self._with_specials(ids) for ids in out] if add_special_tokens else out

    def encode_batch_arrays(self, texts: Sequence[str], num_threads: int = 0) -> list[np.ndarray]:
        """As `encode_batch` (no special tokens added), as int32 arrays `[num_tokens_i]`."""
        return [np.asarray(ids, np.int32) for ids in self.encode_batch(texts, num_threads)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids` as `AutoTokenizer.decode(ids)`: special tokens are kept (the sampler cuts
        at its stop ids itself). Ids outside `[0, vocab_size)` (e.g. -1 padding) are dropped.
        transformers' `clean_up_tokenization_spaces` is applied for non-BPE models only (it
        ignores it for BPE)."""
        keep = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self.vocab_size]
        text = self.tok.decode(keep, skip_special_tokens=False)
        if self.extra.get("clean_up_tokenization_spaces") and type(self.tok.model).__name__ != "BPE":
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                                  (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                                  (" 're", "'re")):
                text = text.replace(before, after)
        return text

    # -- files --------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HFTokenizer:
        """Loads a Hugging Face tokenizer folder (module docstring).

        Raises:
          HubError: no folder, neither tokenizer.json nor tokenizer.model, malformed JSON or a file
            the libraries reject (naming the file), add_bos/eos_token without that token.
        """
        directory = fs.path(directory)  # local or gs:// (a run's tokenizer/)
        if not directory.is_dir():
            raise HubError(f"{directory}: tokenizer folder not found")
        config = _read_json(directory / TOKENIZER_CONFIG)
        for key, value in _read_json(directory / SPECIAL_TOKENS_MAP).items():
            config.setdefault(key, value)
        if (directory / TOKENIZER_JSON).is_file():
            try:
                tok = tokenizers.Tokenizer.from_str((directory / TOKENIZER_JSON).read_text(encoding="utf-8"))
            except Exception as e:  # the Rust library raises a bare Exception
                raise HubError(f"{directory / TOKENIZER_JSON}: not a tokenizers file: {e}") from None
            proto = None
        elif (directory / SENTENCEPIECE_MODEL).is_file():
            tok, proto = sentencepiece_tokenizer(directory / SENTENCEPIECE_MODEL, config)
        else:
            raise HubError(f"{directory}: no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL}")
        specials = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        if proto is not None:  # the model's own pieces where the config names none (as transformers)
            spec = proto.trainer_spec
            for key, tid, piece in (("bos_token", spec.bos_id, spec.bos_piece),
                                    ("eos_token", spec.eos_id, spec.eos_piece),
                                    ("unk_token", spec.unk_id, spec.unk_piece)):
                if specials[key] is None and tid >= 0:
                    specials[key] = piece
        if specials["pad_token"] is None and tok.padding is not None:
            specials["pad_token"] = tok.padding.get("pad_token")
        if proto is not None:
            add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
        else:  # transformers 5 ignores the config's flags when tokenizer.json exists
            add_bos, add_eos = _post_processor_flags(tok, specials["bos_token"], specials["eos_token"])
        extra = {k: config[k] for k in _KEPT_CONFIG_KEYS if config.get(k) is not None}
        return cls(tok, path=os.fspath(directory), bos_token=specials["bos_token"],
                   eos_token=specials["eos_token"], pad_token=specials["pad_token"],
                   unk_token=specials["unk_token"], add_bos=add_bos and specials["bos_token"] is not None,
                   add_eos=add_eos and specials["eos_token"] is not None,
                   chat_template=_chat_template(directory, config), extra=extra)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json into `directory` (created).

        `AutoTokenizer.from_pretrained(directory)` gives the same ids, decode and chat template:
        `tokenizer_class` is `PreTrainedTokenizerFast` (the file is used as it is), the flags are
        explicit and the post-processor of tokenizer.json is the bos/eos template they imply.
        """
        directory = fs.path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tok = copy.deepcopy(self.tok)
        tok.post_processor = self._post_processor()
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "add_bos_token": self.add_bos, "add_eos_token": self.add_eos,
                                  "clean_up_tokenization_spaces": False, **self.extra}
        config.update({k: getattr(self, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                       if getattr(self, k) is not None})
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / TOKENIZER_JSON).write_text(tok.to_str(pretty=True), encoding="utf-8")
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")

    def _post_processor(self) -> processors.TemplateProcessing:
        """transformers' `update_post_processor`: `[bos] $A [eos]` per the flags."""
        bos = [f"{self.bos_token}:0"] if self.add_bos else []
        eos = [f"{self.eos_token}:0"] if self.add_eos else []
        special = ([(self.bos_token, self.bos_id)] if self.add_bos else []) + (
            [(self.eos_token, self.eos_id)] if self.add_eos else [])
        pair = bos + ["$A:0"] + eos + [s.replace(":0", ":1") for s in bos] + ["$B:1"] + [
            s.replace(":0", ":1") for s in eos]
        return processors.TemplateProcessing(single=" ".join(bos + ["$A:0"] + eos), pair=" ".join(pair),
                                             special_tokens=special)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _read_json(path: os.PathLike) -> dict:
    """A JSON object file, or {} when the file does not exist.

    Raises:
      HubError: malformed JSON or not an object.
    """
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise HubError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _chat_template(directory: os.PathLike, config: Mapping) -> str | None:
    """chat_template.jinja, else the config's `chat_template` (a named list: its "default").

    Raises:
      HubError: a chat_template that is neither a string nor a list of {"name", "template"}.
    """
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t for t in value):
        named = {t["name"]: t["template"] for t in value}
        return named.get("default")
    raise HubError(f"{directory / TOKENIZER_CONFIG}: chat_template is {type(value).__name__}, not a string "
                   "or a list of {\"name\", \"template\"}")


def _post_processor_flags(tok: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> tuple[bool, bool]:
    """Whether the backend's own post-processor adds bos / eos (encoding a probe both ways)."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    bos_id = tok.token_to_id(bos) if bos else None
    eos_id = tok.token_to_id(eos) if eos else None
    add_bos = bos_id is not None and len(full) > len(plain) and full[0] == bos_id
    add_eos = eos_id is not None and len(full) > len(plain) and full[-1] == eos_id
    return add_bos, add_eos


def generate_merges(vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split `(left, right)` of a piece into two pieces
    of the vocabulary, ordered by the id of the merged piece, then by the lengths of left and right
    (transformers' `generate_merges` without scores, which its `LlamaTokenizer` uses for
    tokenizer.model). Splits of one piece are ordered by the ids of their halves first."""
    merges = []
    for piece, rank in vocab.items():
        local = [(piece[:k], piece[k:], rank) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


def sentencepiece_tokenizer(path: os.PathLike, config: Mapping) -> tuple[tokenizers.Tokenizer, Any]:
    """A `tokenizers.Tokenizer` from a SentencePiece `tokenizer.model`, as transformers'
    `LlamaTokenizer` builds it (module docstring), and the parsed model proto.

    Args:
      path: The `.model` file.
      config: tokenizer_config.json (`legacy`, `add_prefix_space`, `tokenizer_class`).

    Raises:
      HubError: not a SentencePiece model, or a `tokenizer_class` other than a Llama tokenizer
        (whose conversion differs: give its tokenizer.json).
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2  # noqa: PLC0415

    cls_name = str(config.get("tokenizer_class") or "LlamaTokenizer").removesuffix("Fast")
    if cls_name not in ("LlamaTokenizer", "CodeLlamaTokenizer"):
        raise HubError(f"{path}: only Llama-style tokenizer.model files are converted (tokenizer_class "
                       f"{config.get('tokenizer_class')!r}); give the folder's tokenizer.json")
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise HubError(f"{path}: not a SentencePiece model: {e}") from None
    if not proto.pieces:
        raise HubError(f"{path}: not a SentencePiece model (no pieces)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=generate_merges(vocab),
                                                     fuse_unk=True, byte_fallback=True, dropout=None))
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else []))
    added = [AddedToken(p.piece, special=p.type == _SP_CONTROL, normalized=False)
             for p in proto.pieces if p.type in (_SP_CONTROL, _SP_USER_DEFINED)]
    tok.add_tokens(added)
    return tok, proto
