"""`llama.flops_per_token` equals MaxText's training-FLOPs formula, written out term by term."""

import pytest

from jaxllm.models import llama


def maxtext_flops_per_token(c, seq_len, *, gated=True):
    """MaxText `calculate_tflops_training_per_device` (causal attention halved) / tokens of a step."""
    ffn1 = 2 * c.mlp_dim * c.embed_dim * (2 if gated else 1)
    ffn2 = 2 * c.mlp_dim * c.embed_dim
    qkv = 2 * c.embed_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    projection = 2 * c.embed_dim * c.num_heads * c.head_dim
    lm_head = 2 * c.embed_dim * c.vocab_size
    causal_attention = 4 * seq_len * c.num_heads * c.head_dim / 2
    return 3 * ((ffn1 + ffn2 + qkv + projection + causal_attention) * c.num_layers + lm_head)


@pytest.mark.parametrize("overrides", [
    dict(vocab_size=8192, embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=8, mlp_dim=2048),
    dict(vocab_size=4096, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=768, qkv_bias=True),
    dict(vocab_size=128, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=352, tie_embeddings=True),
])
def test_flops_per_token_is_maxtexts(overrides):
    c = llama.default_config()
    c.update(overrides)
    cfg = llama.LlamaConfig.from_config(c)
    assert llama.flops_per_token(cfg, 256) == pytest.approx(maxtext_flops_per_token(cfg, 256), rel=1e-12)


def test_flops_of_the_42m_benchmark_model_by_hand():
    """8 layers of (4 * 512^2 attention + 3 * 512 * 2048 MLP) weights plus a 512 x 8192 head, seq 256."""
    c = llama.default_config()
    c.update(vocab_size=8192, embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=8, mlp_dim=2048)
    weights = 8 * (4 * 512 * 512 + 3 * 512 * 2048) + 512 * 8192
    assert weights == 37_748_736
    assert llama.flops_per_token(llama.LlamaConfig.from_config(c), 256) == 6 * weights + 6 * 8 * 512 * 256
