"""Run directories on Cloud Storage (`gs://`), against a local emulator started by the tests.

A pod run keeps its run directory in a bucket (its VMs and disks go on preemption). The emulator
(`gcp-storage-emulator`, in memory on 127.0.0.1, see ../shared/docs/cpu-notes.md) serves the JSON
API that both of orbax's paths use: `gcsfs` behind `etils.epath` (`STORAGE_EMULATOR_HOST`) and
tensorstore for array data (`TENSORSTORE_GCS_HTTP_URL`); TensorBoard's writer goes through
`google-cloud-storage`, which reads `STORAGE_EMULATOR_HOST` too.

Before jaxllm wrote through `jaxllm.fs`, `pathlib.Path("gs://bkt/run")` became the local folder
`gs:/bkt/run`: every test here would find the files on local disk and none in the bucket.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("gcsfs", reason="gs:// paths need gcsfs (a jaxllm dependency)")
emulator = pytest.importorskip("gcp_storage_emulator.server", reason="needs gcp-storage-emulator (test extra)")

import portpicker  # noqa: E402

from jaxllm import fs  # noqa: E402

try:  # tests/ is a package (tests/__init__.py) or a plain directory on sys.path
    from tests.test_cli import SMALL, subprocess_env
    from tests.test_multihost import corpus, sft_command  # noqa: F401 - `corpus` is a fixture
    from tests.test_resume import trajectory
except ImportError:
    from test_cli import SMALL, subprocess_env
    from test_multihost import corpus, sft_command  # noqa: F401
    from test_resume import trajectory

BUCKET = "jaxllm-test"
TIMEOUT_S = 600


def _with_generation_headers(handler):
    """`handler` that also sends `x-goog-generation`, as Cloud Storage does on every object GET.

    The emulator leaves the header out; tensorstore reads it to make the conditional writes of an
    OCDBT manifest (orbax's array store) and otherwise fails with "Malformed StorageGeneration"
    as soon as a checkpoint writes a second array."""
    def wrapped(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - not found: the handler answered 404 already
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration") or 1)
    return wrapped


@pytest.fixture(scope="module")
def gcs():
    """The emulator's environment variables, also set in this process while the module runs."""
    from gcp_storage_emulator.handlers import objects

    for _, handlers in emulator.HANDLERS:
        for method, handler in handlers.items():
            if handler in (objects.download, objects.get):
                handlers[method] = _with_generation_headers(handler)
    port = portpicker.pick_unused_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "emulator"}
    with pytest.MonkeyPatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        yield env
    server.stop()


def fresh(name: str) -> str:
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:8]}/{name}"


def test_fs_primitives_on_cloud_storage(gcs):
    root = fs.path(fresh("unit"))
    # An object cannot be appended to: a plain `open(..., "a")` through gcsfs drops the old lines.
    fs.append_text(root / "metrics.jsonl", '{"step": 1}\n')
    fs.append_text(root / "metrics.jsonl", '{"step": 2}\n')
    assert (root / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    # A file written atomically replaces the old one and leaves no temporary object.
    fs.write_atomic(root / "done.json", "1")
    fs.write_atomic(root / "done.json", "2")
    assert (root / "done.json").read_text() == "2"
    # A directory is complete only once all its files are there (the marker comes last).
    entry = root / "cache" / "key"
    with fs.atomic_path(entry) as tmp:
        tmp.mkdir()
        fs.save_npy(tmp / "tokens.npy", np.arange(7, dtype=np.int32))
        assert not fs.dir_complete(entry)
    assert fs.dir_complete(entry) and fs.load_npy(entry / "tokens.npy").tolist() == list(range(7))
    # A failure leaves neither the entry nor a temporary behind.
    with pytest.raises(RuntimeError), fs.atomic_path(root / "cache" / "bad") as tmp:
        (tmp / "part.npy").write_bytes(b"half")
        raise RuntimeError("writer died")
    assert sorted(p.name for p in (root / "cache").iterdir()) == ["key"]
    assert sorted(p.name for p in root.iterdir()) == ["cache", "done.json", "metrics.jsonl"]
    assert fs.glob(os.fspath(root / "cache" / "*" / "*.npy")) == [entry / "tokens.npy"]


def rows_at(run_dir: str, stage: str = "pretrain") -> list[dict]:
    """The complete rows of a remote metrics.jsonl (empty while it does not exist)."""
    path = fs.path(run_dir) / stage / "metrics.jsonl"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run(env, cwd, args, run_dir, corpus_dir, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jaxllm.cli", *args, f"--config.data_root={corpus_dir}",
           f"--config.run_dir={run_dir}", *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_pretrain_on_gcs_killed_and_resumed_then_sft(gcs, corpus, tmp_path):
    """A pretraining run in `gs://` killed with SIGKILL between checkpoints and resumed gives the
    uninterrupted local run's trajectory exactly; SFT in the same `gs://` run directory starts from
    its `pretrain/params` (its trajectory equals SFT after the local pretraining); nothing is
    written to local disk under the working directory."""
    env = {**subprocess_env(tmp_path / "jax_cache"), **gcs}
    pretrain = ("pretrain", "--config", SMALL, "--config.checkpoint.every_steps=4")
    work = tmp_path / "work"
    work.mkdir()
    local = tmp_path / "local"
    run(env, work, pretrain, local, corpus)
    expected = [json.loads(line) for line in (local / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in expected)

    remote = fresh("run")
    cmd = [sys.executable, "-m", "jaxllm.cli", *pretrain, f"--config.data_root={corpus}", f"--config.run_dir={remote}"]
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=err)
    # SIGKILL as soon as step 5 is logged (past the first checkpoint at step 4, before the last).
    # No SIGSTOP first, as tests/test_resume.py does: a stopped client can hold the emulator's one
    # request thread.
    deadline, killed_at = time.monotonic() + TIMEOUT_S, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if max((r["step"] for r in rows_at(remote) if "loss" in r), default=0) >= 5:
                proc.kill()
                proc.wait()
                killed_at = max(r["step"] for r in rows_at(remote) if "loss" in r)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None, (tmp_path / "killed.err").read_text()[-4000:]
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < steps, f"the run finished (step {killed_at}) before it could be killed"
    assert not (fs.path(remote) / "pretrain" / "done.json").exists()

    run(env, work, pretrain, remote, corpus)
    assert trajectory(rows_at(remote)) == trajectory(expected)
    assert json.loads((fs.path(remote) / "pretrain" / "done.json").read_text())["step"] == steps
    for name in ("params", "checkpoints", "config.json"):
        assert (fs.path(remote) / "pretrain" / name).exists(), name
    assert (fs.path(remote) / "tokenizer" / "tokenizer.model").exists()

    run(env, work, sft_command(corpus), local, corpus)
    run(env, work, sft_command(corpus), remote, corpus)
    local_sft = [json.loads(line) for line in (local / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert trajectory(rows_at(remote, "sft")) == trajectory(local_sft)
    assert (fs.path(remote) / "sft" / "done.json").exists()
    assert sorted(p.name for p in work.iterdir()) == [], "a gs:// path was written to local disk"
