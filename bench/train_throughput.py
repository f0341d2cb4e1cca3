"""Training-step throughput of jaxllm against Hugging Face `LlamaForCausalLM` (PyTorch eager, CPU).

Both frameworks train the same LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, untied LM head, no
biases) with AdamW and global-norm clipping on the same batch shape; the script prints tokens/s,
ms/step, model FLOP/s and MFU of each, and their ratio.

MFU follows MaxText (`calculate_tflops_training_per_device`): `6 * matmul params` per token (the
LM head included, the input embedding gather excluded) plus causal attention `6 * layers * heads *
head_dim * seq_len` (QK^T and AV, forward and backward, halved for the causal mask); the formula is
`jaxllm.models.llama.flops_per_token`, applied to both frameworks. The peak is the best float32
2048^2 matmul of NumPy, torch and XLA measured in this invocation (XLA's own number printed beside).

Each framework runs in its own warm worker process; the parent alternates rounds of steps between
them (order swapped every round), so both see the same background load, and reports the median of
the per-round speed ratios. Models:

- `small`: 1.07M parameters, the nanoGPT "baby GPT" shape (4 layers, width 128, 4 heads, MLP 512,
  vocab 65), batch 12 x 64.
- `large`: 42M parameters (8 layers, width 512, 8 heads, MLP 2048, vocab 8192), batch 16 x 256.
- `smollm2` / `llama1b` (GPU): SmolLM2-135M's and Llama-3.2-1B's shapes (untied heads here, so
  both frameworks hold the same parameters), batch 16 x 2048 and 4 x 2048.

    python bench/train_throughput.py [--models small,large] [--rounds 5]
    python bench/train_throughput.py --device gpu --models smollm2,llama1b --rounds 3

With `--device gpu` both train in bfloat16 compute with float32 master weights (jaxllm:
`model.dtype=bfloat16`, cuDNN attention; torch: `autocast(bfloat16)`, SDPA attention, fused AdamW)
and the peak is the best bf16 8192^2 matmul of torch and XLA measured in the workers (the
published dense bf16 peak of the chip is printed beside it).

Needs the `bench` extra (`pip install -e .[bench]`: the pinned torch and transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from timing import best_seconds

REPO = pathlib.Path(__file__).resolve().parents[1]

MODELS = {
    "small": dict(vocab_size=65, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=512,
                  batch_size=12, seq_len=64, steps_per_round=20),
    "large": dict(vocab_size=8192, embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=8, mlp_dim=2048,
                  batch_size=16, seq_len=256, steps_per_round=2),
    "smollm2": dict(vocab_size=49152, embed_dim=576, num_layers=30, num_heads=9, num_kv_heads=3, mlp_dim=1536,
                    batch_size=16, seq_len=2048, steps_per_round=10),
    "llama1b": dict(vocab_size=128256, embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_dim=8192,
                    batch_size=4, seq_len=2048, steps_per_round=5),
}
GPU = os.environ.get("JAXLLM_BENCH_DEVICE", "cpu") == "gpu"  # set by --device for the workers
GPU_PEAK_SIZE = 8192
LR, BETAS, WEIGHT_DECAY, CLIP, NORM_EPS, ROPE_THETA = 1e-3, (0.9, 0.95), 0.1, 1.0, 1e-5, 10000.0
PEAK_SIZE = 2048


def numpy_peak() -> float:
    a = np.random.default_rng(0).standard_normal((PEAK_SIZE, PEAK_SIZE), dtype=np.float32)
    return 2.0 * PEAK_SIZE**3 / best_seconds(lambda: a @ a)


def random_batches(spec: dict, count: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, spec["vocab_size"], (spec["batch_size"], spec["seq_len"] + 1)).astype(np.int64)
            for _ in range(count)]


# ---- workers ----------------------------------------------------------------------------------

class JaxWorker:
    """jaxllm's own jitted train step (`loop.compile_stage`, as `jaxllm pretrain` builds it)."""

    def __init__(self, spec: dict):
        import jax
        import jax.numpy as jnp

        from jaxllm import sharding
        from jaxllm.models import llama
        from jaxllm.train import loop, pretrain

        config = pretrain.default_config()
        config.model.update({k: spec[k] for k in ("vocab_size", "embed_dim", "num_layers", "num_heads",
                                                  "num_kv_heads", "mlp_dim")})
        config.model.update(norm_eps=NORM_EPS, rope_theta=ROPE_THETA)
        if GPU:
            config.model.update(dtype="bfloat16", attention_impl="cudnn")
        config.train.update(batch_size=spec["batch_size"], steps=1000)
        config.optimizer.update(lr=LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WEIGHT_DECAY, grad_clip=CLIP,
                                warmup_steps=10)
        self.model = llama.LlamaConfig.from_config(config.model)
        mesh = sharding.make_mesh(config.mesh)
        stage = loop.Stage(name="bench", init_params=lambda rng: llama.init(self.model, rng),
                           loss_fn=pretrain.lm_loss_fn(self.model), train_data=None)
        self.compiled = loop.compile_stage(config, stage, mesh)
        self.activation = sharding.activate(mesh, config.mesh.rules)
        self.activation.__enter__()
        self.state = self.compiled.init_state()
        rows, length = spec["batch_size"], spec["seq_len"]
        self.batches = []
        for tokens in random_batches(spec):
            local = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
                     "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
                     "segment_ids": np.ones((rows, length), np.int32),
                     "loss_mask": np.ones((rows, length), np.float32)}
            self.batches.append(sharding.global_batch(local, mesh, config.mesh.rules))
        self.params = llama.count_params(self.model)
        self._jax, self._jnp = jax, jnp
        size, dtype = (GPU_PEAK_SIZE, jnp.bfloat16) if GPU else (PEAK_SIZE, jnp.float32)
        matrix = jnp.ones((size, size), dtype)
        matmul = jax.jit(lambda x: x @ x)
        self.peak = 2.0 * size**3 / best_seconds(lambda: matmul(matrix).block_until_ready())

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for i in range(steps):
            self.state, metrics = self.compiled.train_step(self.state, self.batches[i % len(self.batches)])
        self._jax.block_until_ready((self.state, metrics))
        self.loss = float(metrics["loss_sum"] / metrics["count"])
        return time.perf_counter() - start


