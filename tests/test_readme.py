"""Every command in README.md's bash blocks runs as written, in README order, from a fresh folder (so outputs/ lands
there, not in the repository). What differs from a user's terminal is said per command:

- a placeholder (`outputs/<run>`, `in.jsonl`, `new.jsonl`, ...) is this test's file of that kind;
- where the README says a command takes minutes, the tiny model, a step limit and no latency metric (LIMIT) are
  added, and `model=smollm2_135m` becomes `model=tiny` (the tests load no real weights); a command that this makes the same
  as an earlier one is not run again: the earlier one's output is checked;
- a command for hardware or weights this machine lacks (a 7B folder, a CUDA GPU) must stop with one error line;
- the set-up line and `pytest` are the environment and the suite themselves;
- `python -m finetune ...` and the refused commands run in a child forked from an interpreter that imported the
  training stack once (tests/launcher.py), not in a fresh one: the consoles checked here (evaluate, predict, ab,
  merge) are a fresh interpreter's, and tests/test_console.py checks the Quick start's.
A command added to the README without a rule here fails `test_every_readme_command_has_a_rule`.
"""
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from launcher import launcher
from test_console import quiet

LIMIT = ["training.max_steps=1", "eval.max_samples=2", "eval.batch_size=2", "~eval.metrics.latency"]
SKIP = {"pip install": "the set-up: this environment is it", "pytest": "the suite this test is part of"}
REFUSES = {"/models/Qwen2.5-7B-Instruct": "no such folder", "finetune.bench": "no CUDA GPU"}


def readme_commands() -> list[tuple[str, str]]:
    """(command, its comment) for each command line of README.md's bash blocks."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a line ending in \ goes on on the next
            if line.strip() and not line.lstrip().startswith("#"):
                command, _, comment = line.partition("  #")
                found.append((command.strip(), comment.strip()))
    return found


COMMANDS = readme_commands()


def trains(command: str) -> bool:
    """A training run (the Quick start's aside, which the `work` fixture runs): slow-marked, ~20-40 s each."""
    return (command.startswith("python -m finetune ") and "dry_run=true" not in command and "--cfg" not in command
            and "incremental.adapter" not in command and not any(key in command for key in REFUSES))


def says_minutes(comment: str) -> bool:
    return bool(re.search(r"\bmin\b", comment))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The folder the commands run in, with the Quick start's run made first (outputs/<run> is that run)."""
    where = tmp_path_factory.mktemp("readme")
    out = shell(where, ["python", "-m", "finetune", *LIMIT], fresh=False)
    assert out.returncode == 0, out.stdout[-3000:]
    [run] = [p for p in (where / "outputs").glob("*/*-default")]
    snapshot = {"symbol": "BTC/USDT", "price": 50000, "technical": {"rsi": 28.4, "trend_direction": "bullish"}}
    (where / "in.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "market_data": snapshot}) + "\n"
                                            for i in range(4)))
    shutil.copy(ROOT / "data" / "demo_signals.jsonl", where / "new.jsonl")  # nothing new: the run is skipped
    shutil.copytree(run, where / "outputs" / "other")
    return {"dir": where, "<run>": str(run.relative_to(where)), "<a>": str(run.relative_to(where)),
            "<b>": "outputs/other", "ran": {}}


