"""Reliability: resume after SIGKILL to the same result, incomplete checkpoints, NaN, secrets, no network."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import ANY

import pytest
from safetensors.torch import load_file

from conftest import ROOT, cli
from launcher import Child, launcher
from finetune.errors import ConfigError
from finetune.train.resume import problem, resume_from

RESUMABLE = ["training.max_steps=30", "training.save_steps=5", "training.eval_steps=5", "training.logging_steps=5",
             "training.save_total_limit=3", "training.load_best_model_at_end=false", "eval.max_samples=8"]


def final_log(run_dir: Path) -> dict:
    last = max((p for p in (run_dir / "checkpoints").glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def start(run_dir: Path) -> Child:
    """`python -m finetune` as conftest.cli runs it, returning at once: a kill ends the process the run is in."""
    return launcher().start("finetune", [*RESUMABLE, f"hydra.run.dir={run_dir}"], cwd=ROOT)


def kill_when(proc: Child, ready, timeout=300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must end equal to."""
    run_dir = tmp_path_factory.mktemp("straight")
    out = cli(*RESUMABLE, f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def assert_same_run(a_dir: Path, b_dir: Path, resumed_at: int | None = None) -> None:
    """The same losses at every logged step (within 1e-3) and the same adapter weights. A logged loss is the mean
    of the 5 steps before it: the one whose window a resume at `resumed_at` cuts in two holds only its later
    steps, so it is not compared."""
    a, b = final_log(a_dir), final_log(b_dir)
    assert set(a) == set(b) == {5, 10, 15, 20, 25, 30}
    for step in a:
        if resumed_at is None or not step - 5 < resumed_at < step:
            assert abs(a[step] - b[step]) < 1e-3, (step, a[step], b[step])
    weights_a = load_file(a_dir / "adapter" / "adapter_model.safetensors")
    weights_b = load_file(b_dir / "adapter" / "adapter_model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(name.count("lora_A") <= 1 and name.count("base_model.model") == 1 for name in weights_b)
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) < 1e-4


@pytest.mark.slow
def test_sigkill_three_times_then_resume_matches_an_uninterrupted_run(straight, tmp_path):
    killed = tmp_path / "killed"
    ckpt = killed / "checkpoints"
    kill_points = [
        lambda: (ckpt / "checkpoint-10").is_dir(),                       # the moment a save starts: mid-save
        lambda: (ckpt / "checkpoint-15" / "trainer_state.json").is_file(),  # just after a complete save
        lambda: (ckpt / "checkpoint-20" / "adapter_model.safetensors").is_file(),  # mid-save, adapter written
    ]
    for ready in kill_points:
        kill_when(start(killed), ready)
        assert json.loads((killed / "status.json").read_text())["status"] == "running"
        assert not (killed / "metrics.json").exists() and not (killed / "adapter").exists()
    out = cli(*RESUMABLE, f"hydra.run.dir={killed}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in (killed / "finetune.log").read_text()
    assert_same_run(straight, killed)


def test_killed_after_the_last_checkpoint_the_rerun_trains_no_extra_step(straight, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    for name in ("adapter", "metrics.json", "report.md", "status.json"):  # as a kill after the final save leaves it
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    out = cli(*RESUMABLE, f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint-30 is the last step's" in (run_dir / "finetune.log").read_text()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-20", "checkpoint-25", "checkpoint-30"]  # no checkpoint-31: no step past max_steps
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    tuned = json.loads((straight / "metrics.json").read_text())["tuned"]
    timed = {k: ANY for k in tuned if "latency" in k or k.endswith("per_second") or k == "generation_seconds"}
    assert json.loads((run_dir / "metrics.json").read_text())["tuned"] == tuned | timed


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_next_step_and_the_rerun_matches(straight, tmp_path):
    stopped = tmp_path / "stopped"
    proc = start(stopped)
    first = stopped / "checkpoints" / "checkpoint-5" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.is_file():  # training is under way, between two periodic saves
        assert proc.poll() is None and time.time() < deadline, proc.stderr()[-2000:]
        time.sleep(0.01)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr()[-2000:]
    status = json.loads((stopped / "status.json").read_text())
    assert status["status"] == "interrupted", status
    step = int(re.search(r"SIGTERM at step (\d+), checkpoint-\1 saved", status["error"]).group(1))
    assert 5 <= step < 30
    checkpoint = stopped / "checkpoints" / f"checkpoint-{step}"
    assert problem(checkpoint) is None
    assert (checkpoint / "trainer_state.json").stat().st_mtime - sent < 10  # saved within 10 s of the signal
    assert not (stopped / "adapter").exists() and not (stopped / "metrics.json").exists()
    out = cli(*RESUMABLE, f"hydra.run.dir={stopped}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from {checkpoint}" in (stopped / "finetune.log").read_text()
    assert_same_run(straight, stopped, resumed_at=step)


def children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "stat").exists()
            and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_ranks_share_a_run_dir_and_killed_together_resume_in_step_to_the_uninterrupted_result(tmp_path):
    steps = ["training.max_steps=10", *RESUMABLE[1:-1], "eval.max_samples=4"]

    def job(run_dir: Path | None) -> list[str]:
        return ["torchrun", "--nproc_per_node", "2", "-m", "finetune", *steps,
                *([f"hydra.run.dir={run_dir}"] if run_dir else [])]
    # uninterrupted, in Hydra's default run dir: both ranks (started apart) take the launcher's time stamp
    out = subprocess.run(job(None), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs").glob("*/*/status.json")]
    assert len(run_dirs) == 1, run_dirs
    straight, killed = run_dirs[0], tmp_path / "killed"
    assert len(list(tmp_path.rglob("metrics.json"))) == 1 and (straight / "adapter").is_dir()  # rank 0 writes
    digests = {line.split("rank ")[1].split(" ")[0]: line.rsplit(" ", 1)[1]
               for line in (straight / "finetune.log").read_text().splitlines() if "first batch digest" in line}
    assert set(digests) == {"0", "1"} and digests["0"] != digests["1"]  # each rank trains on its own shard
    proc = subprocess.Popen(job(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    saved = killed / "checkpoints" / "checkpoint-5" / "trainer_state.json"
    deadline = time.time() + 300
    while not saved.is_file():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.005)
    job_pids = [proc.pid, *children(proc.pid)]  # torchrun starts each rank in a session of its own
    assert len(job_pids) == 3, job_pids
    for pid in job_pids:  # the whole job, as a node failure would
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
                   for pid in job_pids)
    assert json.loads((killed / "status.json").read_text())["status"] == "running"
    out = subprocess.run(job(killed), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (killed / "finetune.log").read_text()
    resumed = {line.split("rank ")[1].split(" ")[0]: line.rsplit("/", 1)[1] for line in log.splitlines()
               if " resumes from " in line}
    last = max(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("checkpoint-*"))
    assert set(resumed) == {"0", "1"} and len(set(resumed.values())) == 1, resumed  # both ranks, one step
    assert int(resumed["0"].split("-")[1]) >= 5 and last == 10
    a, b = final_log(straight), final_log(killed)
    assert set(a) == set(b) == {5, 10}
    assert all(abs(a[step] - b[step]) < 1e-3 for step in a), (a, b)
    weights_a = load_file(straight / "adapter" / "adapter_model.safetensors")
    weights_b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) < 1e-4


def fake_checkpoint(folder: Path, step: int, complete: bool, layout: str = "peft") -> Path:
    """A checkpoint folder laid out as the Trainer writes it: plain PEFT (adapter, optimizer.pt, scheduler.pt),
    DeepSpeed (global_stepN/ holds the optimizer), FSDP sharded (pytorch_model_fsdp_0/, optimizer_0/) or
    save_only_model (no optimizer); trainer_state.json last."""
    import torch
    from safetensors.torch import save_file
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    weights = {"lora_A": torch.ones(4, 8), "lora_B": torch.zeros(8, 4)}
    if layout == "fsdp":
        (path / "pytorch_model_fsdp_0").mkdir()
        (path / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard")
        (path / "optimizer_0").mkdir()
    else:
        save_file(weights, path / "adapter_model.safetensors")
    if layout == "peft":
        torch.save({"state": {0: {"exp_avg": torch.ones(4, 8)}}}, path / "optimizer.pt")
        torch.save({"last_epoch": step}, path / "scheduler.pt")
        torch.save({"cpu": torch.get_rng_state()}, path / "rng_state.pth")
    if layout == "deepspeed":
        (path / f"global_step{step}").mkdir()
        torch.save({"module": weights}, path / f"global_step{step}" / "mp_rank_00_model_states.pt")
        (path / "latest").write_text(f"global_step{step}")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}) if complete
                                             else '{"log_hist')  # killed while writing it
    return path


def test_incomplete_checkpoint_is_deleted_and_never_resumed(tmp_path):
    good = fake_checkpoint(tmp_path / "checkpoints", 10, complete=True)
    bad = fake_checkpoint(tmp_path / "checkpoints", 20, complete=False)
    assert resume_from("auto", tmp_path) == str(good)
    assert not bad.exists()
    with pytest.raises(ConfigError, match="incomplete"):
        resume_from(str(fake_checkpoint(tmp_path / "other", 5, complete=False)), tmp_path)


@pytest.mark.parametrize("layout", ["deepspeed", "fsdp", "save_only_model"])
def test_checkpoints_of_every_layout_are_kept_and_resumed(layout, tmp_path):
    older = fake_checkpoint(tmp_path / "checkpoints", 10, complete=True, layout=layout)
    newest = fake_checkpoint(tmp_path / "checkpoints", 20, complete=True, layout=layout)
    assert resume_from("auto", tmp_path) == str(newest)
    assert older.exists() and newest.exists()
    assert resume_from(str(newest), tmp_path) == str(newest)


def test_a_truncated_or_mislabelled_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, caplog):
    good = fake_checkpoint(tmp_path / "checkpoints", 10, complete=True)
    truncated = fake_checkpoint(tmp_path / "checkpoints", 20, complete=True)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[:-40])  # a crash mid-copy, a quota
    other = tmp_path / "other" / "checkpoints"
    fake_checkpoint(other, 10, complete=True)
    renamed = fake_checkpoint(other, 30, complete=True)
    (renamed / "trainer_state.json").write_text(json.dumps({"global_step": 25}))
    with caplog.at_level("WARNING", logger="finetune"):
        assert resume_from("auto", tmp_path, main=False) == str(good)
        assert truncated.exists()  # another rank: the same choice, nothing deleted
        assert resume_from("auto", tmp_path) == str(good)
        assert resume_from(str(tmp_path / "other"), tmp_path) == str(other / "checkpoint-10")
    assert not truncated.exists()
    assert "adapter_model.safetensors is truncated or corrupt" in caplog.text
    assert "says step 25, not 30" in caplog.text


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_newest_checkpoint_with_an_empty_or_truncated_torch_file_is_skipped_for_the_one_before(name, tmp_path,
                                                                                                   caplog):
    good = fake_checkpoint(tmp_path / "checkpoints", 10, complete=True)
    empty = fake_checkpoint(tmp_path / "checkpoints", 20, complete=True)
    truncated = fake_checkpoint(tmp_path / "checkpoints", 30, complete=True)
    (empty / name).write_bytes(b"")  # a node crash: trainer_state.json reached the disk, this file's data did not
    (truncated / name).write_bytes((truncated / name).read_bytes()[:-30])
    assert problem(empty) == f"{name} is empty (0 bytes)"
    assert problem(truncated) == f"{name} is truncated or corrupt"
    with caplog.at_level("WARNING", logger="finetune"):
        assert resume_from("auto", tmp_path) == str(good)
    assert not empty.exists() and not truncated.exists()
    assert f"{name} is empty" in caplog.text and f"{name} is truncated" in caplog.text


TEN_STEPS = ["training.max_steps=10", "training.save_steps=5", "training.eval_steps=5", "eval.max_samples=4",
             "training.logging_steps=1", "training.load_best_model_at_end=false", "eval=perplexity"]


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 10-step run (checkpoints 5 and 10, the loss logged at every step) and the names of the files
    it fsynced, in order. The two tests below each copy it and break the copy their own way."""
    from conftest import compose
    from finetune.runner import run
    run_dir = tmp_path_factory.mktemp("ten") / "run"
    saved = []
    real_fsync = os.fsync

    def fsync(fd):
        saved.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return real_fsync(fd)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        run(compose(*TEN_STEPS), run_dir)
    return run_dir, saved


def test_a_rerun_after_a_crash_that_emptied_the_newest_optimizer_resumes_from_the_one_before(ten_steps, tmp_path):
    import torch
    from conftest import compose
    from finetune.runner import run
    finished, saved = ten_steps
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors"):
        assert saved.index(name) < saved.index("trainer_state.json")  # every checkpoint file reaches the disk first
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    newest = run_dir / "checkpoints" / "checkpoint-10"
    (newest / "optimizer.pt").write_bytes(b"")
    longer = [step.replace("max_steps=10", "max_steps=15") for step in TEN_STEPS]
    run(compose(*longer), run_dir)  # resumes from checkpoint-5 (the Trainer alone dies on checkpoint-10 with EOFError)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert torch.load(newest / "optimizer.pt", weights_only=False)["state"]  # steps 6-10 trained again and saved
    steps = [e["step"] for e in json.loads((run_dir / "checkpoints" / "checkpoint-15" / "trainer_state.json")
                                           .read_text())["log_history"] if "loss" in e]
    assert steps[-1] == 15


def test_after_a_resume_the_report_counts_the_loss_and_seconds_of_every_segment(ten_steps, tmp_path):
    from conftest import compose
    from finetune.runner import run
    run_dir = tmp_path / "run"
    shutil.copytree(ten_steps[0], run_dir)
    # a kill after the first checkpoint: what the second run finds
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-10")
    shutil.rmtree(run_dir / "adapter")
    began = time.perf_counter()
    run(compose(*TEN_STEPS), run_dir)
    second = time.perf_counter() - began
    history = json.loads((run_dir / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 10  # steps 1-5 from the first run, 6-10 from the second
    report = (run_dir / "report.md").read_text()
    loss = float(re.search(r"\| train loss \| ([0-9.]+) \|", report).group(1))
    assert abs(loss - sum(losses) / 10) < 1e-3, (loss, losses)
    seconds = json.loads((run_dir / "manifest.json").read_text())["seconds"]
    assert seconds > second  # the first run's seconds up to checkpoint-5 are counted too


def test_resume_false_starts_over_and_true_needs_a_checkpoint(tmp_path):
    fake_checkpoint(tmp_path / "checkpoints", 10, complete=True)
    assert resume_from(False, tmp_path) is None and not (tmp_path / "checkpoints").exists()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resume_from(True, tmp_path)
    assert resume_from("auto", tmp_path) is None


def test_nan_loss_stops_with_advice(tmp_path):
    out = cli("training.learning_rate=1e38", "training.max_steps=20", "eval.max_samples=8", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 1
    assert "loss became nan" in out.stderr and "lower training.learning_rate" in out.stderr
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and "nan" in status["error"]
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()


SECRETS = {"WANDB_API_KEY": "wandb-secret-7f3a9c", "HF_TOKEN": "hf_secret_token_91ab"}


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A run with secrets in its environment and overrides that also sets a pair of settings the Trainer warns
    about at start-up (non_blocking without pinned memory): the secrets test reads its files, the warnings test
    its console and log."""
    run_dir = tmp_path_factory.mktemp("secrets")
    out = cli("+api_key=sk-config-secret-42", "+training.hub_token=hf_config_token_5d2e",
              "+training.dataloader_pin_memory=false", "+training.accelerator_config.non_blocking=true",
              "training.max_steps=6", "training.save_steps=3", "training.eval_steps=3", "eval.max_samples=8",
              f"hydra.run.dir={run_dir}", env={**os.environ, **SECRETS})
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir, out


def test_secrets_appear_in_no_saved_file_checkpoints_included(secret_run):
    tmp_path, _ = secret_run
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.name == "training_args.bin" for p in files)  # the Trainer's pickled arguments
    for path in files:
        data = path.read_bytes()
        for value in (*SECRETS.values(), "sk-config-secret-42", "hf_config_token_5d2e"):
            assert value.encode() not in data, f"{value} found in {path}"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["api_key"] == "<redacted>" and manifest["config"]["training"]["hub_token"] == "<redacted>"


def test_a_secret_override_reaches_no_file_and_no_console_when_the_run_crashes_under_wandb(tmp_path):
    secret = "hf_argv_secret_0c1d2e"
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = cli(f"+training.hub_token={secret}", "cpu_threads=1", "+training.report_to=[wandb]", "training.max_steps=2",
              "training.save_steps=1", "training.eval_steps=1", "eval.max_samples=4",
              "++training.metric_for_best_model=eval_no_such_metric",  # crashes at the first save
              f"hydra.run.dir={tmp_path}", env=env)
    assert out.returncode != 0 and "eval_no_such_metric" in out.stderr, out.stderr[-2000:]
    assert "Error executing job with overrides" in out.stderr  # Hydra's crash line, which lists the overrides
    wandb_files = [p for p in tmp_path.rglob("*") if p.is_file() and "wandb" in p.parts]
    assert any(p.name.endswith(".wandb") for p in wandb_files)  # the offline run, which records argv
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert secret.encode() not in path.read_bytes(), f"the secret is in {path}"
    assert secret not in out.stdout and secret not in out.stderr
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


def test_only_secret_named_overrides_with_a_text_value_leave_argv(monkeypatch):
    from finetune.rundir import hide_secret_overrides
    argv = ["+training.hub_token=hf_abc123456", "training.learning_rate=1e-4", "++api_key=sk-99887766",
            "training.hub_token=null", "+training.pad_token=<pad>", "model.path=/models/x"]
    hidden = hide_secret_overrides(argv)
    assert hidden == ["+training.hub_token=${oc.env:FINETUNE_SECRET_0,null}", "training.learning_rate=1e-4",
                      "++api_key=${oc.env:FINETUNE_SECRET_1,null}", "training.hub_token=null",
                      "+training.pad_token=<pad>", "model.path=/models/x"]
    assert os.environ["FINETUNE_SECRET_0"] == "hf_abc123456" and os.environ["FINETUNE_SECRET_1"] == "sk-99887766"
    monkeypatch.delenv("FINETUNE_SECRET_0")
    monkeypatch.delenv("FINETUNE_SECRET_1")


def test_vocabulary_tokens_are_not_secrets():
    from finetune.rundir import redact, secret_values
    config = {"training": {"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "include_num_input_tokens_seen": "all",
                           "hub_token": "hf_abcdef"}}
    assert redact(config)["training"] == {**config["training"], "hub_token": "<redacted>"}
    assert secret_values(config) >= {"hf_abcdef"} and "<|im_end|>" not in secret_values(config)


def test_library_warnings_go_to_the_run_log_not_the_console(secret_run):
    tmp_path, out = secret_run  # the Trainer warns at start-up about its pair of settings
    warning = "`non_blocking` is enabled but `dataloader_pin_memory` is not"
    log = (tmp_path / "finetune.log").read_text()
    assert f"[transformers.trainer][WARNING] - {warning}" in log
    assert "[py.warnings][WARNING]" in log or "FutureWarning" not in out.stderr  # warnings.warn: the file too
    assert warning not in out.stdout and warning not in out.stderr
    assert "\ntuned: " in out.stdout  # our own phases still on the console (without Hydra's log prefix)


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0,
                    reason="needs a network namespace (unshare -n)")
def test_default_recipe_runs_with_no_network(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "WANDB_MODE")}  # our defaults only
    out = subprocess.run(["unshare", "-n", sys.executable, "-m", "finetune", "training.max_steps=10",
                          "eval.max_samples=8", f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"


def test_a_second_run_on_a_live_run_dir_stops_before_anything_and_a_stale_lock_is_taken(tmp_path):
    import socket
    from conftest import FAST, compose
    from finetune.runner import run
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname()}))
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {owner.pid} on"):
            run(compose("dry_run=true", *FAST), tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing written, not even status
    finally:
        owner.kill()
        owner.wait()
    run(compose("dry_run=true", *FAST), tmp_path)  # the owner is gone: its lock is stale
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"
    assert not (tmp_path / ".lock").exists()


def race_for_locks(run_dirs, start, results):
    """One of the racing processes: at each barrier, try the next run dir's lock, say whether it got it, and hold
    it until every racer has said (so a quick release cannot let a second one in)."""
    from finetune.rundir import release_lock, take_lock
    for trial, run_dir in enumerate(run_dirs):
        start.wait()
        try:
            got = take_lock(run_dir)
        except ConfigError:
            got = False
        results.put((trial, got))
        start.wait()
        if got:
            release_lock(run_dir)


def test_eight_processes_racing_for_a_run_dir_leave_exactly_one_owner_in_200_trials(tmp_path):
    import multiprocessing
    context = multiprocessing.get_context("fork")
    racers, trials = 8, 200
    run_dirs = [tmp_path / str(i) for i in range(trials)]
    for run_dir in run_dirs:
        run_dir.mkdir()
    start, results = context.Barrier(racers), context.Queue()
    processes = [context.Process(target=race_for_locks, args=(run_dirs, start, results)) for _ in range(racers)]
    for process in processes:
        process.start()
    owners = [0] * trials
    for _ in range(racers * trials):
        trial, got = results.get(timeout=30)
        owners[trial] += got
    for process in processes:
        process.join(30)
    assert owners == [1] * trials
    assert not any((run_dir / ".lock").exists() for run_dir in run_dirs)  # each released by its owner


def test_the_command_on_a_live_run_dir_stops_before_hydra_writes_into_it(tmp_path):
    import socket
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname()}))
        (tmp_path / ".hydra").mkdir()
        (tmp_path / ".hydra" / "config.yaml").write_text("the first run's config\n")
        # a dry run: were the lock not checked first, it would write .hydra/ and data/ in a second or two; and no
        # training.* override, whose check imports trl (~7 s) before Hydra starts
        out = cli("dry_run=true", f"hydra.run.dir={tmp_path}")
        assert out.returncode == 1
        assert f"in use by another run (pid {owner.pid} on" in out.stderr
        assert (tmp_path / ".hydra" / "config.yaml").read_text() == "the first run's config\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", ".lock"]
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == owner.pid  # still the owner's
    finally:
        owner.kill()
        owner.wait()


def test_a_full_disk_while_saving_fails_the_run_naming_the_path_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno
    import torch
    from conftest import compose
    from peft import PeftModel
    from finetune.errors import TrainingError
    from finetune.train.model import load_model
    from finetune.runner import run
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # the optimizer of the second checkpoint meets a full disk
        if "checkpoint-10" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    cfg = compose("training.max_steps=20", "training.save_steps=5", "training.eval_steps=5", "eval.max_samples=8",
                  "training.load_best_model_at_end=false", "eval=perplexity")
    with pytest.raises(TrainingError, match=r"no space left on \S*checkpoint-10/\S+ .*checkpoint-5, is "
                                            r"intact"):
        run(cfg, tmp_path)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and "no space left on" in status["error"]
    assert [p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")] == ["checkpoint-5"]  # the half one gone
    assert problem(tmp_path / "checkpoints" / "checkpoint-5") is None
    base = load_model(cfg.model, None, True)
    PeftModel.from_pretrained(base, tmp_path / "checkpoints" / "checkpoint-5")  # still loads
    assert not (tmp_path / "adapter").exists() and not (tmp_path / ".lock").exists()


def test_torch_saves_full_disk_error_fails_the_run_in_one_line_naming_optimizer_pt(tmp_path, monkeypatch):
    """torch.save writes through its C++ writer: a full disk comes back as `unexpected pos`, with no errno."""
    import shutil as shutil_module
    import torch
    from collections import namedtuple
    from conftest import compose
    from peft import PeftModel
    from finetune.errors import TrainingError
    from finetune.train.model import load_model
    from finetune.runner import run
    real_save, real_usage = torch.save, shutil_module.disk_usage
    full = []

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("checkpoint-10/optimizer.pt"):
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 4096)  # what fitted before the disk filled
            full.append(True)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")
        return real_save(obj, f, *args, **kwargs)

    def usage(path):
        total, used, free = real_usage(path)
        return namedtuple("usage", "total used free")(total, used, 1 << 20 if full else free)
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil_module, "disk_usage", usage)
    cfg = compose("training.max_steps=15", "training.save_steps=5", "training.eval_steps=5", "eval.max_samples=4",
                  "training.load_best_model_at_end=false", "eval=perplexity")
    with pytest.raises(TrainingError) as failed:
        run(cfg, tmp_path)
    message = str(failed.value)
    assert "\n" not in message and re.match(r"no space left on \S*checkpoint-10/optimizer\.pt \(1 MiB free\); the "
                                            r"last complete checkpoint, checkpoint-5, is intact", message), message
    status = json.loads((tmp_path / "status.json").read_text())
    assert status == {"status": "failed", "error": message}
    assert [p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")] == ["checkpoint-5"]  # the half one gone
    assert problem(tmp_path / "checkpoints" / "checkpoint-5") is None
    PeftModel.from_pretrained(load_model(cfg.model, None, True), tmp_path / "checkpoints" / "checkpoint-5")
    torch.load(tmp_path / "checkpoints" / "checkpoint-5" / "optimizer.pt", weights_only=False)  # loads


def test_a_full_disk_at_the_first_status_write_is_told_in_one_line(tmp_path, monkeypatch):
    import errno
    from conftest import FAST, compose
    from finetune import rundir
    from finetune.errors import TrainingError
    from finetune.runner import run
    real = rundir.write_json
    calls = []

    def write_json(path, data):
        calls.append(data)
        if len(calls) == 1:  # "running": the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)
    monkeypatch.setattr(rundir, "write_json", write_json)
    with pytest.raises(TrainingError, match=r"^no space left on \S*status.json \(\d+ MiB free\); the same command"):
        run(compose("dry_run=true", *FAST), tmp_path)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


def test_predict_on_a_full_disk_says_so_in_one_line(cache_dir, tmp_path, capsys, monkeypatch):
    import errno
    from contextlib import contextmanager
    from finetune import rundir
    from finetune.predict import main as predict_main
    from test_inference import SNAPSHOTS, tiny_signal_run
    run_dir = tiny_signal_run(cache_dir)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": "a", "market_data": SNAPSHOTS[0]}) + "\n")

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    @contextmanager
    def atomic_file(path):
        yield Full()
    monkeypatch.setattr(rundir, "atomic_file", atomic_file)
    with pytest.raises(SystemExit) as exited:
        predict_main([str(run_dir), "--input", str(inputs), "--output", str(tmp_path / "out.jsonl")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 1 and error.startswith(f"error: no space left on {tmp_path / 'out.jsonl'} (")


def test_a_full_disk_is_found_anywhere_in_the_exception_chain(tmp_path):
    import errno
    from finetune.train.guards import disk_full
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "adapter/adapter_model.safetensors")
        except OSError as inner:
            raise RuntimeError("saving the adapter failed") from inner
    except RuntimeError as outer:
        assert disk_full(outer)
    assert not disk_full(RuntimeError("unexpected pos 10 vs 5"), tmp_path)  # the disk has room: another fault
    assert not disk_full(ValueError("bad value"))


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not Path("/proc/stat").exists(), reason="needs 2 cores and Linux")
def test_auto_threads_leave_a_core_taken_by_another_process():
    from finetune.config.cpu import choose_threads
    cores = len(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert choose_threads("auto") <= cores - 1
    finally:
        busy.kill()
        busy.wait()
    assert choose_threads(3) == 3 and choose_threads(None) is None


def test_auto_threads_count_idle_cores_from_proc_stat(monkeypatch):
    from finetune.config import cpu
    samples = iter([(1000, 4000), (1000 + 150, 4000 + 400)])  # 150 of 400 jiffies idle: 0.75 of 2 cores
    monkeypatch.setattr(cpu, "cpu_times", lambda: next(samples))
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu.choose_threads("auto") == 1
    samples = iter([(0, 0), (390, 400)])  # both idle
    monkeypatch.setattr(cpu, "cpu_times", lambda: next(samples))
    assert cpu.choose_threads("auto") == 2
