"""T5 / UL2 span-corruption pretraining runs: `jaxllm pretrain --config configs/pretrain_t5.py:ARG`.

(Until `jaxllm pretrain` dispatches on `model.family == "t5"`, run
`python -c "from jaxllm import config; from jaxllm.train import pretrain_t5;
pretrain_t5.run(config.build('configs/pretrain_t5.py:tiny'))"`.)

ARG is one of:

- `tiny` (default): BPE 4096 tokenizer (100 sentinels) and a 2.0M-parameter T5 v1.1-style model
  (width 128, 2+2 layers, 4 heads of 32) on the embedded default corpus (the Python standard
  library), T5 span corruption (r=0.15, mu=3): 141 raw tokens -> 128 encoder / 29 decoder tokens per
  row, batch 16, 300 steps. About 2 minutes on 2 CPU cores; final eval loss about 4.5 nats per
  target token (accuracy ~0.29).
    jaxllm pretrain --config configs/pretrain_t5.py:tiny
- `ul2_tiny`: `tiny` with UL2's mixture of seven denoisers (Tay et al. 2022, section 3.1.2: R(3,0.15),
  R(8,0.15), X(3,0.5), X(8,0.5), X(64,0.15), X(64,0.5), S(0.25), equal rates) and [NLU]/[NLG]/[S2S]
  mode tokens; 128 encoder / 127 decoder tokens per row, batch 8 (eval: the first denoiser).
    jaxllm pretrain --config configs/pretrain_t5.py:ul2_tiny
- `shared`: a BPE 8192 tokenizer and the tiny model on all of `DATA_ROOT/pretrain/*`.
    jaxllm pretrain --config configs/pretrain_t5.py:shared --config.data_root=../shared/data
- `small`, `base`, `large`: the T5 v1.1 shapes (`jaxllm.models.t5.PRESETS`) with T5's pretraining
  layout: 512 encoder / 114 decoder tokens, batch 128, bf16 compute, no dropout. T5 used Adafactor
  with an inverse-square-root schedule; these presets use the stack's AdamW (lr 1e-3 peak, 10k
  warmup, cosine to 1e-5).
"""

from jaxllm.models import t5
from jaxllm.train import pretrain_t5

SIZES = {"small": "t5_v1_1_small", "base": "t5_v1_1_base", "large": "t5_v1_1_large"}


def get_config(arg: str = "tiny"):
    c = pretrain_t5.default_config()
    c.run_dir = f"runs/t5_{arg}"

    if arg in ("tiny", "ul2_tiny", "shared"):
        c.tokenizer.vocab_size = 4096
        c.tokenizer.input_sentence_size = 200_000
        c.model.update(t5.PRESETS["tiny"])
        c.data.inputs_length = 128
        c.train.update(steps=300, batch_size=16, eval_every=150, eval_batches=10, log_every=10)
        c.optimizer.update(lr=3e-3, min_lr=3e-4, warmup_steps=30)
        c.checkpoint.every_steps = 150
        if arg == "ul2_tiny":
            c.data.denoisers = "R(3,0.15) R(8,0.15) X(3,0.5) X(8,0.5) X(64,0.15) X(64,0.5) S(0.25)"
            c.train.batch_size = 8
        if arg == "shared":
            c.tokenizer.vocab_size = 8192
            c.data.sources = "text:{data_root}/pretrain/*/train.txt"
            c.data.eval_sources = "text:{data_root}/pretrain/*/validation.txt"
            c.train.update(steps=1500, eval_every=250, eval_batches=40, log_every=25)
            c.optimizer.update(lr=2e-3, min_lr=2e-4, warmup_steps=100)

    elif arg in SIZES:
        c.model.update(t5.PRESETS[SIZES[arg]])
        c.model.update(vocab_size=0, dtype="bfloat16")  # the run's own tokenizer; 32128 for T5's
        c.tokenizer.vocab_size = 32000
        c.data.update(inputs_length=512, targets_length=114)
        c.data.sources = "text:{data_root}/pretrain/*/train.txt"
        c.data.eval_sources = "text:{data_root}/pretrain/*/validation.txt"
        c.train.update(steps=524_288, batch_size=128, eval_every=5000, eval_batches=50)
        c.optimizer.update(lr=1e-3, min_lr=1e-5, warmup_steps=10_000, weight_decay=0.0)

    else:
        raise KeyError(f"unknown pretrain_t5 config {arg!r}; expected tiny, ul2_tiny, shared, small, base or large")
    return c
