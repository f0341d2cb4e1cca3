"""Two hosts over loopback reproduce one host: `jaxllm pretrain` then `jaxllm sft`, 2 processes x 4
CPU devices against 1 process x 8 devices, through the real command line.

The two-host run is two subprocesses of this test joined by `jax.distributed` (coordinator on
127.0.0.1, gloo collectives), configured by the `distributed` section (explicit coordinator,
process id and count). Its pretraining is stopped by SIGTERM to process 1 only (JAX's
preemption service must stop both processes at the same step) and resumed; then SFT starts from
its pretraining params. Both runs use the same mesh, fsdp = 8 over the 8 devices.

Tolerance: rtol = 1e-5 on every metric and parameter (atol = 1e-6 for parameters near 0).
Both runs execute the same SPMD program on the same 8-way partition; only the transport of the
all-reduces changes (gloo inside one process vs. between two), which may change the order in
which a reduction adds its 8 partial sums: a relative error of a few f32 ulps (~1e-7 each) per
reduction, carried through 6 Adam steps. A real fault is orders of magnitude larger: a process
feeding the wrong rows, or a batch skipped or repeated on resume, changes the step's loss by
> 1e-4 relative (consecutive losses of this run differ by more than that). On jax 0.10.2 the
runs agree bit for bit.

Also: each process feeds exactly its own rows of every global batch (the digest each logs of its
first batch == its slice of the global batch rebuilt here), metrics and progress come from
process 0 only, checkpoints hold every process's data-iterator state; and `initialize_runtime`
finds a SLURM step from the `SLURM_*` variables alone.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

try:  # tests/ is a package (tests/__init__.py) or a plain directory on sys.path
    from tests.test_cli import SMALL, WORDS, subprocess_env, write_corpus
    from tests.test_resume import batch_digest, committed_checkpoints, read_rows, trajectory, wait_stopped
except ImportError:
    from test_cli import SMALL, WORDS, subprocess_env, write_corpus
    from test_resume import batch_digest, committed_checkpoints, read_rows, trajectory, wait_stopped

from jaxllm.cli import EXIT_PREEMPTED

RTOL, PARAM_ATOL = 1e-5, 1e-6
STEPS, BATCH, HOSTS = 6, 8, 2
TIMEOUT_S = 300
# tests/configs/small.py with a batch that splits over 8 devices, a checkpoint every 2 steps and a
# fixed peak (the measured one costs seconds per process and only feeds MFU).
PRETRAIN = ("pretrain", "--config", SMALL, f"--config.train.batch_size={BATCH}", f"--config.train.steps={STEPS}",
            "--config.checkpoint.every_steps=2", "--config.train.peak_flops_per_device=1e10")
SFT_CONFIG = f'''"""SFT on tests/test_multihost.py's conversations after tests/configs/small.py pretraining."""
from jaxllm.train import sft


def get_config():
    c = sft.default_config()
    c.data.update(sources="jsonl:{{data_root}}/sft_train.jsonl", eval_sources="jsonl:{{data_root}}/sft_val.jsonl",
                  seq_len=16)
    c.optimizer.update(lr=3e-3, min_lr=3e-4, warmup_steps=2)
    c.train.update(steps={STEPS}, batch_size={BATCH}, eval_every=3, eval_batches=2, log_every=1, progress_bar=False,
                   peak_flops_per_device=1e10)
    c.checkpoint.update(every_steps=2, every_minutes=0.0, keep=3)
    c.sample.prompts = ()  # pretraining covers sampling in a multi-host run; its compile costs ~10 s
    return c
