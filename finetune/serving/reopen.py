"""Opening a finished run as data: its saved config (only what the package's own conf/ and recipes/ name is
instantiated, no module a run dir names is imported), its tuned model (the adapter on the base, or the whole
model of method=full). evaluate, predict, serve, merge, ab and the SignalProvider read runs through here."""
from pathlib import Path

from finetune.errors import ConfigError
from finetune.rundir import ADAPTER, HYDRA, STATUS


def adapter_path(run_dir: Path) -> Path:
    """RUN_DIR/adapter (a PEFT adapter, or with method=full the whole model), or an error saying the run did not
    finish."""
    adapter = Path(run_dir) / ADAPTER
    if not (adapter / "adapter_config.json").is_file() and not is_full_model(adapter):
        raise ConfigError(f"{run_dir}: no {ADAPTER}/ (did the run complete? see {STATUS})")
    return adapter


def is_full_model(adapter: Path) -> bool:
    """RUN_DIR/adapter of a method=full run: a whole model (config.json), not a PEFT adapter."""
    return (Path(adapter) / "config.json").is_file() and not (Path(adapter) / "adapter_config.json").is_file()


def tuned_model(base, adapter: Path):
    """The trained model of a run: the PEFT adapter on `base`, or (method=full) the saved whole model in
    `base`'s dtype on its device."""
    if is_full_model(adapter):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(adapter, dtype=base.dtype).to(base.device)
    from peft import PeftModel
    return PeftModel.from_pretrained(base, adapter)


def load_run_config(run_dir: Path, overrides: list[str] = (), trust_remote_code: bool = False):
    """The run's saved config as data (`run_values`), with `eval=NAME` (a whole suite from conf/eval) and dotted
    keys put over it. `trust_remote_code` comes from the caller's command line, never from the run dir."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from finetune.paths import CONF_DIR
    from finetune.config.registration import register
    register()  # the resolvers the saved config uses
    path = Path(run_dir) / HYDRA / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {HYDRA}/config.yaml)")
    cfg = OmegaConf.create(run_values(OmegaConf.load(path), path))
    cfg.model.trust_remote_code = bool(trust_remote_code)
    groups = [o for o in overrides if o.startswith("eval=")]
    if groups:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg.eval = compose(config_name="config", overrides=groups).eval
    dotted = [o for o in overrides if not o.startswith("eval=")]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))


# A recipe is code its user chose to run: its `_target_`s are instantiated. A run dir is data someone handed over
# (a colleague's share, a downloaded checkpoint): opening one instantiates only what the package's own conf/ and
# recipes/ name in the same section, and never imports a module the run dir names.
SECTIONS = ("method", "quantization", "dataset", "eval")  # where a run's config holds something to instantiate


def package_targets() -> dict[str, set[str]]:
    """Every `_target_` the shipped conf/ and recipes/ name, by top-level section (method, eval, ...)."""
    import yaml
    from finetune.paths import CONF_DIR, RECIPES_DIR
    found: dict[str, set[str]] = {}

    def walk(node, section):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.setdefault(section, set()).add(node["_target_"])
            for key, value in node.items():
                walk(value, section or str(key))
        elif isinstance(node, list):
            for value in node:
                walk(value, section)
    for path in [*CONF_DIR.rglob("*.yaml"), *RECIPES_DIR.rglob("*.yaml")]:
        text = path.read_text(encoding="utf-8")
        group = path.relative_to(CONF_DIR).parts[0] if path.is_relative_to(CONF_DIR) else None
        is_global = group is None or path.parent == CONF_DIR or "@package _global_" in text
        walk(yaml.safe_load(text), None if is_global else group)
    return found


def run_values(saved, where: Path) -> dict:
    """A run's saved config as plain values, resolved (so no interpolation can make a `_target_` later), with
    each `_target_` kept only where the package names the same one in that section (otherwise the node is left
    out, and a warning says so), and the model's `gguf` (a package to import) only as a shipped preset has it."""
    import logging
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from transformers import GenerationConfig
    from finetune.config import check_model
    from finetune.paths import CONF_DIR
    try:
        values = OmegaConf.to_container(saved, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {err.full_key or 'config'}: {err.msg}") from None
    if not isinstance(values, dict) or not isinstance(values.get("model"), dict):
        raise ConfigError(f"{where}: not a run's config (no model section)")
    allowed = package_targets()
    log = logging.getLogger(__name__)

    def clean(node, section: str, key: str):
        if isinstance(node, dict):
            target = node.get("_target_")
            if target is not None and target not in allowed.get(section, ()):
                log.warning("%s: %s._target_=%s is not one the package ships; left out (a run dir is data: "
                            "it cannot name code to run)", where, key, target)
                return None
            return {k: v for k, v in ((k, clean(v, section, f"{key}.{k}")) for k, v in node.items())
                    if v is not None or not isinstance(node[k], dict)}
        if isinstance(node, list):
            return [clean(v, section, key) for v in node]
        return node
    values = {k: clean(v, k if k in SECTIONS else "", k) for k, v in values.items()}
    presets = [yaml.safe_load(p.read_text(encoding="utf-8")).get("gguf") for p in (CONF_DIR / "model").glob("*.yaml")]
    if values["model"].get("gguf") is not None and values["model"]["gguf"] not in presets:
        log.warning("%s: model.gguf=%s is no shipped preset's; left out", where, values["model"]["gguf"])
        values["model"]["gguf"] = None
    check_model(values["model"])  # dtype and attention from the known lists (an attention name can be a hub kernel)
    generation = (values.get("eval") or {}).get("generation") or {}
    fields = GenerationConfig().to_dict()
    for key in [k for k in generation if k not in fields]:  # custom_generate + trust_remote_code would run code
        log.warning("%s: eval.generation.%s is no transformers.GenerationConfig field; left out", where, key)
        del generation[key]
    return values


def load_run(run_dir: Path, overrides: list[str] = (), quantized: bool = True, dtype: str | None = None,
             use_cpu: bool | None = None, trust_remote_code: bool = False):
    """A finished run, opened: (config, tokenizer, base model, adapter folder). The base is the run's preset
    as it trained: 4-bit for QLoRA unless quantized=False (to merge into full-precision layers), `dtype` in
    place of the preset's, on the GPU when there is one and the run did not train on CPU (or use_cpu says)."""
    import torch
    from omegaconf import OmegaConf
    from finetune.train.model import load_model, load_tokenizer
    cfg = load_run_config(run_dir, list(overrides), trust_remote_code)
    adapter = adapter_path(run_dir)
    model_cfg = cfg.model if dtype is None else OmegaConf.merge(cfg.model, {"dtype": dtype})
    quantization = cfg.quantization if quantized else None
    if use_cpu is None:
        use_cpu = bool(cfg.training.get("use_cpu", False)) or not torch.cuda.is_available()
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(model_cfg, quantization, use_cpu)
    if quantization is None and not use_cpu:
        model = model.to("cuda")
    return cfg, tokenizer, model, adapter
