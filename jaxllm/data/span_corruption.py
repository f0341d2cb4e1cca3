"""T5 span corruption and the UL2 mixture of denoisers, as a packed, resumable grain pipeline.

**Span corruption** (Raffel et al. 2020, section 3.1.4; `t5.data.preprocessors.span_corruption`).
A raw sequence of `n` tokens gets `num_noise = round(n * noise_density)` noise tokens (at least 1,
at most `n - 1`) in `num_spans = round(num_noise / mean_noise_span_length)` spans (at least 1).
Noise and non-noise counts are each cut into `num_spans` positive parts uniformly at random
(T5's `_random_segmentation`), and the parts alternate non-noise, noise, non-noise, ... so every
mask with these counts is equally likely (`random_spans_noise_mask`, `random_roll=False`). Each noise
span becomes one sentinel in the inputs; the targets are each sentinel followed by its span; both
get eos. Sentinel `k` is `<extra_id_k>` (`Tokenizer.sentinel_id(k)`, counted down from the end of the
vocabulary). Counts are computed in float32 with round-half-to-even, as T5's TensorFlow graph does.
`random_spans_helper` maps a target encoder length to the raw tokens to read and the targets length
(published: 512 -> 568 raw tokens, 114 targets).

    raw:     The  cat  sat  on   the  mat  today
    mask:    0    0    1    1    0    0    1
    inputs:  The  cat  <extra_id_0>  the  mat  <extra_id_1>  </s>
    targets: <extra_id_0>  sat  on  <extra_id_1>  today  </s>

**UL2** (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms", section 3.1.2). A mixture of
denoisers given as `data.denoisers`, e.g. `"R(3,0.15) R(8,0.15) X(3,0.5) X(8,0.5) X(64,0.15) X(64,0.5)
S(0.25)"`: `R(mu, r)` and `X(mu, r)` are span corruption with mean span `mu` and density `r`;
`S(r)` is sequential denoising (prefix LM): the last `round(n * r)` tokens (at least 1) are the
targets, the rest the inputs, no sentinels. Optional `@rate` after an entry weights it (default:
equal rates, as `ul2_objective(rates=None)` in the paper's appendix). With `data.mode_tokens` each
input starts with its paradigm token `[NLU]` (R), `[NLG]` (X) or `[S2S]` (S). The tokenizer has no
such pieces, so they are the three highest sentinels, never used for corruption:
`[NLU] = <extra_id_{N-1}>`, `[NLG] = <extra_id_{N-2}>`, `[S2S] = <extra_id_{N-3}>` for N sentinels.

**Pipeline** (`t5_dataset`). The corpus is tokenized once (`lm.tokenize_corpus`, no bos/eos: T5
appends eos per example) and cut into shuffled windows of `raw_length` tokens (`lm.PackedRows`, a
pure function of (seed, index)). Each document piece of a window (a segment) is corrupted on its
own (a `numpy` Generator seeded by (seed, stream, example index)), then the pieces are packed into
the encoder and decoder rows with matching segment ids (1, 2, ...; 0 = padding) and positions
restarting at 0, as t5x packs. **Unlike T5/t5x**, which concatenate documents before corrupting
(`merge_examples_to_reduce_padding`, so the noise is `noise_density` of the token stream), every
piece gets its own noise counts, sentinels and eos, with at least one noise token: a long piece
gets `noise_density`, a short one more (`round(n r)` is 0 for `n <= 3` at r = 0.15, so a 2-token
piece is 50% noise, a 4-token one 25%), and a window of many short documents spends a sentinel and
an eos per document. Filter out very short documents where the density matters. A one-document
window fills the rows exactly (`random_spans_helper` lengths); several pieces cost an eos each and per-piece rounding, so a piece that does not fit is
cut to its longest prefix whose (deterministic) corrupted lengths fit and the window's rest is
dropped. Each denoiser reads its own window stream (raw lengths differ); `grain.MapDataset.mix`
interleaves them deterministically, realising the rates exactly rather than iid as UL2's
`sample_from_datasets`. `lm._ProcessSlice` gives each process its rows of each global batch.

**Decoder-only prefix LM** (`format="prefix_lm"`, `data.format`): each piece becomes `inputs ++
targets` (with their eos) in one row of `seq_len + 1` tokens; the batch has `inputs, targets,
segment_ids, positions, loss_mask` (as `jaxllm.data.lm`) plus `prefix_mask` (1 on input positions
inside the corrupted inputs). The model must attend with `packing.prefix_lm_attention_mask`
(`llama.apply(..., prefix_mask=...)` does):
`mask[b, i, j] = seg[b, i] == seg[b, j] and (j <= i or (prefix[b, i] and prefix[b, j]))`:
bidirectional over each piece's prefix, causal after it. The loss covers only target tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data import lm
from jaxllm.data import packing
from jaxllm.data import sources

FORMATS = ("t5", "prefix_lm")
MODE_NAMES = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}
_MODE_OFFSET = {"R": 1, "X": 2, "S": 3}  # [NLU] = <extra_id_{N-1}>, [NLG] = N-2, [S2S] = N-3
UL2_DENOISERS = "R(3,0.15) R(8,0.15) X(3,0.5) X(8,0.5) X(64,0.15) X(64,0.5) S(0.25)"
_ENTRY = re.compile(r"\s*([RXS])\(\s*([^)]*?)\s*\)(?:@([^\s;]+))?\s*;?")


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of T5 / UL2 pretraining runs."""
    c = ml_collections.ConfigDict()
    c.sources = "stdlib:train"
    c.eval_sources = "stdlib:validation"
    c.inputs_length = 512  # encoder tokens per row (T5: 512)
    c.targets_length = 0  # decoder tokens per row; 0 = from random_spans_helper (T5: 114)
    c.noise_density = 0.15  # T5's r
    c.mean_noise_span_length = 3.0  # T5's mu
    c.denoisers = ""  # UL2 mixture (see the module docstring); "" = T5 span corruption with the above
    c.mode_tokens = True  # prepend [NLU]/[NLG]/[S2S] when `denoisers` is set
    c.format = "t5"  # "t5": encoder-decoder batches; "prefix_lm": decoder-only rows of inputs_length tokens
    c.cache_dir = ""  # "" = RUN_DIR/cache
    c.tokenize_threads = 0
    return c