'''
FIRST_BATCH = re.compile(r"process (\d+) of (\d+): first local batch .* sha256 ([0-9a-f]{64})")
ROWS = re.compile(r"process (\d+) of (\d+) reads rows (\d+):(\d+) of each global batch of (\d+) rows")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The pretraining text of tests/test_cli.py plus short conversations for SFT."""
    directory = write_corpus(tmp_path_factory.mktemp("corpus"))
    rng = np.random.default_rng(0)
    for name, n in (("sft_train", 80), ("sft_val", 16)):
        with open(directory / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                user, assistant = (" ".join(rng.choice(WORDS[:8], k)) for k in (1, 2))
                f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                                 {"role": "assistant", "content": assistant}]}) + "\n")
    (directory / "sft_small.py").write_text(SFT_CONFIG)
    return directory


@pytest.fixture(scope="module")
def base_env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.getbasetemp() / "jax_compilation_cache")


def sft_command(corpus):
    return ("sft", "--config", str(corpus / "sft_small.py"))


class Job:
    """One jaxllm command on `hosts` processes (1 x 8 or 2 x 4 CPU devices), output in files."""

    def __init__(self, env, corpus, run_dir: pathlib.Path, args, *, hosts: int, name: str):
        self.run_dir, self.name = run_dir, name
        port = portpicker.pick_unused_port()
        self.procs, self.logs = [], []
        for p in range(hosts):
            proc_env = dict(env, JAX_NUM_CPU_DEVICES=str(8 // hosts))
            cmd = [sys.executable, "-m", "jaxllm.cli", *args, f"--config.data_root={corpus}",
                   f"--config.run_dir={run_dir}"]
            if hosts > 1:
                cmd += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                        f"--config.distributed.num_processes={hosts}", f"--config.distributed.process_id={p}",
                        "--config.distributed.initialization_timeout=120"]
            out, err = (run_dir.parent / f"{name}.p{p}.{s}" for s in ("out", "err"))
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w") as fo, open(err, "w") as fe:
                self.procs.append(subprocess.Popen(cmd, cwd=run_dir.parent, env=proc_env, stdout=fo, stderr=fe))
            self.logs.append((out, err))

    def stdout(self, p: int) -> str:
        return self.logs[p][0].read_text()

    def stderr(self, p: int) -> str:
        return self.logs[p][1].read_text()

    def wait(self, expect: int = 0) -> "Job":
        deadline = time.monotonic() + TIMEOUT_S
        try:
            for proc in self.procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()
        codes = [proc.returncode for proc in self.procs]
        assert codes == [expect] * len(self.procs), f"{self.name}: exit codes {codes}\n" + "\n".join(
            f"--- process {p} stderr ---\n{self.stderr(p)[-4000:]}" for p in range(len(self.procs)))
        return self

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()


def last_step(run_dir: pathlib.Path) -> int:
    return max((r["step"] for r in read_rows(run_dir, "pretrain", strict=False) if "loss" in r), default=0)


def assert_close_trajectories(got: list[dict], want: list[dict]) -> None:
    got, want = trajectory(got), trajectory(want)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    worst = 0.0
    for g, w in zip(got, want):
        assert g["step"] == w["step"]
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=RTOL, atol=0, err_msg=f"step {w['step']} {key}")
            worst = max(worst, abs(g[key] - w[key]) / max(abs(w[key]), 1e-30))
    print(f"largest relative metric difference: {worst:.3g}")


def load_params(directory: pathlib.Path) -> dict:
    """Exported params as NumPy arrays (no target shardings: the two runs' meshes differ)."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(directory)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(directory, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_close_params(got_dir: pathlib.Path, want_dir: pathlib.Path) -> None:
    import jax

    got, want = load_params(got_dir), load_params(want_dir)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=PARAM_ATOL, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def one_host(base_env, corpus, tmp_path_factory):
    """The reference: pretrain then SFT on 1 process x 8 devices."""
    run_dir = tmp_path_factory.mktemp("one_host") / "run"
    Job(base_env, corpus, run_dir, PRETRAIN, hosts=1, name="pretrain").wait()
    Job(base_env, corpus, run_dir, sft_command(corpus), hosts=1, name="sft").wait()
    return run_dir


@pytest.fixture(scope="module")
def two_hosts(base_env, corpus, tmp_path_factory):
    """Pretraining on 2 x 4 devices stopped by SIGTERM to process 1, resumed, then SFT.

    Returns (run_dir, {"stopped", "frozen", "first", "resumed", "sft", "params_after_stop"}): the
    step the SIGTERM run stopped at, the step it was frozen at to be signalled, the jobs, and
    whether the stopped run exported params.
    """
    run_dir = tmp_path_factory.mktemp("two_hosts") / "run"
    first = Job(base_env, corpus, run_dir, PRETRAIN, hosts=HOSTS, name="pretrain1")
    frozen = None
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while frozen is None and time.monotonic() < deadline:
            assert all(p.poll() is None for p in first.procs), "a process ended before the SIGTERM"
            if 1 <= last_step(run_dir) <= 3:
                for proc in first.procs:  # freeze both, so the step read is where they stand
                    proc.send_signal(signal.SIGSTOP)
                    wait_stopped(proc.pid)
                if 1 <= last_step(run_dir) <= 3:
                    frozen = last_step(run_dir)
                    first.procs[1].send_signal(signal.SIGTERM)  # delivered when it continues
                for proc in first.procs:
                    proc.send_signal(signal.SIGCONT)
            time.sleep(0.002)
        assert frozen is not None, f"no step 1..3 within {TIMEOUT_S} s\n{first.stderr(0)[-3000:]}"
    finally:
        if frozen is None:
            first.kill()
    first.wait(expect=EXIT_PREEMPTED)
    stopped = max(r["step"] for r in read_rows(run_dir, "pretrain") if "loss" in r)
    params_after_stop = (run_dir / "pretrain" / "params").exists()
    resumed = Job(base_env, corpus, run_dir, PRETRAIN, hosts=HOSTS, name="pretrain2").wait()
    sft = Job(base_env, corpus, run_dir, sft_command(corpus), hosts=HOSTS, name="sft").wait()
    return run_dir, {"stopped": stopped, "frozen": frozen, "first": first, "resumed": resumed, "sft": sft,
                     "params_after_stop": params_after_stop}


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_the_same_step(two_hosts):
    run_dir, r = two_hosts
    stopped, first = r["stopped"], r["first"]
    assert r["frozen"] <= stopped < STEPS
    for p in range(HOSTS):  # process 0 got no signal: the preemption service told it
        assert f"pretrain: stopped by SIGTERM at step {stopped}" in first.stderr(p), first.stderr(p)[-3000:]
        assert "Traceback" not in first.stderr(p)
    assert "SIGTERM caught" in first.stderr(1) and "SIGTERM caught" not in first.stderr(0)
    # Both hosts wrote the checkpoint of that step: the train state and each one's data iterator.
    assert stopped in committed_checkpoints(run_dir)
    data = run_dir / "pretrain" / "checkpoints" / str(stopped) / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    for p in range(HOSTS):
        assert f"resuming pretrain from step {stopped}" in r["resumed"].stderr(p)
    assert not r["params_after_stop"]  # unfinished: nothing handed on


@pytest.mark.slow
def test_pretrain_two_hosts_match_one_host(one_host, two_hosts):
    run_dir, _ = two_hosts
    got, want = read_rows(run_dir, "pretrain"), read_rows(one_host, "pretrain")
    assert [r["step"] for r in got if "loss" in r] == list(range(1, STEPS + 1))  # one row per step
    losses = [r["loss"] for r in want if "loss" in r]
    assert min(abs(a - b) / a for a, b in zip(losses, losses[1:])) > 10 * RTOL  # the tolerance can see a slip
    assert_close_trajectories(got, want)
    assert_close_params(run_dir / "pretrain" / "params", one_host / "pretrain" / "params")


@pytest.mark.slow
def test_sft_two_hosts_match_one_host(one_host, two_hosts):
    run_dir, r = two_hosts
    got, want = read_rows(run_dir, "sft"), read_rows(one_host, "sft")
    assert [x["step"] for x in got if "loss" in x] == list(range(1, STEPS + 1))
    assert_close_trajectories(got, want)
    assert_close_params(run_dir / "sft" / "params", one_host / "sft" / "params")
    for p in range(HOSTS):
        assert "sft finished at step 6" in r["sft"].stdout(p)


def pretrain_datasets(run_dir: pathlib.Path, process_count: int):
    from jaxllm import config as config_lib
    from jaxllm.data import lm
    from jaxllm.data import tokenizer as tokenizer_lib

    config = config_lib.load_json(run_dir / "pretrain" / "config.json")
    tok = tokenizer_lib.Tokenizer.load(config_lib.tokenizer_dir(run_dir) / "tokenizer.model")
    return [lm.lm_dataset(config.data, tok, split="train", global_batch_size=config.train.batch_size,
                          seed=config.seed, cache_dir=lm.resolve_cache_dir(config.data, run_dir),
                          data_root=config.data_root, process_index=p, process_count=process_count)
            for p in range(process_count)]


@pytest.mark.slow
def test_each_host_feeds_its_own_rows(two_hosts):
    """The digest each process logs of the first batch it fed (step 1, and the step after the
    restored checkpoint) is that of rows [p*4, (p+1)*4) of the one-host global batch."""
    run_dir, r = two_hosts
    (global_ds,) = pretrain_datasets(run_dir, 1)
    local_ds = pretrain_datasets(run_dir, HOSTS)
    local = BATCH // HOSTS
    for job, index in ((r["first"], 0), (r["resumed"], r["stopped"])):
        whole = global_ds[index]
        for p in range(HOSTS):
            err = job.stderr(p)
            assert [m.groups() for m in ROWS.finditer(err)] == [
                (str(p), str(HOSTS), str(p * local), str((p + 1) * local), str(BATCH))]
            digests = [m.group(3) for m in FIRST_BATCH.finditer(err) if m.group(1) == str(p)]
            assert digests, err[-3000:]
            mine = {k: v[p * local:(p + 1) * local] for k, v in whole.items()}
            assert digests[0] == batch_digest(mine) == batch_digest(local_ds[p][index]), (job.name, p)


@pytest.mark.slow
def test_metrics_and_progress_come_from_process_zero(two_hosts):
    run_dir, r = two_hosts
    for job in (r["resumed"], r["sft"]):
        assert re.search(r"^final step 6: eval/loss=", job.stdout(0), re.M), job.stdout(0)
        assert "final step" not in job.stdout(1) and "[sample" not in job.stdout(1)
    # Sampling gathers the params from both hosts; process 0 alone samples and writes.
    assert "[sample @ 6]" in r["resumed"].stdout(0)
    assert len((run_dir / "pretrain" / "samples.jsonl").read_text().splitlines()) == 1
    for stage in ("pretrain", "sft"):
        train = [x["step"] for x in read_rows(run_dir, stage) if "loss" in x]
        assert train == sorted(set(train))  # one writer: no row twice


SLURM_PROBE = """
import json, jax, numpy as np
from jax.experimental import multihost_utils
from jaxllm import sharding
from jaxllm.train import pretrain
sharding.initialize_runtime(pretrain.default_config())
ids = multihost_utils.process_allgather(np.array([jax.process_index()]), tiled=True)
print(json.dumps({"index": jax.process_index(), "count": jax.process_count(), "devices": jax.device_count(),
                  "gathered": ids.tolist()}))
"""


def slurm_env(procid: int, ntasks: int = 2) -> dict[str, str]:
    """What `srun --ntasks=N` sets in task `procid` (the variables JAX's SLURM detection reads)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(ntasks),
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid)}


@pytest.mark.slow
def test_slurm_step_is_detected_from_its_environment(base_env, tmp_path):
    """Two processes with only `SLURM_*` variables (and JAX_COORDINATOR_PORT for a free port; a
    real job derives it from the job id) form one 2-process job with default config."""
    port = str(portpicker.pick_unused_port())
    procs = [subprocess.Popen([sys.executable, "-c", SLURM_PROBE], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(base_env, JAX_NUM_CPU_DEVICES="2", JAX_COORDINATOR_PORT=port, **slurm_env(p)))
             for p in range(2)]
    try:
        outs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for p, (out, err) in enumerate(outs):
        assert procs[p].returncode == 0, err[-3000:]
        (line,) = [x for x in out.splitlines() if x.startswith("{")]  # gloo prints to stdout too
        got = json.loads(line)
        assert got == {"index": p, "count": 2, "devices": 4, "gathered": [0, 1]}


@pytest.mark.parametrize("env, expected", [
    (slurm_env(1), "slurm"),
    (slurm_env(0, ntasks=1), ""),  # a one-task step needs no distributed runtime
    ({k: v for k, v in slurm_env(1).items() if k != "SLURM_STEP_NODELIST"}, ""),  # the batch script, not a step
])
def test_detected_cluster(monkeypatch, env, expected):
    from jaxllm import sharding

    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "KUBERNETES_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert sharding.detected_cluster() == expected
    section = sharding.distributed_config()
    if expected:  # detection fills in everything: only the timeout is passed
        assert sharding.distributed_init_kwargs(section) == {"initialization_timeout": 300}
    else:
        assert sharding.distributed_init_kwargs(section) is None


def test_tpu_pod_is_left_to_jax_detection(monkeypatch):
    """On a Cloud TPU pod JAX's GCE cluster environment answers from the TPU metadata (faked here:
    no metadata server); jaxllm then calls `jax.distributed.initialize()` with nothing but the
    timeout, for JAX to fill in coordinator, process count and id (what launch/tpu.py relies on)."""
    from jax._src import clusters

    from jaxllm import sharding

    (gce,) = [env for env in clusters.ClusterEnv._cluster_types if env.name == "gcetpu"]
    assert sharding.detected_cluster() == ""  # this machine is no TPU VM
    section = sharding.distributed_config()
    assert sharding.distributed_init_kwargs(section) is None
    monkeypatch.setattr(gce, "is_env_present", classmethod(lambda cls: True))
    monkeypatch.setattr(gce, "get_process_count", classmethod(lambda cls: 4))
    assert sharding.detected_cluster() == "gcetpu"
    assert sharding.distributed_init_kwargs(section) == {"initialization_timeout": 300}
    monkeypatch.setattr(gce, "get_process_count", classmethod(lambda cls: 1))  # a single-host TPU VM
    assert sharding.distributed_init_kwargs(section) is None


@pytest.mark.parametrize("overrides, message", [
    (dict(num_processes=2), "set distributed.coordinator_address, distributed.process_id"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "expected HOST:PORT"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2), "process_id=2 must be <"),
    (dict(mode="sometimes"), "distributed.mode='sometimes'"),
    (dict(local_device_ids="0;1", coordinator_address="h:1", num_processes=1, process_id=0), "local_device_ids"),
    (dict(mode="on"), "distributed.mode=on: set distributed.coordinator_address"),
])
def test_bad_distributed_section_is_a_config_error(overrides, message):
    from jaxllm import sharding
    from jaxllm.config import ConfigError

    section = sharding.distributed_config()
    section.update(overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        sharding.distributed_init_kwargs(section)


def test_off_and_default_need_no_runtime():
    from jaxllm import sharding

    section = sharding.distributed_config()
    assert sharding.distributed_init_kwargs(section) is None
    section.update(mode="off", coordinator_address="localhost:1234", num_processes=2, process_id=0)
    assert sharding.distributed_init_kwargs(section) is None
