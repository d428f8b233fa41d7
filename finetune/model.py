"""Load the tokenizer and the base model a preset names (the tiny preset is built here, never downloaded)."""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from finetune.errors import ConfigError
from finetune.paths import ASSETS_DIR

TINY_TOKENIZER = ASSETS_DIR / "tiny"
TEMPLATES = ASSETS_DIR / "templates"  # named chat templates: model.chat_template=alpaca | chatml


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def build_tiny(arch: DictConfig) -> Path:
    """A random-init Llama-style model from `model.tiny` and the tokenizer in finetune/assets/tiny.

    Saved once under the cache, keyed by the architecture and the tokenizer, so the adapter's
    `base_model_name_or_path` names a real local folder and `PeftModel.from_pretrained` needs no code of ours.
    """
    arch = OmegaConf.to_container(arch)
    tokenizer_bytes = (TINY_TOKENIZER / "tokenizer.json").read_bytes()
    key = hashlib.sha256(json.dumps(arch, sort_keys=True).encode() + tokenizer_bytes).hexdigest()[:12]
    out = cache_root() / f"tiny-{key}"
    if (out / "model.safetensors").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    seed = arch.pop("seed")
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False, **arch)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: another process may have built it meanwhile
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_source(cfg: DictConfig) -> str:
    """What from_pretrained reads: the built tiny folder, a local `model.path`, or the hub id."""
    if cfg.tiny is not None:
        return str(build_tiny(cfg.tiny))
    if cfg.path is not None:
        if not Path(cfg.path).is_dir():
            raise ConfigError(f"model.path={cfg.path}: no such folder; point it at local weights "
                              f"(config.json + *.safetensors) of {cfg.hub_id}")
        return str(cfg.path)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"model {cfg.name}: HF_HUB_OFFLINE=1 and no model.path; set model.path=/local/dir")
    return cfg.hub_id


def load_tokenizer(cfg: DictConfig):
    source = TINY_TOKENIZER if cfg.tiny is not None else model_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template is not None:
        named = TEMPLATES / f"{cfg.chat_template}.jinja"
        tokenizer.chat_template = named.read_text() if named.is_file() else cfg.chat_template
    if tokenizer.chat_template is None:
        raise ConfigError(f"model {cfg.name}: the tokenizer has no chat template; set model.chat_template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: DictConfig, quantization: DictConfig | None, use_cpu: bool):
    """The base model, quantized when the method asks for it (QLoRA)."""
    kwargs = dict(dtype=getattr(torch, cfg.dtype), attn_implementation=cfg.attn_implementation,
                  trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    if quantization is not None:
        kwargs["quantization_config"] = instantiate(quantization, _convert_="all")
        kwargs["device_map"] = {"": "cpu"} if use_cpu else {"": int(os.environ.get("LOCAL_RANK", 0))}
    return AutoModelForCausalLM.from_pretrained(model_source(cfg), **kwargs)
