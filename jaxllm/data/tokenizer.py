"""SentencePiece tokenizer: training with jaxllm's id layout, loading, encoding.

Id layout of a model trained here (`V` = vocab size, `N` = `num_sentinels`):

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)       pad != eos (masks never compare ids)
    4..7      role markers system, user, assistant, end of turn (user-defined: atomic in text)
    8         "\\n" as a user-defined piece, only when byte_fallback is off (else it is <0x0A>)
    ...       the 256 byte pieces <0x00>..<0xFF> (byte_fallback) and the learned pieces
    ...       <unused_k> pieces, so that V is a multiple of 128 (TPU lane width)
    V-N..V-1  sentinels <extra_id_{N-1}> ... <extra_id_0>: counted down from the end, as T5

Normalisation is LLaMA-style and lossless: identity rule, no whitespace collapsing, digits split,
whitespace-only pieces allowed (indentation becomes one piece). `add_dummy_prefix` is off: with it
SentencePiece prepends a space to every encoded string, so `decode(encode(a) + encode(b))` gains a
space between `a` and `b` and a document starting with a newline gets a stray `▁` piece; without
it `decode(encode(text)) == text` for any text the model covers (always, with byte fallback) and
encodings concatenate. Training sees documents split into lines, so no piece spans a line end;
a newline is one token (`<0x0A>` with byte fallback, else the user-defined `"\\n"`).

The `word` model type is for whitespace-pretokenized text, not code: its pieces are whole `▁word`s,
so a word at the start of a line (no `▁` before it) or missing from the vocabulary falls back to
bytes, *including* the bytes of SentencePiece's `▁` meta symbol, which decode literally - `word`
is not lossless. Its trainer also adds a `▁marker` piece after each role marker, so the markers
are not at ids 4..7 (they are still atomic).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from jaxllm import fs
from jaxllm.config import ConfigError
from jaxllm.data import sources

logger = logging.getLogger(__name__)

MODEL_TYPES = ("bpe", "unigram", "char", "word")
ROLES = ("system", "user", "assistant", "end_of_turn")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Vocabulary rounded up to a multiple of 128: the TPU lane width (and a friendly size for GPU
# matmul tiles), so the embedding and logits shard and tile evenly.
VOCAB_MULTIPLE = 128
# SentencePiece's own default (bytes); longer training lines are cut into chunks of at most this.
MAX_SENTENCE_BYTES = 4192
TOKENIZER_FILE = "tokenizer.model"
_SPM_SEED = 0  # Fixed seed of the line sampling and of SentencePiece, so training is reproducible.


def default_config() -> ml_collections.ConfigDict:
    """The `tokenizer` section of run configs."""
    c = ml_collections.ConfigDict()
    c.model_type = "bpe"  # "bpe" | "unigram" | "char" | "word"
    # Size of the whole vocabulary (specials, roles, learned pieces, sentinels) before rounding up
    # to a multiple of 128. An upper bound: a small corpus may give fewer learned pieces.
    c.vocab_size = 8192
    c.byte_fallback = True
    c.character_coverage = 0.9995  # `char` models use 1.0: every character is its own piece
    c.input_sentence_size = 1_000_000  # lines sampled to train SentencePiece (0 = all)
    c.sources = ""  # training corpus as a source mixture string; "" = use data.sources
    c.model_path = ""  # load this existing .model instead of training
    c.num_sentinels = 100  # T5 <extra_id_i> tokens
    # Role markers of the chat template (system, user, assistant, end of turn):
    c.system_marker = "<|system|>"
    c.user_marker = "<|user|>"
    c.assistant_marker = "<|assistant|>"
    c.end_of_turn_marker = "<|end|>"
    return c


def role_markers(config: ml_collections.ConfigDict | None = None) -> dict[str, str]:
    """Maps each of `ROLES` to its marker string, from a tokenizer config (default markers)."""
    config = config if config is not None else default_config()
    return {role: str(config[f"{role}_marker"]) for role in ROLES}


def sentinel_piece(i: int) -> str:
    """The text of sentinel `i`: `<extra_id_i>`."""
    return f"<extra_id_{i}>"


def padded_vocab_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Rounds `n` (ids) up to a multiple of `multiple` (128 = TPU lane width).

    Raises:
      ValueError: `n < 0` or `multiple < 1`.
    """
    if n < 0 or multiple < 1:
        raise ValueError(f"padded_vocab_size needs n >= 0 and multiple >= 1, got {n}, {multiple}")
    return -(-n // multiple) * multiple


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used (not a SentencePiece model)."""


class MissingPieceError(KeyError):
    """The model lacks a special piece (role marker); an external model may have none."""

    def __str__(self) -> str:  # KeyError would quote the message.
        return str(self.args[0])


class Tokenizer:
    """Wraps a `sentencepiece.SentencePieceProcessor`.

    Attributes:
      sp: The processor.
      path: File the model was loaded from.
      vocab_size: Number of ids (`sp.get_piece_size()`), padding and sentinels included.
      pad_id, unk_id, bos_id, eos_id: Special ids; -1 when the model has no such piece (possible
        for external models).
      num_sentinels: How many `<extra_id_i>` pieces exist (i = 0, 1, ...); 0 for most external
        models.
      fingerprint: sha256 (hex) of the serialized model; identifies the vocabulary in caches.
      model_type: "bpe" | "unigram" | "char" | "word", from the model's trainer spec.
      markers: Role -> marker text used by `role_id`.
    """

    def __init__(self, sp: spm.SentencePieceProcessor, path: str, markers: Mapping[str, str]):
        self.sp = sp
        self.path = path
        self.markers = dict(markers)
        self.vocab_size = sp.get_piece_size()
        self.pad_id, self.unk_id = sp.pad_id(), sp.unk_id()
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        serialized = sp.serialized_model_proto()
        self.fingerprint = hashlib.sha256(serialized).hexdigest()
        self.model_type = model_pb2.TrainerSpec.ModelType.Name(
            _parse(serialized).trainer_spec.model_type
        ).lower()
        n = 0
        while self._piece_id(sentinel_piece(n)) is not None:
            n += 1
        self.num_sentinels = n

    @classmethod
    def load(cls, path: str | os.PathLike, markers: Mapping[str, str] | None = None) -> Tokenizer:
        """Loads a `.model` file.

        Args:
          path: A SentencePiece model file (ours or any other).
          markers: Role -> marker text (`role_markers(config)`); default markers when None.

        Raises:
          FileNotFoundError: no file at `path`.
          TokenizerError: (a ValueError) the file is not a SentencePiece model.
        """
        file = fs.path(path)
        path = os.fspath(path)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(file.read_bytes())  # local or gs:// (a run's tokenizer/)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model: {e}") from None
        return cls(sp, path, markers if markers is not None else role_markers())

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def role_id(self, role: str) -> int:
        """Id of the marker of `role` ("system" | "user" | "assistant" | "end_of_turn").

        Raises:
          ValueError: unknown role.
          MissingPieceError: (a KeyError) the model has no piece for the marker.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        i = self._piece_id(self.markers[role])
        if i is None:
            raise MissingPieceError(
                f"tokenizer {self.path} has no piece for the {role} marker "
                f"{self.markers[role]!r} (an external model without jaxllm's role markers?)"
            )
        return i

    def sentinel_id(self, i: int) -> int:
        """Id of `<extra_id_i>` (`vocab_size - 1 - i` for models trained here).

        Raises:
          IndexError: `i` is not in `[0, num_sentinels)`.
        """
        if not 0 <= i < self.num_sentinels:
            raise IndexError(
                f"sentinel {i} out of range: tokenizer {self.path} has {self.num_sentinels}"
            )
        return self.sp.piece_to_id(sentinel_piece(i))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """Token ids of each text (SentencePiece's multithreaded batch encode), no bos/eos.

        Args:
          texts: Strings to encode.
          num_threads: Encoding threads; 0 = one per CPU (SentencePiece's default).
        """
        return self.sp.encode(list(texts), num_threads=num_threads or -1)

    def encode_batch_arrays(self, texts: Sequence[str], num_threads: int = 0) -> list[np.ndarray]:
        """As `encode_batch`, as int32 arrays `[num_tokens_i]` (no Python int lists)."""
        return self.sp.encode(list(texts), num_threads=num_threads or -1, return_type="numpy")

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; ids outside `[0, vocab_size)` and the pad id are dropped."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.pad_id]
        return self.sp.decode(keep)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _training_lines(texts: Iterable[str], counts: dict) -> Iterator[str]:
    """Documents -> non-blank lines of at most MAX_SENTENCE_BYTES bytes (long lines are cut).

    An exception raised by `texts` (e.g. a DataError) is kept in `counts["error"]`: SentencePiece
    turns it into a RuntimeError string, and the caller re-raises the original.
    """
    try:
        yield from _lines(texts, counts)
    except Exception as e:
        counts["error"] = e
        raise


def _lines(texts: Iterable[str], counts: dict) -> Iterator[str]:
    # 4 bytes is the longest UTF-8 character, so this many characters always fit.
    chunk = MAX_SENTENCE_BYTES // 4
    for doc in texts:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            if len(line) <= chunk or len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                counts["lines"] += 1
                yield line
            else:
                counts["cut"] += 1
                for k in range(0, len(line), chunk):
                    counts["lines"] += 1
                    yield line[k : k + chunk]


def sample_lines(lines: Iterable[str], k: int, seed: int = _SPM_SEED) -> list[str]:
    """A uniform sample of `k` lines (all of them when there are at most `k`; `k` = 0: all).

    Reservoir sampling (Vitter 1985, Algorithm R) with a seeded `random.Random`, so the sample, and
    with it the trained tokenizer, is a pure function of the corpus. SentencePiece's own
    `input_sentence_size` sampling is not: its generator seed does not reach the sampler on the
    `sentence_iterator` path, and two trainings on the same corpus gave different models. Lines
    keep their corpus order.
    """
    if k <= 0:
        return list(lines)
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        if i < k:
            reservoir.append((i, line))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                reservoir[j] = (i, line)
    return [line for _, line in sorted(reservoir)]


def _trainer_options(config: ml_collections.ConfigDict) -> dict:
    model_type = str(config.model_type)
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"tokenizer.model_type={model_type!r}; expected one of {MODEL_TYPES}")
    markers = list(role_markers(config).values())
    user_symbols = markers + ([] if config.byte_fallback else ["\n"])
    fixed = 4 + len(user_symbols) + (256 if config.byte_fallback else 0)
    trainer_vocab = int(config.vocab_size) - int(config.num_sentinels)
    if trainer_vocab <= fixed:
        raise ConfigError(
            f"tokenizer.vocab_size={config.vocab_size} leaves no room for learned pieces: "
            f"{config.num_sentinels} sentinels + {fixed} special/role/byte pieces"
        )
    return dict(
        model_type=model_type,
        vocab_size=trainer_vocab,
        # An upper bound, not an error, when the corpus is small (and for char/word models).
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        user_defined_symbols=user_symbols,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=bool(config.byte_fallback),
        character_coverage=1.0 if model_type == "char" else float(config.character_coverage),
        input_sentence_size=0,  # `sample_lines` samples (reproducibly) before SentencePiece sees them
        shuffle_input_sentence=False,
        max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=len(os.sched_getaffinity(0)),
        minloglevel=1,  # warnings and errors only
    )


