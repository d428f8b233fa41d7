"""Checks that need more than Hydra's own: `training` against trl.SFTConfig, and method x setting conflicts.

Hydra already rejects an unknown group option (listing the choices) and an unknown key given without `+`.
Everything here runs before any data is built or weights are loaded.
"""
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
RUNNER_OWNED = {"output_dir": "the runner writes checkpoints to <run dir>/checkpoints; set hydra.run.dir"}


def resolve(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{err.full_key or 'config'}: {err.msg}") from None


def expected_types(hint) -> tuple[type, ...]:
    """The plain types a field accepts, or () when it accepts something we do not check (enums, dicts, ...)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    plain = tuple(a for a in args if a in (bool, int, float, str, type(None)))
    return plain if len(plain) == len(args) else ()


def type_ok(value, accepted: tuple[type, ...]) -> bool:
    if not accepted or value is None and type(None) in accepted:
        return True
    if isinstance(value, bool):
        return bool in accepted
    if isinstance(value, int) and (int in accepted or float in accepted):
        return True
    return isinstance(value, tuple(t for t in accepted if t is not type(None)))


def check_training_key(key: str, fields: set[str]) -> None:
    if key in RUNNER_OWNED:
        raise ConfigError(f"training.{key}: not settable, {RUNNER_OWNED[key]}")
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "see trl.SFTConfig for the valid keys"
        raise ConfigError(f"training.{key}: not a trl.SFTConfig field; {hint}")


def sft_fields() -> set[str]:
    from trl import SFTConfig
    return {f.name for f in dataclasses.fields(SFTConfig) if f.init}


def check_training_overrides(overrides: list[str]) -> None:
    """`training.KEY=...` on the command line, checked before Hydra's struct error (which lists no choices)."""
    keys = [o.split("=", 1)[0].split(".")[1] for o in overrides if o.startswith("training.") and "=" in o]
    if keys:
        fields = sft_fields()
        for key in keys:
            check_training_key(key, fields)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.pth")


def folder_gaps(folder: Path) -> list[str]:
    """What a model folder lacks before transformers can load it, each named: checked here, the empty folder
    would fail deep in transformers (a 30-line traceback about sentencepiece / tiktoken)."""
    gaps = []
    if not (folder / "config.json").is_file():
        gaps.append("no config.json")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        gaps.append(f"no tokenizer ({' / '.join(TOKENIZER_FILES)})")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        gaps.append(f"no weights ({' / '.join(WEIGHT_PATTERNS)})")
    return gaps


def check_model(model: dict) -> None:
    if model.get("path") == "???":  # OmegaConf's mandatory marker, left as is by resolve()
        raise ConfigError(f"model.path: missing; model={model.get('name')} needs model.path=/dir, a local Hugging "
                          f"Face folder (config.json, tokenizer files, *.safetensors)")
    if model.get("path") is not None and not Path(model["path"]).is_dir():
        raise ConfigError(f"model.path={model['path']}: no such folder; point it at a local Hugging Face folder "
                          f"(config.json, tokenizer files, *.safetensors)")
    if model.get("path") is not None and folder_gaps(Path(model["path"])):
        raise ConfigError(f"model.path={model['path']}: {', '.join(folder_gaps(Path(model['path'])))} in that "
                          "folder; point it at a local Hugging Face folder (config.json, tokenizer files, "
                          "*.safetensors)")
    if model["dtype"] not in DTYPES:
        raise ConfigError(f"model.dtype={model['dtype']}: choose one of {', '.join(DTYPES)}")
    if model["attn_implementation"] not in ATTENTION:
        raise ConfigError(f"model.attn_implementation={model['attn_implementation']}: "
                          f"choose one of {', '.join(ATTENTION)}")


def check_types(group: str, values: dict, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        accepted = expected_types(hints.get(key))
        if not type_ok(value, accepted):
            names = " or ".join(t.__name__ for t in accepted)
            raise ConfigError(f"{group}.{key}={value!r}: expected {names}, got {type(value).__name__}")


def check_training(training: dict) -> None:
    """Keys and plain types of `training` against trl.SFTConfig, without building it (no GPU needed). `auto` is
    allowed where the memory plan chooses (finetune/config/memory_plan.py resolves it before SFTConfig is built)."""
    from trl import SFTConfig
    from finetune.config.memory_plan import AUTO_KEYS
    fields = sft_fields()
    for key in training:
        check_training_key(key, fields)
    check_types("training", {k: v for k, v in training.items() if not (k in AUTO_KEYS and v == "auto")}, SFTConfig)


def check_peft(method: dict) -> None:
    """Keys and plain types of `method` against the peft config class its _target_ names."""
    import peft
    module, _, name = method["_target_"].rpartition(".")
    cls = getattr(peft, name, None) if module == "peft" else None
    if cls is None or not dataclasses.is_dataclass(cls):
        return  # a user's own config class: instantiate() checks it
    check_fields("method", {k: v for k, v in method.items() if k != "_target_"}, cls, f"peft.{name}")


def check_fields(group: str, values: dict, cls: type, where: str) -> None:
    """Every key of `values` a field of the dataclass `cls` (the closest names suggested), of a plain type."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"see {where}"
            raise ConfigError(f"{group}.{key}: not a {where} field; {hint}")
    check_types(group, values, cls)


def check_config(cfg, output_dir: Path | None) -> tuple[dict, object]:
    """The resolved config with every part checked, and the trainer's arguments writing checkpoints into
    `output_dir` (None, e.g. for a dry run: no arguments built, so no GPU is needed). `auto` training values are
    replaced by the memory plan's choice, recorded under config["plan"] (finetune/config/memory_plan.py)."""
    config = resolve(cfg)
    if config["objective"]["name"] != "sft":  # the preference stage's own training values, over `training`
        config["training"] = {**config["training"], **(config["objective"].get("training") or {})}
    check_training(config["training"])
    from finetune.config.memory_plan import resolve_auto
    resolve_auto(cfg, config)  # training=gpu's `auto` values: the memory plan and Liger, before any model loads
    if config["method"] is not None:  # null: method=full, no PEFT method to check
        check_method(config["method"], config["training"])
    check_model(config["model"])
    check_objective(config)
    if output_dir is None:
        return config, None
    if config["objective"]["name"] != "sft":
        return config, preference_config(config["training"], config["objective"], output_dir)
    return config, sft_config(config["training"], output_dir)


OBJECTIVES = ("sft", "dpo", "kto", "grpo")
# objective keys the runner reads; the rest are fields of the objective's trl config (DPOConfig, KTOConfig,
# GRPOConfig). GRPO's rewards become GRPOConfig.reward_weights and the reward callables (finetune/rewards/).
RUNNER_KEYS = ("name", "start_from", "training", "rewards", "collapse_share", "leakage")
SFT_ONLY = {"packing": False, "packing_strategy": None, "eval_packing": None,
            "completion_only_loss": None, "assistant_only_loss": False, "dataset_text_field": None,
            "dataset_kwargs": None, "chat_template_path": None, "eos_token": None, "shuffle_dataset": False}


def trl_class(name: str) -> type:
    import trl
    return {"dpo": trl.DPOConfig, "kto": trl.KTOConfig, "grpo": trl.GRPOConfig}[name]


def check_objective(config: dict) -> None:
    """objective.name, start_from and its keys (trl.DPOConfig / KTOConfig fields), and settings a preference
    objective cannot honour."""
    objective, training = config["objective"], config["training"]
    name = objective.get("name")
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name={name!r}: choose {', '.join(OBJECTIVES)} (objective=dpo, objective=kto, "
                          "objective=grpo)")
    if name == "sft":
        return
    cls = trl_class(name)
    check_fields("objective", {k: v for k, v in objective.items() if k not in RUNNER_KEYS}, cls, f"trl.{cls.__name__}")
    start = objective.get("start_from")
    if start is not None and config.get("incremental", {}).get("adapter") is not None:
        raise ConfigError("objective.start_from with incremental.adapter: both name an adapter to continue; keep one")
    if start is not None and config["method"] is None:
        raise ConfigError(f"objective.start_from={start} with method=full: a preference stage continues an SFT "
                          "adapter; use a PEFT method (method=lora), or drop objective.start_from")
    if start not in (None, "sft") and not Path(str(start)).is_dir():
        raise ConfigError(f"objective.start_from={start}: no such run dir; give an SFT run's dir (it holds "
                          "adapter/), sft (an SFT stage first, in this run's dir), or null (the base model)")
    if training.get("packing"):
        raise ConfigError(f"objective={name} with training.packing=true: {name.upper()} scores each answer on its "
                          "own row; set training.packing=false")
    if name == "grpo":
        check_grpo(objective)


def check_grpo(objective: dict) -> None:
    """Its rewards built (each _target_ imported and its arguments taken) and its guards' values."""
    from finetune.rewards import load
    load(objective.get("rewards"))
    share = objective.get("collapse_share", 0.9)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ConfigError(f"objective.collapse_share={share!r}: the share of one answer (0-1] at which a step is "
                          "called a collapse, e.g. 0.9")
    if objective.get("leakage", "refuse") not in ("refuse", "drop"):
        raise ConfigError(f"objective.leakage={objective.get('leakage')!r}: choose refuse (stop the run) or drop "
                          "(leave out the train samples whose outcome was known after the test window starts)")


def preference_config(training: dict, objective: dict, output_dir: Path):
    """trl.DPOConfig / KTOConfig from `training` (less the keys only SFT reads, at their off values) and the
    objective's own fields."""
    cls = trl_class(objective["name"])
    kept = {k: v for k, v in training.items() if k not in SFT_ONLY or v != SFT_ONLY[k]}
    options = {k: v for k, v in objective.items() if k not in RUNNER_KEYS}
    if objective["name"] == "grpo":  # it cuts the answers it generates (max_completion_length), no training row
        kept.pop("max_length", None)
        options["reward_weights"] = [float(r.get("weight", 1.0)) for r in (objective.get("rewards") or {}).values()
                                     if r is not None]
    unused = sorted(set(kept) - {f.name for f in dataclasses.fields(cls) if f.init})
    if unused:
        raise ConfigError(f"objective={objective['name']}: training.{unused[0]} is an SFT setting "
                          f"{objective['name'].upper()} has no use for; remove it")
    return trainer_config(cls, kept, output_dir, **options)


def sft_config(training: dict, output_dir: Path):
    """trl.SFTConfig from `training` (checked by check_training first)."""
    from trl import SFTConfig
    return trainer_config(SFTConfig, training, output_dir)


def trainer_config(cls, training: dict, output_dir: Path, **options):
    if not training.get("use_cpu") and not cuda_available():
        raise ConfigError("training.use_cpu=false but this machine has no CUDA GPU; use training=cpu "
                          "(or dry_run=true to only build the data and estimate)")
    training = dict(training)
    if training.get("hub_token"):  # the Trainer pickles its arguments into every checkpoint's training_args.bin:
        os.environ["HF_TOKEN"] = str(training.pop("hub_token"))  # the hub client reads the token from here instead
    try:
        return cls(output_dir=str(output_dir), **training, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"training: {err}") from None


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def check_method(method: dict, training: dict) -> None:
    """The method's own fields, then combinations that would train silently wrong."""
    check_peft(method)
    if method["_target_"].endswith("PrefixTuningConfig"):
        if training.get("activation_checkpointing", True) or training.get("gradient_checkpointing"):
            raise ConfigError("method=prefix with training.activation_checkpointing=true: peft's prefix-tuning "
                              "breaks under activation (gradient) checkpointing; set "
                              "training.activation_checkpointing=false")
        if training.get("packing"):
            raise ConfigError("method=prefix with training.packing=true: prefixes do not learn on packed rows; "
                              "set training.packing=false")
