"""A run directory: its layout (every module asks here for a path in it), its lock and status, the manifest,
and writing files and folders atomically (temp + rename) so none is ever half-written. Opening a finished run:
finetune/serving/reopen.py.

    RUN_DIR/
      .hydra/config.yaml, overrides.yaml   Hydra's composed config and the command line's overrides
      status.json                          running | completed | failed | interrupted | skipped, and why
      .lock                                flock'ed by the live run, naming its pid and host (a second run stops)
      finetune.log                         every log line of the run, library warnings included
      manifest.json                        versions, git sha, data hash, the config; model, steps, seconds
      data/{train,validation,test}.jsonl   the splits as trained, and stats.json
      checkpoints/checkpoint-N/            the Trainer's, for resume
      adapter/                             the PEFT adapter (PeftModel.from_pretrained(base, RUN_DIR/adapter)); with
                                           method=full the whole model (AutoModelForCausalLM.from_pretrained)
      metrics.json, answers.jsonl          base vs tuned scores; each held-out prompt's answers
      report.md, *.png                     the report
"""
import atexit
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from hydra.experimental.callback import Callback

from finetune.errors import ConfigError
from finetune.paths import PACKAGE_DIR

HYDRA = ".hydra"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
DATA = "data"
STATUS = "status.json"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
ANSWERS = "answers.jsonl"
LOCK = ".lock"

PACKAGES = ("finetune", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
            "hydra-core", "omegaconf")
SECRET_NAME = re.compile(r"(?<!eos_)(?<!bos_)(?<!pad_)(?<!unk_)token(?![a-z])|secret|passw|api[_-]?key|(^|_)key$",
                         re.IGNORECASE)  # eos_token, pad_token (SFTConfig fields) are not secrets


@contextmanager
def atomic_file(path: Path):
    """An open text file that becomes `path` in one rename when the block ends; on an error, nothing is left."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            yield out
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as out:
        out.write(text)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@contextmanager
def atomic_dir(out: Path, replace: bool = True):
    """Yield a fresh folder beside `out` to write into; when the block ends it becomes `out` in one rename, so
    `out` is whole or absent (an error removes the temp folder). replace=False: when another process made `out`
    meanwhile (the same cached content), theirs is kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        if replace:
            shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if replace or not out.is_dir():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def run_lock(run_dir: Path):
    """Hold `run_dir` for this run: a second run on it (a retried job, a second terminal) stops before doing
    anything, naming the owner. The lock goes with its process, however that ends (take_lock).
    Re-entrant: a lock this process holds already (taken by `RunDirLock` before Hydra wrote .hydra/) is kept
    and left to its taker to release."""
    if take_lock(run_dir):
        try:
            yield
        finally:
            release_lock(run_dir)
    else:
        yield


HELD: dict[Path, int] = {}  # lock files this process holds -> their open descriptor (the flock lives with it)


def take_lock(run_dir: Path) -> bool:
    """Lock `run_dir`/.lock for this process (True), or find it ours already (False); another live owner is a
    ConfigError naming its pid and host. The lock is the kernel's (flock): one process gets it however many start
    together, and it dies with its process (kill -9 included), so no lock is ever stale. The file also names the
    owner; one naming a live process without holding the flock (a run on another host) is respected too."""
    path = (run_dir / LOCK).absolute()
    if path in HELD:
        return False
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise lock_in_use(run_dir, path) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its owner released and removed it between our open and flock: lock the new file
    owner = read_owner(path)
    if owner and owner != me and (owner.get("host") != me["host"] or pid_alive(owner.get("pid"))):
        os.close(fd)
        raise lock_in_use(run_dir, path)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(me).encode())
    HELD[path] = fd
    return True


def read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # empty: being written by its owner this instant, or nobody's
    return owner if isinstance(owner, dict) else {}