def _add_padding_and_sentinels(serialized: bytes, num_sentinels: int) -> bytes:
    """Appends UNUSED pieces up to a multiple of 128, then the sentinels, last id first."""
    model = model_pb2.ModelProto()
    model.ParseFromString(serialized)
    base = len(model.pieces)
    total = padded_vocab_size(base + num_sentinels)
    added = [f"<unused_{k}>" for k in range(total - base - num_sentinels)]
    sentinels = [sentinel_piece(i) for i in reversed(range(num_sentinels))]
    clash = {p.piece for p in model.pieces} & set(added + sentinels)
    if clash:
        raise ValueError(f"learned pieces collide with reserved piece names: {sorted(clash)}")
    for piece in added:
        model.pieces.add(piece=piece, score=0.0, type=model_pb2.ModelProto.SentencePiece.UNUSED)
    for piece in sentinels:
        model.pieces.add(
            piece=piece, score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED
        )
    model.trainer_spec.vocab_size = total
    return model.SerializeToString()


def _check_layout(tok: Tokenizer, num_sentinels: int) -> None:
    """Verifies the edited model: size, special ids, atomic sentinels and role markers."""
    problems = []
    if tok.vocab_size % VOCAB_MULTIPLE:
        problems.append(f"vocab size {tok.vocab_size} is not a multiple of {VOCAB_MULTIPLE}")
    if (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        problems.append("special ids are not pad=0, unk=1, bos=2, eos=3")
    if tok.num_sentinels != num_sentinels:
        problems.append(f"{tok.num_sentinels} sentinels, expected {num_sentinels}")
    for i in {0, min(3, num_sentinels - 1), num_sentinels - 1} if num_sentinels else ():
        if tok.encode(sentinel_piece(i)) != [tok.vocab_size - 1 - i]:
            problems.append(f"{sentinel_piece(i)} does not encode to id {tok.vocab_size - 1 - i}")
    for k, role in enumerate(ROLES):
        # The word trainer adds a "▁marker" piece after each marker, so only the first is at 4.
        expected = tok.role_id(role) if tok.model_type == "word" else 4 + k
        if tok.encode(tok.markers[role]) != [expected]:
            problems.append(f"{role} marker {tok.markers[role]!r} does not encode to id {expected}")
    if problems:
        raise RuntimeError(f"edited SentencePiece model is inconsistent: {'; '.join(problems)}")


def train_tokenizer(
    config: ml_collections.ConfigDict, texts: Iterable[str], out_path: str | os.PathLike
) -> Tokenizer:
    """Trains a SentencePiece model on documents and writes it to `out_path` atomically.

    Documents are split into lines (blank lines dropped; lines over 4192 bytes cut into chunks),
    sampled (`sample_lines`: `input_sentence_size` of them, seeded) and passed to SentencePiece. Nothing but the final
    model touches disk. See the module docstring for the id layout.

    Args:
      config: The `tokenizer` section (`default_config()`).
      texts: Documents (strings).
      out_path: Where the `.model` file goes (parent directories are created).

    Returns:
      The loaded tokenizer; `vocab_size` is a multiple of 128.

    Raises:
      ValueError: bad model type, a vocab_size too small for the special pieces, no training
        text, or SentencePiece rejecting the options/corpus.
    """
    out_path = fs.path(out_path)
    options = _trainer_options(config)
    counts = {"lines": 0, "cut": 0}
    model = _BytesWriter()
    start = time.perf_counter()
    spm.set_random_generator_seed(_SPM_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample_lines(_training_lines(texts, counts), int(config.input_sentence_size))),
            model_writer=model, **options
        )
    except RuntimeError as e:
        if counts.get("error") is not None:
            raise counts["error"] from None
        if not counts["lines"]:
            raise ValueError("tokenizer training corpus has no non-blank lines") from None
        raise ValueError(
            f"SentencePiece training failed ({options['model_type']}, "
            f"vocab_size={options['vocab_size']}): {e}"
        ) from None
    trained_size = len(_parse(model.data).pieces)
    serialized = _add_padding_and_sentinels(model.data, int(config.num_sentinels))
    fs.write_atomic(out_path, serialized)
    tok = Tokenizer.load(out_path, role_markers(config))
    _check_layout(tok, int(config.num_sentinels))
    logger.info(
        "trained %s tokenizer in %.1f s: %d ids (%d trained incl. specials, %d unused, "
        "%d sentinels) from %d lines (%d long lines cut) -> %s",
        options["model_type"],
        time.perf_counter() - start,
        tok.vocab_size,
        trained_size,
        tok.vocab_size - trained_size - tok.num_sentinels,
        tok.num_sentinels,
        counts["lines"],
        counts["cut"],
        out_path,
    )
    return tok


