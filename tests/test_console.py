"""What a user sees: the default run's console (stdout and stderr together) carries finetune's own lines and the
progress bars; every library line, warning and loss dict is in <run>/finetune.log only."""
import json
import re

LIBRARY_MARKS = ("Warning", "WARNING", "warnings.warn", "[INFO]", "kernels", "{'loss'", "{'eval_loss'",
                 "{'train_runtime'", "Traceback")


def quiet(output: str) -> None:
    """No escape sequence (the bars move with \\r only) and no line of a library's logger or `warnings`."""
    assert "\x1b" not in output, repr(output[output.index("\x1b") - 80:][:160])
    lines = text_lines(output)
    assert not [line for line in lines if any(mark in line for mark in LIBRARY_MARKS)], lines


def text_lines(output: str) -> list[str]:
    """The lines that are not progress bars (a bar redraws itself with \\r)."""
    return [line for line in output.split("\n") if line.strip() and "\r" not in line]


def test_the_console_has_no_library_line_no_escape_and_nothing_twice(default_run):
    # evaluate, predict, merge and ab: the same checks in tests/test_readme.py, on the README's commands
    run_dir, output = default_run
    quiet(output)
    lines = text_lines(output)
    assert len(lines) == len(set(lines)), lines
    summaries = [line for line in lines if line.startswith(("base:", "tuned:", "data:"))]  # metrics.json has all
    assert all(len(line) <= 160 for line in summaries), summaries
    log = (run_dir / "finetune.log").read_text()
    assert "FutureWarning" in log and "trainer: {'loss'" in log  # where the library lines went


def test_a_header_says_what_trains_before_training(default_run):
    run_dir, output = default_run  # conftest.py: the full default run, `python -m finetune`
    steps = json.loads(max((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                           key=lambda p: int(p.parent.name.split("-")[1])).read_text())["max_steps"]
    header = next(line for line in text_lines(output) if line.startswith("training: "))
    assert re.fullmatch(rf"training: 480 samples, {steps} steps, [\d,]+ trainable parameters \([\d.]+% of [\d,]+\); "
                        rf"run dir {re.escape(str(run_dir))}", header), header
    assert output.index(header) < output.index(f"{steps}/{steps}")  # before the training bar ends
    assert output.index("base: ") < output.index(header) < output.index("tuned: ")


def test_the_last_console_line_is_the_verdict_of_report_md_with_the_run_dir(default_run):
    run_dir, output = default_run
    last = text_lines(output)[-1]
    verdict = (run_dir / "report.md").read_text().splitlines()[2].replace("**", "")
    assert last == f"{verdict} Run dir: {run_dir}", (last, verdict)
    assert last.startswith(("Verdict: tuning helped.", "Verdict: tuning did not help."))
