"""Test setup: 8 CPU devices with gloo collectives, before JAX starts its backends.

XLA's default in-process CPU collectives deadlock on 2-core machines once an all-reduce moves
more than ~16K elements (../shared/docs/cpu-notes.md); gloo through a one-process
`jax.distributed` client works every time. This runs at import, before any test module touches
a device.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import portpicker  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{portpicker.pick_unused_port()}",
    num_processes=1,
    process_id=0,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """`../shared/data`, or a skip when this checkout has no shared bundle beside it."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"shared data bundle not found at {SHARED_DATA}")
    return SHARED_DATA


SHARED_MODELS = REPO.parent / "shared" / "models"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def shared_models() -> pathlib.Path:
    """`../shared/models` (real pretrained weights, see its README.md), or a skip when this
    checkout has no SmolLM2 GGUF beside it."""
    if not (SHARED_MODELS / SMOLLM2_GGUF).is_file():
        pytest.skip(f"{SHARED_MODELS / SMOLLM2_GGUF} not found (the shared model bundle)")
    return SHARED_MODELS


@pytest.fixture(scope="session")
def transformers():
    """The `transformers` module (the parity peer, `pip install -e .[hf]`), or a skip without it."""
    return pytest.importorskip("transformers", reason="transformers (the parity peer extra) is not installed")
