"""Who wins over a fit (conf/fit/<model>_<training>.yaml, chosen after the recipe).

A fit exists to replace the shipped recipes' 7B hyper-parameters with ones sized for a small model on CPU.
It must not silently replace a value the user chose, nor a method's own learning rate, so after Hydra has
composed the config, each key the fit set is looked up, most important first:

1. the command line (`training.learning_rate=...`): Hydra already applied it after the fit; kept;
2. the user's own recipe (one not shipped in recipes/, found through --config-dir or hydra.searchpath);
3. the method's own value (conf/method/prompt.yaml sets the soft-prompt learning rate);
4. the fit's value, over the shipped recipe and the presets.

Every value a fit replaced and every value kept over the fit is returned as one line for the log.
"""
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.paths import CONF_DIR, RECIPES_DIR


def leaves(node, prefix: str = "") -> dict:
    """{"training.learning_rate": 0.001, ...} for a config's scalar and list values (`defaults` left out)."""
    found = {}
    for key, value in node.items():
        if key == "defaults":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(leaves(value, name + "."))
        else:
            found[name] = value
    return found


def file_leaves(path: Path | None) -> dict:
    return leaves(OmegaConf.to_container(OmegaConf.load(path))) if path is not None and path.is_file() else {}


def recipe_file(name: str, sources: list) -> Path | None:
    """The file Hydra read for `recipe=name`: `DIR/recipe/NAME.yaml` in a file source, `DIR/NAME.yaml` in ours."""
    for source in sources:
        if source.schema == "file":
            candidate = Path(source.path) / "recipe" / f"{name}.yaml"
        elif source.schema == "recipes":
            candidate = Path(source.path) / f"{name}.yaml"
        else:
            continue
        if candidate.is_file():
            return candidate
    return None


def apply_fit_precedence(cfg: DictConfig, hydra_cfg) -> list[str]:
    """Put back the values that outrank the fit (see the module docstring) and say what the fit changed."""
    choices = hydra_cfg.runtime.choices
    fit = choices.get("fit")
    if fit is None:
        return []
    fitted = file_leaves(CONF_DIR / "fit" / f"{fit}.yaml")
    command_line = {o.split("=", 1)[0].lstrip("+~") for o in hydra_cfg.overrides.task}
    recipe = recipe_file(choices.get("recipe") or "none", hydra_cfg.runtime.config_sources)
    shipped = recipe is None or recipe.resolve().is_relative_to(RECIPES_DIR.resolve()) \
        or recipe.resolve().is_relative_to(CONF_DIR.resolve())
    outranking = [("the method", file_leaves(CONF_DIR / "method" / f"{choices.get('method')}.yaml"))]
    if not shipped:
        outranking.insert(0, (f"your recipe {recipe}", file_leaves(recipe)))
    preset = file_leaves(CONF_DIR / "training" / f"{choices.get('training')}.yaml")  # package `training`
    replaced = {**{f"training.{k}": v for k, v in preset.items()}, **file_leaves(recipe if shipped else None)}
    lines = []
    for key, value in fitted.items():
        if key in command_line:
            continue  # the command line came after the fit: Hydra kept it
        owner = next(((who, values[key]) for who, values in outranking if key in values), None)
        if owner is not None:
            if owner[1] != value:
                with open_dict(cfg):
                    OmegaConf.update(cfg, key, owner[1], merge=False)
                lines.append(f"kept {key}={owner[1]} from {owner[0]} (fit {fit} would set {value})")
            continue
        old = replaced.get(key)
        if old is not None and old != value:
            lines.append(f"fit {fit} replaced {key}: {old} -> {value}")
    return lines