class _BytesWriter:
    """The `model_writer` SentencePiece writes the serialized model to."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _parse(serialized: bytes) -> model_pb2.ModelProto:
    model = model_pb2.ModelProto()
    model.ParseFromString(serialized)
    return model


def load_or_train(config: ml_collections.ConfigDict, run_dir: str | os.PathLike) -> Tokenizer:
    """Returns the run's tokenizer, creating `RUN_DIR/tokenizer/tokenizer.model` once.

    In order: when the stage starts from a published checkpoint (`init_from` is `hf:` / `gguf:`), the
    checkpoint's own tokenizer and chat template, written to `RUN_DIR/tokenizer/` once (Hugging Face
    files, `jaxllm.data.hf_tokenizer`); else load the run's existing tokenizer (a run's tokenizer
    never changes once created); else copy `config.tokenizer.model_path` there and load it; else
    train on the documents of `config.tokenizer.sources or config.data.sources` (with
    `config.data_root`).

    Args:
      config: The whole run config (`tokenizer`, `data.sources`, optional `data_root`).
      run_dir: The run directory.

    Raises:
      FileNotFoundError / ValueError: as `Tokenizer.load` and `train_tokenizer`.
      sources.DataError: bad training sources.
      ConfigError: the run already has another tokenizer than the checkpoint of `init_from`.
    """
    tok_config = config.tokenizer
    markers = role_markers(tok_config)
    init_from = str(config.get("init_from", "") or "")
    from jaxllm.hub import spec as hub_spec  # noqa: PLC0415 - hub imports this module

    if hub_spec.is_external(init_from):
        return _model_tokenizer(init_from, fs.path(run_dir) / "tokenizer")
    path = fs.path(run_dir) / "tokenizer" / TOKENIZER_FILE
    if is_hf_tokenizer_dir(path.parent):
        return load_tokenizer(path.parent)
    if path.exists():
        tok = Tokenizer.load(path, markers)
        logger.info("using the run's tokenizer %s (%d ids)", path, tok.vocab_size)
        return tok
    if tok_config.model_path:
        external = Tokenizer.load(tok_config.model_path, markers)  # validate before copying
        fs.write_atomic(path, external.sp.serialized_model_proto())
        logger.info("copied tokenizer %s -> %s (%d ids)", external.path, path, external.vocab_size)
        return Tokenizer.load(path, markers)
    spec = tok_config.sources or config.data.sources
    data_root = str(config.get("data_root", "") or "")
    specs = sources.parse_sources(spec, data_root)
    stats = sources.SourceStats()
    tok = train_tokenizer(tok_config, sources.read_all_documents(specs, stats), path)
    logger.info(
        "tokenizer corpus %r: %d documents from %d files (skipped %d empty, %d undecodable)",
        spec,
        stats.documents,
        stats.files,
        stats.skipped_empty,
        stats.skipped_undecodable,
    )
    return tok


def load_tokenizer(directory: str | os.PathLike, markers: Mapping[str, str] | None = None):
    """The tokenizer in `directory`: a Hugging Face one (`jaxllm.data.hf_tokenizer.HFTokenizer`)
    when it holds `tokenizer.json` or `tokenizer_config.json`, else jaxllm's SentencePiece
    `Tokenizer` from `directory/tokenizer.model` (`directory` may also be that `.model` file).

    Args:
      directory: A tokenizer folder (a run's `tokenizer/`, a Hugging Face model folder) or a
        SentencePiece `.model` file.
      markers: Role markers of a SentencePiece tokenizer (`role_markers(config)`; default markers).

    Raises:
      jaxllm.hub.HubError: a Hugging Face folder that cannot be loaded (naming the file).
      FileNotFoundError / ValueError: as `Tokenizer.load`.
    """
    path = fs.path(directory)
    if path.is_file():
        return Tokenizer.load(path, markers)
    if is_hf_tokenizer_dir(path):
        from jaxllm.data.hf_tokenizer import HFTokenizer  # noqa: PLC0415 - it imports this module

        return HFTokenizer.load(path)
    return Tokenizer.load(path / TOKENIZER_FILE, markers)


def is_hf_tokenizer_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a Hugging Face tokenizer (`tokenizer.json` or `tokenizer_config.json`)
    rather than a jaxllm SentencePiece `tokenizer.model` alone."""
    directory = fs.path(directory)
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def _model_tokenizer(init_from: str, directory: os.PathLike):
    """The tokenizer of the checkpoint `init_from`, saved to the run's `directory` on first use
    (written whole or not at all: `fs.atomic_path`).

    Raises:
      ConfigError: `directory` already holds a different tokenizer (another model's, or one that
        jaxllm trained): the run's data caches and params belong to that one.
    """
    from jaxllm.hub import spec as hub_spec  # noqa: PLC0415

    model_tok = hub_spec.load_tokenizer(hub_spec.parse(init_from))
    if fs.dir_complete(directory):
        existing = load_tokenizer(directory)
        with tempfile.TemporaryDirectory() as staging:  # the checkpoint's tokenizer as the run would save it
            model_tok.save(staging)
            staged = load_tokenizer(staging)
        if existing.fingerprint != staged.fingerprint:
            raise ConfigError(f"{directory} holds another tokenizer ({existing.path}) than {init_from}'s: "
                              "start this model in a new --config.run_dir")
        return existing
    with fs.atomic_path(directory) as tmp:
        model_tok.save(tmp)
    tok = load_tokenizer(directory)
    logger.info("the run uses %s's tokenizer: %s (%d ids)", init_from, directory, tok.vocab_size)
    return tok