class TorchWorker:
    """`transformers.LlamaForCausalLM` in eager PyTorch with `torch.optim.AdamW`."""

    def __init__(self, spec: dict):
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=spec["vocab_size"], hidden_size=spec["embed_dim"], intermediate_size=spec["mlp_dim"],
            num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
            num_key_value_heads=spec["num_kv_heads"], max_position_embeddings=spec["seq_len"],
            rms_norm_eps=NORM_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=False, attention_bias=False,
            mlp_bias=False, hidden_act="silu", use_cache=False)
        self.device = "cuda" if GPU else "cpu"
        self.model = transformers.LlamaForCausalLM(config).to(self.device)
        self.model.train()
        self.attention = self.model.config._attn_implementation
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS,
                                           **({"fused": True} if GPU else {}))
        self.batches = [torch.from_numpy(tokens).to(self.device) for tokens in random_batches(spec)]
        self.params = sum(p.numel() for p in self.model.parameters())
        self._torch = torch
        if GPU:
            a = torch.randn(GPU_PEAK_SIZE, GPU_PEAK_SIZE, device="cuda", dtype=torch.bfloat16)

            def matmul():
                a @ a
                torch.cuda.synchronize()

            self.peak = 2.0 * GPU_PEAK_SIZE**3 / best_seconds(matmul)
        else:
            a = torch.randn(PEAK_SIZE, PEAK_SIZE)
            self.peak = 2.0 * PEAK_SIZE**3 / best_seconds(lambda: a @ a)

    def run(self, steps: int) -> float:
        torch = self._torch
        start = time.perf_counter()
        for i in range(steps):
            tokens = self.batches[i % len(self.batches)]
            # labels == inputs: the model shifts them itself (next-token loss over seq_len - 1 positions).
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=GPU):
                loss = self.model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())  # synchronises the device
        return time.perf_counter() - start


def worker_main(framework: str, model: str) -> None:
    """Serves `run N` lines on stdin with one JSON line of results each; `quit` ends."""
    spec = MODELS[model]
    worker = (JaxWorker if framework == "jax" else TorchWorker)(spec)
    worker.run(3)  # compile / warm up allocators
    info = {"params": worker.params, "peak": worker.peak, "attention": getattr(worker, "attention", "")}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        seconds = worker.run(int(cmd[1]))
        print(json.dumps({"seconds": seconds, "loss": worker.loss}), flush=True)


