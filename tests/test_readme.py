"""README.md stays true: its shell examples parse in bash, its links stay inside the repository,
and every duration it quotes is recorded in bench/RESULTS.md (with date, machine and command)."""

import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
RESULTS = (REPO / "bench" / "RESULTS.md").read_text(encoding="utf-8")
# A duration as README writes them: "2 min 39 s", "8 minutes", "1,021 s", "17.5 minutes", "2.5 hours".
DURATION = re.compile(r"\b\d[\d,.]*\s(?:min \d+ s|minutes?|hours?|s)\b")


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)


def test_shell_examples_parse_in_bash():
    blocks = shell_blocks(README)
    assert blocks, "README has no bash blocks"
    for block in blocks:
        proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert proc.returncode == 0, f"bash rejects:\n{block}\n{proc.stderr}"
    # Inline examples too: `jaxllm ...` and `--config.key=value` spans (an unquoted '(' is what bash rejects).
    for span in re.findall(r"`((?:jaxllm |--config\.)[^`]*)`", README):
        proc = subprocess.run(["bash", "-n"], input=span, capture_output=True, text=True)
        assert proc.returncode == 0, f"bash rejects `{span}`: {proc.stderr}"


def test_links_point_inside_the_repository():
    for target in re.findall(r"\]\(([^)#\s]+)", README):
        if re.match(r"[a-z]+://", target):
            continue
        path = (REPO / target).resolve()
        assert REPO in path.parents or path == REPO, f"README links outside the repository: {target}"
        assert path.exists(), f"README links a missing file: {target}"


def test_every_duration_has_its_row_in_results():
    missing = [d for d in DURATION.findall(README) if d not in RESULTS]
    assert not missing, f"durations in README without a bench/RESULTS.md record: {missing}"