def shell(where, argv: list[str], fresh: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """The command's exit code and console (stderr in stdout). Not `fresh`: `python -m MODULE ...` as conftest.cli
    runs it, forked from an interpreter that imported the training stack, for commands whose console is not checked
    here (a training run's is, fresh, in tests/test_console.py): what imports print is not in it."""
    if not fresh and argv[:2] == ["python", "-m"]:
        return launcher().run(argv[2], argv[3:], cwd=where, merge=True, timeout=timeout)
    argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
    return subprocess.run(argv, cwd=where, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def as_run(command: str, comment: str, work: dict) -> list[str]:
    """The command with this test's files for the placeholders, and LIMIT where the README says minutes."""
    for name in ("<run>", "<a>", "<b>"):
        command = command.replace(f"outputs/{name}", work[name])
    argv = shlex.split(command)
    if says_minutes(comment) and argv[:3] == ["python", "-m", "finetune"]:
        argv = [("model=tiny" if a == "model=smollm2_135m" else a) for a in argv] + LIMIT
    return argv


def test_every_readme_command_has_a_rule():
    assert len(COMMANDS) >= 15
    for command, comment in COMMANDS:
        assert any(command.startswith(s) for s in SKIP) or command.startswith("python -m finetune"), command


@pytest.mark.parametrize("command, comment", [
    pytest.param(command, comment, id=command, marks=[pytest.mark.slow] if trains(command) else [])
    for command, comment in COMMANDS])
def test_the_readme_command_runs_as_written(work, command, comment):
    if any(command.startswith(s) for s in SKIP):
        pytest.skip(next(why for s, why in SKIP.items() if command.startswith(s)))
    if command == "python -m finetune":  # the `work` fixture ran it, with LIMIT (the README says < 1 min)
        assert (work["dir"] / work["<run>"] / "metrics.json").is_file()
        return
    argv = as_run(command, comment, work)
    if argv[:3] == ["python", "-m", "finetune.serve"]:
        return serve(work, argv)
    if argv[:4] == ["python", "-m", "finetune.ab", "report"]:
        decisions = [json.loads(line) for line in (work["dir"] / "decisions.jsonl").read_text().splitlines()]
        (work["dir"] / "outcomes.jsonl").write_text("".join(json.dumps({"id": d["id"], "pnl": i - 1.5}) + "\n"
                                                            for i, d in enumerate(decisions)))
    refused = next((why for key, why in REFUSES.items() if key in command), None)
    quiet_checked = argv[:3] != ["python", "-m", "finetune"] and not refused
    if tuple(argv) not in work["ran"]:  # as_run can make two commands one (smollm2_135m -> tiny): run it once
        work["ran"][tuple(argv)] = shell(work["dir"], argv, fresh=quiet_checked)
    out = work["ran"][tuple(argv)]
    if refused:  # one error line saying what is missing, no traceback
        errors = [line for line in out.stdout.splitlines() if line.startswith("error:")]
        assert out.returncode == 1 and len(errors) == 1 and refused in errors[0], out.stdout[-3000:]
        assert "Traceback" not in out.stdout
        return
    assert out.returncode == 0, out.stdout[-3000:]
    assert "Traceback" not in out.stdout, out.stdout[-3000:]
    if quiet_checked:  # evaluate, predict, ab, merge: the console as a run's
        quiet(out.stdout)
    if argv[3:4] == ["-m"]:
        sweep_has_one_run_dir_per_job(work["dir"])


def sweep_has_one_run_dir_per_job(where) -> None:
    """The README's sweep, in Hydra's default sweep dir (outputs/<date>/<time>-multirun-default, no
    hydra.sweep.dir): each job its own completed run dir, trained with its own values, and one leaderboard."""
    [sweep] = list(where.glob("outputs/*/*-multirun-default"))
    jobs = [sweep / str(n) for n in range(4)]
    assert all(json.loads((job / "status.json").read_text())["status"] == "completed" for job in jobs)
    assert all((job / "metrics.json").is_file() for job in jobs)
    configs = [json.loads((job / "manifest.json").read_text())["config"] for job in jobs]
    assert [(c["training"]["learning_rate"], c["method"]["r"]) for c in configs] == [
        (1e-3, 8), (1e-3, 16), (3e-3, 8), (3e-3, 16)]
    assert "| 4 |" in (sweep / "leaderboard.md").read_text()


def serve(work: dict, argv: list[str]) -> None:
    """The server starts and answers /health; the README's port is swapped for a free one."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [a if a != "8000" else str(port) for a in argv]
    server = subprocess.Popen([sys.executable, *argv[1:]], cwd=work["dir"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["status"] == "ok"
                return
            except httpx.TransportError:
                time.sleep(0.5)
        raise AssertionError("the server did not answer within 120 s")
    finally:
        server.terminate()
        server.wait(timeout=30)