def lock_in_use(run_dir: Path, path: Path) -> ConfigError:
    owner = read_owner(path)
    return ConfigError(f"{run_dir} is in use by another run (pid {owner.get('pid')} on {owner.get('host')}); wait "
                       f"for it, choose another hydra.run.dir, or delete {path} if that run is gone")


def release_lock(run_dir: Path) -> None:
    path = (run_dir / LOCK).absolute()
    fd = HELD.pop(path, None)
    if fd is None:
        return
    path.unlink(missing_ok=True)  # removed while still locked: a process that opened it meanwhile sees it is gone
    os.close(fd)


class RunDirLock(Callback):
    """Hydra callback (conf/config.yaml): takes the run dir's lock before Hydra writes .hydra/ into it, so a
    second run on a live dir stops without overwriting the first one's saved config. Rank 0 only; released
    at exit, however the run ends (a kill -9 leaves it stale, which the next run takes over)."""

    def on_run_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf
        if int(os.environ.get("RANK", 0)) != 0:
            return
        HydraConfig.instance().set_config(config)  # what run_job does next: ${hydra:...} in run.dir resolves
        run_dir = Path(OmegaConf.select(config, "hydra.run.dir")).absolute()
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            take_lock(run_dir)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        atexit.register(release_lock, run_dir)


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """running | completed | failed (error says why) | interrupted (a signal; error names the step saved) |
    skipped (the incremental gate; error says why)."""
    write_json(run_dir / STATUS, {"status": status, "error": error})


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def hide_secret_overrides(argv: list[str]) -> list[str]:
    """argv with each secret-named override's value (`+training.hub_token=...`) moved into the environment and
    read back as `${oc.env:FINETUNE_SECRET_N,null}`: Hydra (its saved overrides, its "Error executing job with
    overrides" on a crash) and wandb (its record of argv) see the interpolation, never the secret. null where the
    variable is not set: a run dir opened later (serve, evaluate) needs no secret."""
    out, count = [], 0
    for arg in argv:
        key, sep, value = arg.partition("=")
        plain = value.lower() not in ("null", "none", "~") and not value.startswith(("${", "[", "{"))  # a text
        if sep and value and plain and SECRET_NAME.search(key.lstrip("+~").rsplit(".", 1)[-1]):
            variable = f"FINETUNE_SECRET_{count}"  # a secret-named variable: its value is redacted from saved files
            count += 1
            os.environ[variable] = value
            arg = f"{key}=${{oc.env:{variable},null}}"
        out.append(arg)
    return out


def secret_values(config: dict | None = None) -> set[str]:
    """Values to keep out of every saved file: secret-named environment variables and config keys."""
    found = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6}

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif SECRET_NAME.search(key) and node not in (None, "") and len(str(node)) >= 6:
            found.add(str(node))
    walk(config or {})
    return found


def redact(value, key: str = "", secrets: frozenset = frozenset()):
    """Drop values whose key looks like a secret (tokens, API keys, passwords), and any known secret value
    inside other strings (an override `api_key=...` in argv), from anything we save."""
    if SECRET_NAME.search(key):
        return "<redacted>"
    if isinstance(value, dict):
        return {k: redact(v, str(k), secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, "", secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "<redacted>")
    return value


def redact_hydra_dir(run_dir: Path, secrets: set[str]) -> None:
    """Hydra writes the config and the overrides into RUN_DIR/.hydra before our code runs: scrub them too."""
    if not secrets:
        return
    for path in (run_dir / HYDRA).glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        clean = text
        for secret in secrets:
            clean = clean.replace(secret, "<redacted>")
        if clean != text:
            write_text(path, clean)


def manifest(config: dict, data_sha256: str | None, seed: int, secrets: set[str]) -> dict:
    return redact({"git_sha": git_sha(), "versions": versions(), "python": sys.version.split()[0],
                   "platform": platform.platform(), "host": socket.gethostname(), "argv": sys.argv,
                   "seed": seed, "data_sha256": data_sha256, "config": config}, secrets=frozenset(secrets))
