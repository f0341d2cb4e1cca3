"""Peak host memory of `jaxllm.hub.hf.load_llama_params` against the largest tensor (issue 17).

Writes a random LLaMA checkpoint in Hugging Face layout (float32, default ~190 MB: vocab 32000 x
embed 512, untied LM head, 4 layers of MLP 1536; the embedding and LM head, 65.5 MB each, are the
largest tensors) tensor by tensor with jaxllm's streaming writer, then loads it in a fresh process
(no torch imported) on a mesh over `--devices` CPU devices. A sampling thread reads the process's
resident set (`/proc/self/statm`) every millisecond; `ru_maxrss` backs it up.

On CPU the "devices" are host memory, so the loaded params themselves stay resident: the number
that matters is the transient overhead, `peak - baseline - params bytes`, which the loader keeps at
about one HF tensor plus one leaf's local shards (`_place`), never the whole model.

    python bench/load_memory.py [--devices 8] [--scan] [--vocab 32000] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

VOCAB, EMBED, LAYERS, HEADS, KV_HEADS, MLP = 32000, 512, 4, 8, 4, 1536


def make_checkpoint(folder: pathlib.Path, vocab: int = VOCAB, layers: int = LAYERS) -> dict:
    """A random float32 LlamaForCausalLM folder; returns sizes (bytes) of the weights."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from jaxllm.hub import safetensors_io

    head_dim = EMBED // HEADS
    shapes = {"model.embed_tokens.weight": (vocab, EMBED), "model.norm.weight": (EMBED,),
              "lm_head.weight": (vocab, EMBED)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HEADS * head_dim, EMBED),
                       p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, EMBED),
                       p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, EMBED),
                       p + "self_attn.o_proj.weight": (EMBED, HEADS * head_dim),
                       p + "mlp.gate_proj.weight": (MLP, EMBED), p + "mlp.up_proj.weight": (MLP, EMBED),
                       p + "mlp.down_proj.weight": (EMBED, MLP),
                       p + "input_layernorm.weight": (EMBED,), p + "post_attention_layernorm.weight": (EMBED,)})
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = [(n, s, np.dtype(np.float32)) for n, s in shapes.items()]
    safetensors_io.write_safetensors(folder / "model.safetensors", entries,
                                     lambda n: rng.standard_normal(shapes[n], np.float32) * 0.02, {"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": EMBED, "intermediate_size": MLP, "num_hidden_layers": layers,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    sizes = [4 * int(np.prod(s)) for s in shapes.values()]
    return {"total_bytes": sum(sizes), "largest_tensor_bytes": max(sizes)}


def measure(folder: str, devices: int, scan: bool) -> dict:
    """Loads `folder` on `devices` CPU devices; RSS figures in bytes."""
    import resource
    import threading
    import time

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    from jaxllm import sharding
    from jaxllm.hub import hf
    from jaxllm.models import llama
    from jaxllm.train import loop  # noqa: F401 - imported by the loader; its libraries (orbax ...) are not load cost

    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page  # noqa: E731
    reader = hf.SafetensorsReader(folder)
    c = llama.default_config()
    c.update(hf.llama_model_overrides(reader.config, reader.path))
    c.scan_layers = scan
    cfg = llama.LlamaConfig.from_config(c)
    mesh_config = sharding.default_config()
    mesh = sharding.make_mesh(mesh_config)
    jax.block_until_ready(jax.numpy.zeros(8) + 1)  # start the backend before the baseline
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    baseline = rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    params = jax.block_until_ready(hf.load_llama_params(reader, cfg, mesh, sharding.DEFAULT_RULES))
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    # ru_maxrss counts only if the load set the process's record (it started below it)
    peak_bytes = max(peak[0], maxrss if maxrss > maxrss_before else 0)
    return {"devices": devices, "scan_layers": scan, "seconds": round(seconds, 2), "baseline_bytes": baseline,
            "peak_bytes": peak_bytes, "after_bytes": rss(), "params_bytes": params_bytes,
            "overhead_bytes": peak_bytes - baseline - params_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--scan", action="store_true", help="scan_layers (stacked layer leaves)")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary (embedding and LM head rows)")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the fresh measuring process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.devices, args.scan)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "llama"
        sizes = make_checkpoint(folder, args.vocab, args.layers)
        cmd = [sys.executable, __file__, "--measure", str(folder), "--devices", str(args.devices)]
        out = subprocess.run(cmd + (["--scan"] if args.scan else []), check=True, capture_output=True, text=True)
        result = {**sizes, **json.loads(out.stdout.strip().splitlines()[-1])}
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    print(f"checkpoint {mb(result['total_bytes'])} (largest tensor {mb(result['largest_tensor_bytes'])}), "
          f"{result['devices']} CPU devices, scan_layers={result['scan_layers']}, load {result['seconds']} s")
    print(f"RSS baseline {mb(result['baseline_bytes'])}, peak {mb(result['peak_bytes'])}, after "
          f"{mb(result['after_bytes'])}; params resident {mb(result['params_bytes'])}")
    print(f"transient overhead (peak - baseline - params) {mb(result['overhead_bytes'])} = "
          f"{result['overhead_bytes'] / result['largest_tensor_bytes']:.2f} x the largest tensor")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
