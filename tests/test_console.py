"""What a user sees: a default run's console (stdout and stderr together) carries finetune's own lines and the
progress bars; every library line, warning and loss dict is in <run>/finetune.log only."""
import re
import subprocess
import sys

import pytest

from conftest import FAST, ROOT

LIBRARY_MARKS = ("Warning", "WARNING", "warnings.warn", "[INFO]", "kernels", "{'loss'", "{'eval_loss'",
                 "{'train_runtime'", "Traceback")


def console(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         timeout=600)  # bytes: text mode would turn the bars' \r into line ends
    assert out.returncode == 0, out.stdout[-3000:]
    return out.stdout.decode()


def text_lines(output: str) -> list[str]:
    """The lines that are not progress bars (a bar redraws itself with \\r)."""
    return [line for line in output.split("\n") if line.strip() and "\r" not in line]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("console") / "run"
    return run_dir, console("-m", "finetune", f"hydra.run.dir={run_dir}", *FAST)


@pytest.mark.parametrize("command", ["train", "evaluate", "merge"])
def test_the_console_has_no_library_line_no_escape_and_nothing_twice(default_run, tmp_path, command):
    run_dir, output = default_run
    if command == "evaluate":
        output = console("-m", "finetune.evaluate", str(run_dir), "eval.max_samples=8")
    elif command == "merge":
        output = console("-m", "finetune.merge", str(run_dir), str(tmp_path / "merged"))
    assert "\x1b" not in output, repr(output[output.index("\x1b") - 80:][:160])  # bars move with \r only
    lines = text_lines(output)
    assert not [line for line in lines if any(mark in line for mark in LIBRARY_MARKS)], lines
    said = [line for line in lines if not line.startswith("|---")]  # evaluate prints two tables, each with a rule
    assert len(said) == len(set(said)), said
    summaries = [line for line in lines if line.startswith(("base:", "tuned:", "data:"))]  # metrics.json has all
    assert all(len(line) <= 160 for line in summaries), summaries
    log = (run_dir / "finetune.log").read_text()
    assert "FutureWarning" in log and "trainer: {'loss'" in log  # where the library lines went


def test_a_header_says_what_trains_before_training(default_run):
    run_dir, output = default_run
    header = next(line for line in text_lines(output) if line.startswith("training: "))
    assert re.fullmatch(rf"training: 480 samples, 12 steps, [\d,]+ trainable parameters \([\d.]+% of [\d,]+\); "
                        rf"run dir {re.escape(str(run_dir))}", header), header
    assert output.index(header) < output.index("12/12")  # before the training bar ends
    assert output.index("base: ") < output.index(header) < output.index("tuned: ")
