"""The training loop's progress display when stderr is not a terminal (a log file, a pod's logs)."""

import io
import re

import jax
import tqdm.std

from jaxllm import sharding
from jaxllm.train import loop
from jaxllm.train import progress
from test_loop import poisoned_batches, poisoned_stage, stage_run_config


def test_a_stream_that_is_not_a_terminal_gets_plain_lines():
    stream = io.StringIO()
    bar = progress.progress_bar(total=30, initial=0, desc="sft", stream=stream)
    assert isinstance(bar, progress.LineProgress)
    for step in range(1, 31):
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix({"loss": f"{4.0 - step / 10:.4g}"})
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [re.match(r"sft: step (\d+)/30 \(\d+%\) loss=([\d.]+) \| ", line).groups() for line in lines] == [
        ("10", "3"), ("20", "2"), ("30", "1")]


def test_a_terminal_keeps_the_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress.progress_bar(total=3, initial=0, desc="sft", stream=Terminal())
    assert isinstance(bar, tqdm.std.tqdm)
    bar.close()


def test_training_loop_logs_one_line_per_interval_without_carriage_returns(tmp_path, capsys):
    """capsys's stderr is not a terminal: 6 steps logged every 2 give 3 progress lines."""
    config = stage_run_config(tmp_path, steps=6, log_every=2)
    config.train.progress_bar = True
    batches, evals = poisoned_batches(6, 4), poisoned_batches(1, 4)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    loop.run(config, poisoned_stage(config, batches, evals), mesh)
    err = capsys.readouterr().err
    assert "\r" not in err
    progress = [line for line in err.splitlines() if line.startswith("pretrain: step ")]
    assert [line.split()[2] for line in progress] == ["2/6", "4/6", "6/6"], err
    assert all("loss=" in line and "tokens_per_second=" in line for line in progress[1:]), progress
