"""jaxllm vs a PyTorch nanoGPT-style peer on nanoGPT's CPU "baby GPT" Shakespeare setting.

Both train 2000 iterations of block 64 x batch 12 characters (4 layers, 4 heads, width 128, no
dropout, AdamW lr 1e-3 with 100 warmup steps then cosine to 1e-4, beta2 0.99, clip 1.0) on
`DATA_ROOT/pretrain/tinyshakespeare`, in one invocation, and print wall time, ms/step,
tokens/s, model FLOP/s, MFU against the machine's measured matmul peak, and validation loss.

jaxllm runs its own CLI (`jaxllm pretrain --config configs/pretrain.py:shakespeare_char`, a
LLaMA-style decoder: RMSNorm, RoPE, SwiGLU) in a subprocess; the peer is GPT-2-style (LayerNorm,
learned positions, GELU, tied embeddings, no biases) as in nanoGPT, written here in ~60 lines of
PyTorch and trained in this process with random windows as nanoGPT samples them.

    python bench/shakespeare_char.py --data_root ../shared/data [--steps 2000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from timing import best_seconds

REPO = pathlib.Path(__file__).resolve().parents[1]


def matmul_peaks(size: int = 2048) -> dict[str, float]:
    """Best-of-5 float32 `size`^2 matmul FLOP/s of NumPy, torch and XLA on this machine."""
    import torch

    flops = 2.0 * size**3
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    out = {}

    out["numpy"] = flops / best_seconds(lambda: a @ a)
    ta = torch.from_numpy(a)
    out["torch"] = flops / best_seconds(lambda: ta @ ta)
    code = ("import jax, jax.numpy as jnp, time; a = jnp.ones((%d, %d), jnp.float32); f = jax.jit(lambda x: x @ x);"
            "f(a).block_until_ready(); ts = []\n"
            "for _ in range(5):\n t = time.perf_counter(); f(a).block_until_ready(); ts.append(time.perf_counter() - t)\n"
            "print(min(ts))" % (size, size))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    seconds = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                   check=True).stdout.strip())
    out["xla"] = flops / seconds
    return out


# ---- the PyTorch peer -------------------------------------------------------------------------

def torch_peer(data_root: pathlib.Path, steps: int, eval_every: int, eval_iters: int) -> dict:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    torch.manual_seed(1337)
    text = (data_root / "pretrain/tinyshakespeare/train.txt").read_text()
    val_text = (data_root / "pretrain/tinyshakespeare/validation.txt").read_text()
    chars = sorted(set(text + val_text))
    stoi = {c: i for i, c in enumerate(chars)}
    train = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    val = torch.tensor([stoi[c] for c in val_text], dtype=torch.long)
    vocab, block, batch, width, layers, heads = len(chars), 64, 12, 128, 4, 4

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = tnn.LayerNorm(width, bias=False), tnn.LayerNorm(width, bias=False)
            self.qkv = tnn.Linear(width, 3 * width, bias=False)
            self.proj = tnn.Linear(width, width, bias=False)
            self.fc = tnn.Linear(width, 4 * width, bias=False)
            self.out = tnn.Linear(4 * width, width, bias=False)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
            q, k, v = (z.view(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = tnn.Embedding(vocab, width), tnn.Embedding(block, width)
            self.blocks = tnn.ModuleList(Block() for _ in range(layers))
            self.ln_f = tnn.LayerNorm(width, bias=False)
            self.head = tnn.Linear(width, vocab, bias=False)
            self.head.weight = self.wte.weight
            for name, p in self.named_parameters():
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                if p.dim() == 2:
                    tnn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            logits = self.head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, vocab), targets.view(-1))

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))

    def lr_at(it):
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = min((it - 100) / max(steps - 100, 1), 1.0)
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    def get_batch(data):
        ix = torch.randint(len(data) - block, (batch,))
        return torch.stack([data[i:i + block] for i in ix]), torch.stack([data[i + 1:i + 1 + block] for i in ix])

    @torch.no_grad()
    def estimate(data, iters):
        model.eval()
        losses = [model(*get_batch(data)).item() for _ in range(iters)]
        model.train()
        return float(np.mean(losses))

    n_params = sum(p.numel() for p in model.parameters())
    matmul_params = n_params - vocab * width - block * width + vocab * width  # head is tied: counts once
    flops_per_token = 6 * matmul_params + 6 * layers * width * block  # same convention as jaxllm
    start = time.perf_counter()
    train_time, evals = 0.0, {}
    for it in range(steps):
        if it % eval_every == 0 or it == steps - 1:
            evals[it] = estimate(val, eval_iters)
        t = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        loss = model(*get_batch(train))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if it >= 10:  # skip warm-up iterations, as jaxllm skips its compile step
            train_time += time.perf_counter() - t
    wall = time.perf_counter() - start
    full_val = estimate_full(model, val, block, batch)
    step_s = train_time / max(steps - 10, 1)
    return {"params": n_params, "wall_s": wall, "ms_per_step": 1e3 * step_s,
            "tokens_per_second": batch * block / step_s, "flops_per_second": flops_per_token * batch * block / step_s,
            "val_loss_sampled": evals[max(evals)], "val_loss_full": full_val}


def estimate_full(model, val, block, batch):
    """Mean loss over every non-overlapping window of the validation text."""
    import torch

    model.eval()
    n = (len(val) - 1) // block
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, batch):
            idx = [j * block for j in range(i, min(i + batch, n))]
            x = torch.stack([val[j:j + block] for j in idx])
            y = torch.stack([val[j + 1:j + 1 + block] for j in idx])
            total += model(x, y).item() * len(idx)
    return total / n


# ---- jaxllm ---------------------------------------------------------------------------------

def jaxllm_run(data_root: pathlib.Path, steps: int, out: pathlib.Path, extra: list[str]) -> dict:
    run_dir = out / "shakespeare_char"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "jaxllm.cli", "pretrain", "--config", "configs/pretrain.py:shakespeare_char",
           f"--config.data_root={data_root}", f"--config.run_dir={run_dir}", f"--config.train.steps={steps}",
           "--config.train.progress_bar=false", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "pretrain/metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "tokens_per_second" in r]
    evals = [r for r in rows if "eval/loss" in r]
    tps = float(np.median([r["tokens_per_second"] for r in train_rows]))
    mfu = float(np.median([r["mfu"] for r in train_rows]))
    return {"wall_s": wall, "tokens_per_second": tps, "ms_per_step": 12 * 64 / tps * 1e3, "mfu_logged": mfu,
            "val_loss_full": evals[-1]["eval/loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default=str(REPO.parent / "shared/data"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=str(REPO / "bench/out"))
    parser.add_argument("--skip_peer", action="store_true")
    parser.add_argument("jaxllm_overrides", nargs="*", help="extra --config.* flags for jaxllm")
    args = parser.parse_args()
    data_root = pathlib.Path(args.data_root).resolve()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    peaks = matmul_peaks()
    peak = max(peaks.values())
    print("matmul peak (2048^2 f32): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    jax_result = jaxllm_run(data_root, args.steps, out, args.jaxllm_overrides)
    from jaxllm.models import llama

    c = llama.preset("baby_gpt")
    c.vocab_size = 128
    jax_flops = llama.flops_per_token(llama.LlamaConfig.from_config(c), 64) * 12 * 64
    jax_result["flops_per_second"] = jax_flops / (jax_result["ms_per_step"] / 1e3)
    results = {"peaks": peaks, "jaxllm": jax_result}
    if not args.skip_peer:
        results["torch_peer"] = torch_peer(data_root, args.steps, eval_every=250, eval_iters=20)

    print(f"\n{'':14}{'wall s':>9}{'ms/step':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>7}{'val loss':>10}")
    for name in ("jaxllm", "torch_peer"):
        if name in results:
            r = results[name]
            print(f"{name:14}{r['wall_s']:9.1f}{r['ms_per_step']:9.1f}{r['tokens_per_second']:10.0f}"
                  f"{r['flops_per_second'] / 1e9:9.1f}{r['flops_per_second'] / peak:7.1%}{r['val_loss_full']:10.4f}")
    if "torch_peer" in results:
        ratio = results["torch_peer"]["ms_per_step"] / jax_result["ms_per_step"]
        print(f"\njaxllm step speed / peer: {ratio:.2f}x; wall time ratio "
              f"{results['torch_peer']['wall_s'] / jax_result['wall_s']:.2f}x")
    (out / "shakespeare_char.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