class Worker:
    """Parent-side handle of a worker process."""

    def __init__(self, framework: str, model: str):
        env = {**os.environ, "JAX_PLATFORMS": "cuda" if GPU else "cpu", "JAXLLM_BENCH_DEVICE": "gpu" if GPU else "cpu",
               # both workers share the GPU: JAX takes 45% of its memory instead of 75% up front
               "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}
        env.pop("XLA_FLAGS", None)  # no forced fake devices: one CPU device, as `jaxllm pretrain` runs
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", framework, "--model", model],
                                     cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        while True:  # a library may print to stdout: the protocol's lines are the JSON objects
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.proc.args} exited with {self.proc.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, steps: int) -> dict:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def bench_model(name: str, rounds: int) -> dict:
    from jaxllm.models import llama

    spec = MODELS[name]
    c = llama.default_config()
    c.update({k: spec[k] for k in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim")})
    flops_per_step = (llama.flops_per_token(llama.LlamaConfig.from_config(c), spec["seq_len"])
                      * spec["batch_size"] * spec["seq_len"])
    workers = {"jaxllm": Worker("jax", name), "hf_torch": Worker("torch", name)}
    if workers["jaxllm"].info["params"] != workers["hf_torch"].info["params"]:
        raise RuntimeError(f"parameter counts differ: {workers['jaxllm'].info} vs {workers['hf_torch'].info}")
    seconds = {k: [] for k in workers}
    losses = {}
    for r in range(rounds):
        for key in (list(workers) if r % 2 == 0 else list(workers)[::-1]):
            out = workers[key].run(spec["steps_per_round"])
            seconds[key].append(out["seconds"] / spec["steps_per_round"])
            losses[key] = out["loss"]
    for w in workers.values():
        w.close()
    tokens = spec["batch_size"] * spec["seq_len"]
    result = {"params": workers["jaxllm"].info["params"], "flops_per_step": flops_per_step,
              "hf_attention": workers["hf_torch"].info["attention"],
              "xla_peak": workers["jaxllm"].info["peak"], "torch_peak": workers["hf_torch"].info["peak"]}
    for key, s in seconds.items():
        step = float(np.median(s))
        result[key] = {"ms_per_step": 1e3 * step, "ms_per_step_rounds": [1e3 * x for x in s],
                       "tokens_per_second": tokens / step, "flops_per_second": flops_per_step / step,
                       "last_loss": losses[key]}
    result["speed_ratio"] = float(np.median([t / j for j, t in zip(seconds["jaxllm"], seconds["hf_torch"])]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small,large", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench/out"))
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--published_peak", type=float, default=989e12,
                        help="the chip's published dense bf16 FLOP/s (GPU; default: H100/H200 SXM)")
    args = parser.parse_args()
    global GPU
    GPU = args.device == "gpu" or GPU
    os.environ["JAXLLM_BENCH_DEVICE"] = "gpu" if GPU else "cpu"
    if args.worker:
        worker_main(args.worker, args.model)
        return
    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {sorted(MODELS)}")

    results = {"numpy_peak": 0.0 if GPU else numpy_peak(), "device": args.device, "models": {}}
    for name in names:
        results["models"][name] = bench_model(name, args.rounds)
    peaks = {} if GPU else {"numpy": results["numpy_peak"]}
    for r in results["models"].values():
        peaks["torch"] = max(peaks.get("torch", 0.0), r["torch_peak"])
        peaks["xla"] = max(peaks.get("xla", 0.0), r["xla_peak"])
    peak = max(peaks.values())
    results["peaks"], results["peak"] = peaks, peak
    what = "8192^2 bf16" if GPU else "2048^2 f32"
    print(f"matmul peak ({what}): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
          + f"; MFU below is against {peak / 1e9:.0f}")
    if GPU:
        results["published_peak"] = args.published_peak
        for name, r in results["models"].items():
            print(f"{name}: MFU against the published {args.published_peak / 1e12:.0f} TFLOP/s: " + ", ".join(
                f"{k} {r[k]['flops_per_second'] / args.published_peak:.1%}" for k in ("jaxllm", "hf_torch")))
    print(f"\n{'model':8}{'params':>11}{'framework':>11}{'ms/step':>10}{'tokens/s':>10}{'GFLOP/s':>9}"
          f"{'MFU':>7}{'MFU/XLA':>9}{'jax/peer':>10}")
    for name, r in results["models"].items():
        for key in ("jaxllm", "hf_torch"):
            x = r[key]
            ratio = f"{r['speed_ratio']:.2f}x" if key == "jaxllm" else ""
            print(f"{name:8}{r['params']:>11,}{key:>11}{x['ms_per_step']:10.1f}{x['tokens_per_second']:10.0f}"
                  f"{x['flops_per_second'] / 1e9:9.1f}{x['flops_per_second'] / peak:7.1%}"
                  f"{x['flops_per_second'] / peaks['xla']:9.1%}{ratio:>10}")
    print("\njax/peer: median over rounds of (peer step time / jaxllm step time); > 1 means jaxllm is faster."
          f" HF attention: {', '.join(sorted({r['hf_attention'] for r in results['models'].values()}))}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
