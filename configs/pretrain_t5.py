"""T5 / UL2 span-corruption pretraining runs: `jaxllm pretrain --config configs/pretrain_t5.py:ARG`.

`jaxllm pretrain` hands these configs to `jaxllm.train.pretrain_t5` (their `data` section is span
corruption's); `jaxllm sample --run RUN_DIR [--prompt TEXT]` then prints the model's fill of each
sentinel of corrupted text (or of text written with `<extra_id_0>`, `<extra_id_1>`, ...).

ARG is one of:

- `tiny` (default): BPE 4096 tokenizer (100 sentinels) and a 2.0M-parameter T5 v1.1-style model
  (width 128, 2+2 layers, 4 heads of 32) on the embedded default corpus (the Python standard
  library), T5 span corruption (r=0.15, mu=3): 141 raw tokens -> 128 encoder / 29 decoder tokens per
  row, batch 16, 300 steps. The T5 presets train with T5's optimizer, Adafactor (`optimizer.name`;
  here lr 1e-2 after 30 warmup steps, cosine to 1e-3, no weight decay).
    jaxllm pretrain --config configs/pretrain_t5.py:tiny
- `ul2_tiny`: `tiny` with UL2's mixture of seven denoisers (Tay et al. 2022, section 3.1.2: R(3,0.15),
  R(8,0.15), X(3,0.5), X(8,0.5), X(64,0.15), X(64,0.5), S(0.25), equal rates) and [NLU]/[NLG]/[S2S]
  mode tokens; 128 encoder / 127 decoder tokens per row, batch 8 (eval: the first denoiser).
    jaxllm pretrain --config configs/pretrain_t5.py:ul2_tiny
- `shared`: the tiny T5 (BPE 4096) on all of `DATA_ROOT/pretrain/*` (11 MB of books, speeches
  and web text), T5 span corruption, batch 16 x (128 + 29) tokens, 1800 steps, eval every 360.
    jaxllm pretrain --config configs/pretrain_t5.py:shared --config.data_root=../shared/data
  Measured (2 CPU cores shared with two other jobs): 9.8 minutes; eval loss per target token
  5.287, 4.999, 4.852, 4.772, 4.739 at steps 360 ... 1800 with Adafactor (lr 1e-2 -> 1e-3); AdamW
  (lr 2e-3 -> 2e-4, as the prefix LM) gave 5.34, 5.15, 5.02, 4.96, 4.91 and needed 4800 steps for
  4.666. At 1800 steps greedy fills are still mostly punctuation (`[[.]]`); longer runs:
  bench/RESULTS.md.
- `ul2_prefix_lm_tiny`, `ul2_prefix_lm_shared`: a decoder-only model (LLaMA-style, width 128,
  4 layers, 4 heads) trained as a prefix LM on the UL2 mixture: each example is `[mode] corrupted
  inputs </s> targets </s>` in one 128-token row, bidirectional attention over the inputs, causal
  over the targets, loss on the targets only (eval: the first denoiser, R(3,0.15)). Data and
  tokenizer as `tiny` / `shared`, AdamW (lr 2e-3 -> 2e-4, the decoder's small init);
  `ul2_prefix_lm_shared` runs 1000 steps (eval every 200).
    jaxllm pretrain --config configs/pretrain_t5.py:ul2_prefix_lm_shared --config.data_root=../shared/data
  Measured (1000 steps, same machine, load average ~5-7): 17.1 minutes; eval loss (R(3,0.15) rows)
  5.27, 4.90, 4.78, 4.67, 4.63 at steps 200 ... 1000 (content tokens 6.17 nats, sentinels and eos
  0.95); greedy fills are short function-word runs (`[[ of the]]`) or whitespace. With
  `--config.train.steps=24000 --config.train.eval_every=2000`: eval loss 3.608 and fills that
  complete words in context (`Por[[cupine]]`, `concl[[uded]]`); bench/RESULTS.md.
- `small`, `base`, `large`: the T5 v1.1 shapes (`jaxllm.models.t5.PRESETS`) with T5's pretraining
  layout: 512 encoder / 114 decoder tokens, batch 128, bf16 compute, no dropout, and T5's
  optimizer: Adafactor at 0.01 for 10^4 steps, then the inverse square root (`schedule="rsqrt"`;
  T5 holds 0.01 from step 0, these warm up linearly over the 10^4 steps).
"""

