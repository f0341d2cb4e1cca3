"""XLA:CPU against torch on the baby-GPT step's building block, without any jaxllm code.

The Shakespeare benchmark (`bench/shakespeare_char.py`) finds jaxllm's jitted step slower than a
PyTorch nanoGPT-style step of the same size. This script isolates the cause: it runs the SwiGLU
MLP sub-layer of that model (tokens `[768, 128]` = batch 12 x block 64, width 128, hidden 352 x 2
as one stacked up/gate matmul, residual add), `--layers` of them in a chain, forward only and
forward + backward, once as one `jax.jit` function and once in eager torch, on the same float32
arrays, in this one invocation. A ratio above 1 means XLA:CPU itself is slower at these shapes,
whatever the model code around it does.

Timing: best of 5 rounds of `--iters` calls after a warm-up call (`bench/timing.py`), per layer.

    python bench/op_chain.py [--layers 8] [--iters 50]

Needs the `bench` extra (`pip install -e .[bench]`: the pinned torch).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_seconds

TOKENS, WIDTH, HIDDEN = 768, 128, 352


def jax_chain(x, up_gate, down):
    """`layers` residual SwiGLU sub-layers: x + (silu(x W_g) * x W_u) W_d; x `[tokens, width]`."""
    for w, v in zip(up_gate, down):
        h = x @ w
        x = x + (jax.nn.silu(h[:, :HIDDEN]) * h[:, HIDDEN:]) @ v
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    import torch

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((TOKENS, WIDTH), dtype=np.float32)
    up_np = [rng.standard_normal((WIDTH, 2 * HIDDEN), dtype=np.float32) * 0.05 for _ in range(args.layers)]
    down_np = [rng.standard_normal((HIDDEN, WIDTH), dtype=np.float32) * 0.05 for _ in range(args.layers)]

    x, up, down = jnp.asarray(x_np), [jnp.asarray(w) for w in up_np], [jnp.asarray(w) for w in down_np]
    fwd = jax.jit(jax_chain)
    grad = jax.jit(jax.grad(lambda x, up, down: jnp.sum(jax_chain(x, up, down) ** 2), argnums=(0, 1, 2)))
    jax_fwd = best_seconds(lambda: fwd(x, up, down).block_until_ready(), iters=args.iters)
    jax_bwd = best_seconds(lambda: jax.block_until_ready(grad(x, up, down)), iters=args.iters)

    torch.manual_seed(0)
    tx = torch.from_numpy(x_np)
    tup = [torch.from_numpy(w).requires_grad_() for w in up_np]
    tdown = [torch.from_numpy(w).requires_grad_() for w in down_np]

    def torch_chain(x):
        for w, v in zip(tup, tdown):
            h = x @ w
            x = x + (torch.nn.functional.silu(h[:, :HIDDEN]) * h[:, HIDDEN:]) @ v
        return x

    def torch_fwd():
        with torch.no_grad():
            torch_chain(tx)

    def torch_bwd():
        xg = tx.clone().requires_grad_()
        (torch_chain(xg) ** 2).sum().backward()

    torch_fwd_s = best_seconds(torch_fwd, iters=args.iters)
    torch_bwd_s = best_seconds(torch_bwd, iters=args.iters)

    # Same math check, so the two timings are of the same computation.
    out_jax = np.asarray(fwd(x, up, down))
    with torch.no_grad():
        out_torch = torch_chain(tx).numpy()
    assert np.allclose(out_jax, out_torch, rtol=1e-4, atol=1e-4), np.abs(out_jax - out_torch).max()

    flops_fwd = 2 * TOKENS * WIDTH * 3 * HIDDEN  # per layer: up/gate [128, 704] + down [352, 128]
    print(f"jax {jax.__version__} (XLA:CPU), torch {torch.__version__}, {os.cpu_count()} CPUs; "
          f"{args.layers} layers of [{TOKENS}, {WIDTH}] SwiGLU MLP, hidden {HIDDEN}")
    for name, j, t, flops in (("forward", jax_fwd, torch_fwd_s, flops_fwd),
                              ("forward+backward", jax_bwd, torch_bwd_s, 3 * flops_fwd)):
        jl, tl = j / args.layers, t / args.layers
        print(f"{name:>17}: XLA {jl * 1e3:.3f} ms/layer ({flops / jl / 1e9:.0f} GFLOP/s), torch {tl * 1e3:.3f} "
              f"ms/layer ({flops / tl / 1e9:.0f} GFLOP/s); XLA time / torch time = {jl / tl:.2f}x")


if __name__ == "__main__":
    main()