# ---- T5's functions ------------------------------------------------------------------------------


def check_span_params(noise_density: float, mean_noise_span_length: float, where: str = "") -> None:
    """Raises `ConfigError` (a ValueError) naming the parameter when `noise_density` is outside (0, 1)
    or `mean_noise_span_length` < 1. `where` prefixes the names (e.g. "data." or a denoiser)."""
    if not 0.0 < noise_density < 1.0:
        raise ConfigError(f"{where}noise_density={noise_density} must be in (0, 1)")
    if not mean_noise_span_length >= 1.0:
        raise ConfigError(f"{where}mean_noise_span_length={mean_noise_span_length} must be >= 1")


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """`(num_noise_tokens, num_noise_spans)` of `random_spans_noise_mask` for `length >= 2` tokens.

    T5's float32 arithmetic: `num_noise = round(f32(length) * f32(r))` clipped to `[1, length-1]`,
    `num_spans = max(round(f32(num_noise) / f32(mu)), 1)`; `round` is half-to-even like `tf.round`.
    One deviation: `num_spans` is also capped at the non-noise count (`r > 0.5` with short spans),
    where T5's segmentation would fail.
    """
    length = max(int(length), 2)
    noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    noise = min(max(noise, 1), length - 1)
    spans = int(np.round(np.float32(noise) / np.float32(mean_noise_span_length)))
    return noise, min(max(spans, 1), length - noise)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """`num_segments` positive ints summing to `num_items`, every composition equally likely."""
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's `random_spans_noise_mask`: bool `[length]`, True = noise (see the module docstring).

    Spans alternate non-noise, noise, ..., starting with non-noise (so the last token is noise).
    A 1-token sequence is computed as 2 tokens and truncated, so it has no noise.
    """
    noise, spans = noise_counts(length, noise_density, mean_noise_span_length)
    full = max(length, 2)
    noise_lengths = _random_segmentation(noise, spans, rng)
    nonnoise_lengths = _random_segmentation(full - noise, spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    mask = np.repeat(np.tile([False, True], spans), interleaved)
    return mask[:length]


def _runs_to_unique_sentinels(tokens: np.ndarray, runs: np.ndarray, sentinel_ids: np.ndarray) -> np.ndarray:
    """T5's `noise_span_to_unique_sentinel`: each run of `runs` becomes one sentinel (k-th run:
    `sentinel_ids[k]`), the other tokens are kept."""
    prev = np.concatenate([[False], runs[:-1]])
    first = runs & ~prev
    k = np.cumsum(first) - 1
    if first.sum() > len(sentinel_ids):
        raise ValueError(f"{int(first.sum())} spans need more sentinels than the {len(sentinel_ids)} available")
    out = np.where(first, sentinel_ids[np.maximum(k, 0)], tokens)
    return out[~(runs & prev)]


def span_corrupt(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: np.ndarray,
                 eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of T5's span corruption for one sequence.

    Args:
      tokens: `[n]` int token ids.
      noise_mask: `[n]` bool from `random_spans_noise_mask`.
      sentinel_ids: int `[m]`; span `k` uses `sentinel_ids[k]` (`<extra_id_k>`).
      eos_id: appended to both.

    Returns:
      `(inputs, targets)` int32: noise spans replaced by sentinels (`noise_span_to_unique_sentinel`)
      and non-noise spans replaced by sentinels (`nonnoise_span_to_unique_sentinel`), each + eos.

    Raises:
      ValueError: more spans than `sentinel_ids`.
    """
    tokens = np.asarray(tokens, np.int32)
    sentinel_ids = np.asarray(sentinel_ids, np.int32)
    inputs = _runs_to_unique_sentinels(tokens, noise_mask, sentinel_ids)
    targets = _runs_to_unique_sentinels(tokens, ~noise_mask, sentinel_ids)
    eos = np.array([eos_id], np.int32)
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def random_spans_helper(inputs_length: int, noise_density: float, mean_noise_span_length: float,
                        extra_tokens_per_span_inputs: int = 1, extra_tokens_per_span_targets: int = 1
                        ) -> tuple[int, int]:
    """T5's `random_spans_helper`: `(tokens_length, targets_length)` for an encoder length.

    The largest raw length whose corrupted inputs (non-noise tokens, one sentinel per span, eos) fit
    `inputs_length`, and the length of its targets (noise tokens, one sentinel per span, eos).
    Python float arithmetic and T5's tweak for `noise_density == 0.5` (targets no longer than
    inputs). Published cases: (512, 0.15, 3.0) -> (568, 114); T5's `preprocessors_test.py`:
    (64, 0.2, 2.0) -> (70, 22) and (64, 0.2, 1.0) -> (63, 27).

    Raises:
      ConfigError: (a ValueError) bad `noise_density` / `mean_noise_span_length`.
    """
    check_span_params(noise_density, mean_noise_span_length)

    def lengths(tokens_length):
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        return (tokens_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1,
                num_noise + num_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def reconstruct(inputs: Sequence[int], targets: Sequence[int], sentinel_ids: Sequence[int],
                eos_id: int) -> list[list[int]]:
    """Splits corrupted `inputs` into chunks with each sentinel replaced by its span from `targets`.

    Returns a list of token chunks alternating kept text and filled spans (kept chunks at even
    indices); `sum(chunks, [])` is the original text when `targets` are the true targets. A sentinel
    with no span in `targets` is filled with nothing; eos ends both sequences.
    """
    ids = {int(s): k for k, s in enumerate(sentinel_ids)}

    cut = lambda seq: list(seq)[: list(seq).index(eos_id)] if eos_id in list(seq) else list(seq)

    spans: dict[int, list[int]] = {}
    current = None
    for t in cut(targets):
        if int(t) in ids:
            current = ids[int(t)]
            spans[current] = []
        elif current is not None:
            spans[current].append(int(t))
    chunks: list[list[int]] = [[]]
    for t in cut(inputs):
        if int(t) in ids:
            chunks += [spans.get(ids[int(t)], []), []]
        else:
            chunks[-1].append(int(t))
    return chunks


# ---- Denoisers -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One objective of the mixture.

    Attributes:
      kind: "R" or "X" (span corruption) or "S" (sequential: prefix LM).
      noise_density: r, the corrupted fraction (S: the fraction of targets).
      mean_noise_span_length: mu (span corruption only).
      rate: relative mixing weight.
      mode_token: prepend the paradigm token ([NLU], [NLG], [S2S]).
    """

    kind: str
    noise_density: float
    mean_noise_span_length: float = 1.0
    rate: float = 1.0
    mode_token: bool = False

    def counts(self, n: int) -> tuple[int, int, int, int]:
        """`(kept, targets, input_sentinels, target_sentinels)` token counts for a piece of `n`."""
        if self.kind == "S":
            t = min(max(int(round(n * self.noise_density)), 1), n - 1)
            return n - t, t, 0, 0
        if n == 1:  # T5: no noise; the one non-noise run still becomes a target sentinel
            return 1, 0, 0, 1
        noise, spans = noise_counts(n, self.noise_density, self.mean_noise_span_length)
        return n - noise, noise, spans, spans

    def lengths(self, n: int) -> tuple[int, int]:
        """`(inputs_length, targets_length)` of a corrupted piece of `n >= 1` raw tokens (with eos)."""
        kept, tgt, s_in, s_tg = self.counts(n)
        return int(self.mode_token) + kept + s_in + 1, tgt + s_tg + 1

    def corrupt(self, tokens: np.ndarray, rng: np.random.Generator, sentinel_ids: np.ndarray,
                mode_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
        """`(inputs, targets)` int32 of one piece (see the module docstring)."""
        tokens = np.asarray(tokens, np.int32)
        n = len(tokens)
        if self.kind == "S":
            split = n - self.counts(n)[1]
            inputs = np.concatenate([tokens[:split], [eos_id]]).astype(np.int32)
            targets = np.concatenate([tokens[split:], [eos_id]]).astype(np.int32)
        else:
            mask = random_spans_noise_mask(n, self.noise_density, self.mean_noise_span_length, rng)
            inputs, targets = span_corrupt(tokens, mask, sentinel_ids, eos_id)
        if self.mode_token:
            inputs = np.concatenate([[mode_id], inputs]).astype(np.int32)
        return inputs, targets

    def __str__(self) -> str:
        mu = "" if self.kind == "S" else f"{self.mean_noise_span_length:g},"
        return f"{self.kind}({mu}{self.noise_density:g})@{self.rate:g}"


def parse_denoisers(spec: str, mode_tokens: bool = True) -> list[Denoiser]:
    """Parses `data.denoisers`: `KIND(ARGS)[@RATE]` entries (`R(mu,r)`, `X(mu,r)`, `S(r)`).

    Raises:
      ConfigError: naming `data.denoisers` on unparsable text, wrong argument counts, a bad density,
        span length or rate.
    """
    out, pos = [], 0
    spec = spec.strip()
    while pos < len(spec):
        m = _ENTRY.match(spec, pos)
        if not m or m.end() == pos:
            raise ConfigError(f"data.denoisers={spec!r}: cannot parse {spec[pos:]!r}; expected entries like "
                              f"'R(3,0.15)', 'X(64,0.5)@0.5', 'S(0.25)'")
        kind, args, rate, entry = m.group(1), m.group(2), m.group(3), m.group(0).strip()
        try:
            values = [float(a) for a in args.split(",")] if args else []
            rate_value = float(rate) if rate else 1.0
        except ValueError:
            raise ConfigError(f"data.denoisers: bad number in {entry!r}") from None
        want = 1 if kind == "S" else 2
        if len(values) != want:
            raise ConfigError(f"data.denoisers: {entry!r} needs {want} argument(s): "
                              + ("S(r)" if kind == "S" else f"{kind}(mean_noise_span_length, noise_density)"))
        if not rate_value > 0:
            raise ConfigError(f"data.denoisers: rate of {entry!r} must be > 0")
        mu, r = (1.0, values[0]) if kind == "S" else values
        check_span_params(r, mu, where=f"data.denoisers {entry!r}: ")
        out.append(Denoiser(kind, r, mu, rate_value, mode_tokens))
        pos = m.end()
    if not out:
        raise ConfigError("data.denoisers is empty")
    return out


def denoisers_from_config(data_config: ml_collections.ConfigDict) -> list[Denoiser]:
    """`data.denoisers` parsed, or T5's single span-corruption denoiser (no mode token) if empty.

    Raises:
      ConfigError: naming `data.noise_density`, `data.mean_noise_span_length` or `data.denoisers`.
    """
    if data_config.denoisers.strip():
        return parse_denoisers(data_config.denoisers, bool(data_config.mode_tokens))
    check_span_params(data_config.noise_density, data_config.mean_noise_span_length, where="data.")
    return [Denoiser("R", float(data_config.noise_density), float(data_config.mean_noise_span_length))]


def _largest(n_max: int, fits) -> int:
    """Largest `n` in `[1, n_max]` with `fits(n)`, or 0."""
    for n in range(n_max, 0, -1):
        if fits(n):
            return n
    return 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """`format` ("t5" | "prefix_lm"); `inputs_length`: encoder tokens (t5) or `seq_len` (prefix_lm)
    per row; `targets_length`: decoder tokens per row (0 for prefix_lm); `raw_lengths`: raw tokens
    read per example, one per denoiser."""

    format: str
    inputs_length: int
    targets_length: int
    raw_lengths: tuple[int, ...]


def make_layout(denoisers: Sequence[Denoiser], *, format: str = "t5", inputs_length: int,
                targets_length: int = 0) -> Layout:
    """Raw lengths and row lengths for `denoisers`.

    t5: a plain span denoiser reads `random_spans_helper(inputs_length - mode)` raw tokens (T5);
    S reads the most tokens whose inputs fit. `targets_length` 0 means the longest targets of any
    denoiser at its raw length. prefix_lm: `inputs_length` is `seq_len`; each denoiser reads the most
    raw tokens whose `inputs + targets` fit `seq_len + 1` (the row before the one-token shift).

    Raises:
      ConfigError: naming `data.inputs_length` / `data.targets_length` when they are too small, or
        the format.
    """
    if format not in FORMATS:
        raise ConfigError(f"data.format={format!r}; expected one of {FORMATS}")
    if inputs_length < 4:
        raise ConfigError(f"data.inputs_length={inputs_length} must be >= 4")
    raws = []
    for d in denoisers:
        if format == "prefix_lm":
            n = _largest(inputs_length, lambda n: sum(d.lengths(n)) <= inputs_length + 1)
        elif d.kind == "S":
            n = _largest(4 * inputs_length, lambda n: d.lengths(n)[0] <= inputs_length
                         and (not targets_length or d.lengths(n)[1] <= targets_length))
        else:
            n = random_spans_helper(inputs_length - int(d.mode_token), d.noise_density, d.mean_noise_span_length)[0]
        if n < 2:
            raise ConfigError(f"data.inputs_length={inputs_length} / data.targets_length={targets_length} leave no "
                              f"room for denoiser {d}")
        raws.append(n)
    if format == "prefix_lm":
        return Layout(format, inputs_length, 0, tuple(raws))
    needed = max(d.lengths(n)[1] for d, n in zip(denoisers, raws))
    if targets_length and targets_length < needed:
        raise ConfigError(f"data.targets_length={targets_length} is shorter than the {needed} target tokens of "
                          f"data.inputs_length={inputs_length}; set data.targets_length=0 to derive it")
    return Layout(format, inputs_length, targets_length or needed, tuple(raws))


def sentinel_layout(tokenizer, denoisers: Sequence[Denoiser], layout: Layout) -> tuple[np.ndarray, dict[str, int]]:
    """`(sentinel_ids, mode_ids)`: int32 `[m]` `sentinel_ids[k] = tokenizer.sentinel_id(k)` over the
    sentinels not reserved as mode tokens, and `{"R", "X", "S"}` -> id (empty without mode tokens).

    Raises:
      ConfigError: (a ValueError) naming `tokenizer.num_sentinels` when the vocabulary has fewer
        sentinels than the most spans any example can have (plus 3 mode tokens).
    """
    use_modes = any(d.mode_token for d in denoisers)
    total = tokenizer.num_sentinels
    available = total - (3 if use_modes else 0)
    need = 0
    for d, raw in zip(denoisers, layout.raw_lengths):
        if d.kind != "S":
            need = max(need, max(d.counts(n)[2] for n in range(1, raw + 1)))
    if available < need or available < 0:
        raise ConfigError(
            f"tokenizer {getattr(tokenizer, 'path', '')} has {total} sentinels but examples of "
            f"{list(layout.raw_lengths)} raw tokens need up to {need} span sentinels"
            + (" + 3 mode tokens" if use_modes else "")
            + "; raise tokenizer.num_sentinels or lower data.inputs_length")
    sentinel_ids = np.array([tokenizer.sentinel_id(k) for k in range(max(available, 0))], np.int32)
    modes = {k: tokenizer.sentinel_id(total - off) for k, off in _MODE_OFFSET.items()} if use_modes else {}
    return sentinel_ids, modes


class CorruptedRows(grain.MapDataset):
    """Raw windows corrupted by one denoiser and packed (see the module docstring).

    Element `i` reads `parent[i]` (a dict with `tokens`, `segment_ids` of the window) and corrupts
    each document piece with `np.random.default_rng((seed, stream, i))`, so the dataset is a pure
    function of (seed, index).
    """

    def __init__(self, parent: grain.MapDataset, denoiser: Denoiser, layout: Layout, *, seed: int,
                 stream: int, sentinel_ids: np.ndarray, mode_ids: dict[str, int], eos_id: int):
        super().__init__(parent)
        self._d, self._layout = denoiser, layout
        self._seed, self._stream = int(seed), int(stream)
        self._sentinels, self._eos = np.asarray(sentinel_ids, np.int32), int(eos_id)
        self._mode = int(mode_ids.get(denoiser.kind, -1))

    def __len__(self) -> int:
        return len(self._parent)

    def example(self, row: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Corrupts and packs one raw window with `rng`."""
        lay, d = self._layout, self._d
        budget_in, budget_tg = lay.inputs_length + (1 if lay.format == "prefix_lm" else 0), lay.targets_length
        used_in = used_tg = 0
        pairs = []
        seg = row["segment_ids"]
        for piece in (row["tokens"][seg == s] for s in np.unique(seg[seg > 0])):
            if lay.format == "prefix_lm":
                fits = lambda n: sum(d.lengths(n)) <= budget_in - used_in
            else:
                fits = lambda n: (d.lengths(n)[0] <= budget_in - used_in and d.lengths(n)[1] <= budget_tg - used_tg)
            # Corrupted inputs hold at least (1 - r) * n - 1 raw tokens: nothing longer can fit.
            bound = int((budget_in - used_in + 2) / (1.0 - d.noise_density)) + 2
            n = len(piece) if fits(len(piece)) else _largest(min(len(piece) - 1, bound), fits)
            if n == 0:
                break
            inputs, targets = d.corrupt(piece[:n], rng, self._sentinels, self._mode, self._eos)
            pairs.append((inputs, targets))
            used_in += len(inputs) + (len(targets) if lay.format == "prefix_lm" else 0)
            used_tg += len(targets)
            if n < len(piece):
                break
        if lay.format == "prefix_lm":
            return packing.pack_prefix_lm(pairs, lay.inputs_length)
        return packing.pack_t5(pairs, lay.inputs_length, lay.targets_length)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        rng = np.random.default_rng([self._seed, self._stream, int(index)])
        return self.example(self._parent[index], rng)

    def __str__(self) -> str:
        return f"CorruptedRows({self._d}, {self._layout})"


# ---- Pipeline ------------------------------------------------------------------------------------


def t5_dataset(data_config: ml_collections.ConfigDict, tokenizer, *, split: str, global_batch_size: int,
               seed: int, cache_dir: str | os.PathLike, data_root: str = "", process_index: int = 0,
               process_count: int = 1, format: str = "t5") -> grain.MapDataset:
    """The span-corruption / UL2 dataset of this process: batches of packed examples.

    Args:
      data_config: the `data` section (`default_config()`).
      tokenizer: a `jaxllm.data.tokenizer.Tokenizer` with sentinels and an eos piece.
      split: "train" (`data.sources`: infinite, shuffled, one stream per source x denoiser mixed by
        source weight x denoiser rate) or "eval" (`data.eval_sources`: finite, in order, the first
        denoiser only, last batch padded with empty rows, fixed corruption for a given `seed`).
      global_batch_size: rows per global batch, B; `seed`: data-order and corruption seed.
      cache_dir, data_root: token cache directory and `{data_root}` of the source specs.
      process_index, process_count: this process's slice of each global batch (B % P == 0).
      format: "t5" (`packing.T5_KEYS`, `[B/P, inputs_length]` encoder and `[B/P, targets_length]` decoder
        arrays) or "prefix_lm" (`packing.PREFIX_LM_KEYS`, `[B/P, inputs_length]`).

    Raises:
      DataError: bad sources, split or batch layout, or a corpus shorter than one window.
      ConfigError: bad `data.*` values or too few sentinels (naming the key).
    """
    lm.check_batch_layout("t5_dataset", split, global_batch_size, process_index, process_count)
    if tokenizer.eos_id < 0:
        raise ValueError(f"tokenizer {tokenizer.path} has no eos piece, which span corruption appends")
    denoisers = denoisers_from_config(data_config)
    layout = make_layout(denoisers, format=format, inputs_length=data_config.inputs_length,
                         targets_length=data_config.targets_length)
    sentinel_ids, mode_ids = sentinel_layout(tokenizer, denoisers, layout)
    specs = sources.parse_sources(data_config.sources if split == "train" else data_config.eval_sources, data_root)
    tokenize = functools.partial(lm.tokenize_corpus, tokenizer=tokenizer, cache_dir=cache_dir, add_bos=False,
                                 add_eos=False, num_threads=data_config.tokenize_threads)
    common = dict(layout=layout, seed=seed, sentinel_ids=sentinel_ids, mode_ids=mode_ids, eos_id=tokenizer.eos_id)
    if split == "eval":
        rows = lm._PadToMultiple(lm.PackedRows(tokenize(specs), layout.raw_lengths[0] - 1, pad_tail=True),
                                 global_batch_size)
        data = CorruptedRows(rows, denoisers[0], stream=0, **common)
    else:
        groups = [specs] if specs[0].weight is None else [[s] for s in specs]
        parts, weights = [], []
        for g, group in enumerate(groups):
            corpus = tokenize(group)
            for k, (d, raw) in enumerate(zip(denoisers, layout.raw_lengths)):
                stream = g * len(denoisers) + k
                rows = lm.PackedRows(corpus, raw - 1, seed=seed, stream=stream)
                parts.append(CorruptedRows(rows, d, stream=stream, **common))
                weights.append((group[0].weight or 1.0) * d.rate)
        data = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    local = lm._ProcessSlice(data, global_batch_size, process_index, process_count)
    return local.batch(global_batch_size // process_count)