from jaxllm.models import llama
from jaxllm.models import t5
from jaxllm.train import pretrain_t5

SIZES = {"small": "t5_v1_1_small", "base": "t5_v1_1_base", "large": "t5_v1_1_large"}
UL2 = "R(3,0.15) R(8,0.15) X(3,0.5) X(8,0.5) X(64,0.15) X(64,0.5) S(0.25)"
SHARED_TRAIN = "text:{data_root}/pretrain/*/train.txt"
SHARED_VALIDATION = "text:{data_root}/pretrain/*/validation.txt"
ARGS = ("tiny", "ul2_tiny", "shared", "ul2_prefix_lm_tiny", "ul2_prefix_lm_shared", *SIZES)


def get_config(arg: str = "tiny"):
    if arg not in ARGS:
        raise KeyError(f"unknown pretrain_t5 config {arg!r}; expected one of {', '.join(ARGS)}")
    prefix_lm = arg.startswith("ul2_prefix_lm")
    c = pretrain_t5.default_config("llama" if prefix_lm else "t5")
    c.run_dir = f"runs/t5_{arg}"

    if arg in SIZES:
        c.model.update(t5.PRESETS[SIZES[arg]])
        c.model.update(vocab_size=0, dtype="bfloat16")  # the run's own tokenizer; 32128 for T5's
        c.tokenizer.vocab_size = 32000
        c.data.update(inputs_length=512, targets_length=114, sources=SHARED_TRAIN, eval_sources=SHARED_VALIDATION)
        c.train.update(steps=524_288, batch_size=128, eval_every=5000, eval_batches=50)
        # T5's recipe (Raffel et al. 2020, section 3.1.2): Adafactor, 0.01 for 10^4 steps, then 1/sqrt(step).
        c.optimizer.update(name="adafactor", lr=1e-2, min_lr=1e-5, warmup_steps=10_000, schedule="rsqrt",
                           weight_decay=0.0)
        return c

    c.tokenizer.update(vocab_size=4096, input_sentence_size=200_000)
    c.train.update(steps=300, batch_size=16, eval_every=150, eval_batches=10, log_every=10)
    c.optimizer.update(lr=3e-3, min_lr=3e-4, warmup_steps=30)
    c.checkpoint.every_steps = 150
    if prefix_lm:
        c.model.update(llama.PRESETS["baby_gpt"])
        c.data.update(denoisers=UL2, inputs_length=128)
    else:
        c.model.update(t5.PRESETS["tiny"])
        c.data.inputs_length = 128
    if arg == "ul2_tiny":
        c.data.denoisers = UL2
        c.train.batch_size = 8
    if arg.endswith("shared"):
        c.data.update(sources=SHARED_TRAIN, eval_sources=SHARED_VALIDATION)
        # Sized for ~15 minutes on 2 shared CPU cores: a prefix-LM step costs ~1.6 T5 steps.
        steps = 1000 if prefix_lm else 1800
        c.train.update(steps=steps, eval_every=steps // 5, eval_batches=20, log_every=25)
        c.optimizer.update(lr=2e-3, min_lr=2e-4, warmup_steps=100)
        c.checkpoint.every_steps = steps // 2
    if not prefix_lm:
        # T5's optimizer. Its N(0, 1) embedding barely moves under AdamW at these rates (an update
        # of ~lr per step on values of size 1); Adafactor scales each update by the parameter's RMS.
        # Measured on `shared`: eval loss 4.739 at step 1800 against AdamW's 4.91 (bench/RESULTS.md).
        c.optimizer.update(name="adafactor", lr=1e-2, min_lr=1e-3, weight_decay=0.0)
    return c
