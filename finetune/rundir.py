"""The run directory's small files, written atomically (temp file + rename) so none is ever half-written."""
import json
import os
import platform
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from finetune.paths import PACKAGE_DIR

PACKAGES = ("finetune", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
            "hydra-core", "omegaconf")
SECRET_NAME = re.compile(r"token|secret|passw|api[_-]?key|(^|_)key$", re.IGNORECASE)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def set_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """running | completed | failed (error says why) | skipped (the incremental gate; error says why)."""
    write_json(run_dir / "status.json", {"status": status, "error": error})


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
    """Hydra writes the config and the overrides into .hydra/ before our code runs: scrub them too."""
    if not secrets:
        return
    for path in (run_dir / ".hydra").glob("*.yaml"):
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
