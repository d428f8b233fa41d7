"""Serve a folder of recipe files as Hydra's config group `recipe`, so `recipe=NAME` picks `recipes/NAME.yaml`.

Hydra only finds a group as a folder of that name under a search-path root; our recipes live at the top of
the repo in `recipes/`. A config source with its own scheme, `recipes://DIR`, maps `recipe/NAME` onto
`DIR/NAME.yaml` (subfolders give nested names: `recipe=style/qlora_style`). A search-path plugin appends the
shipped folder; a user adds a flat folder of their own with `hydra.searchpath=[recipes:///abs/dir]`, or keeps
Hydra's usual layout (`DIR/recipe/NAME.yaml`) with `--config-dir DIR`.
"""
import difflib
import os
from pathlib import Path
from typing import List, Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra._internal.sources_registry import SourcesRegistry
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

from finetune.errors import ConfigError
from finetune.paths import RECIPES_DIR

GROUP = "recipe"


class RecipesConfigSource(FileConfigSource):
    @staticmethod
    def scheme() -> str:
        return "recipes"

    def _inside(self, config_path: str) -> Optional[str]:
        """`recipe/style/x` -> `style/x` relative to the folder; None for paths outside the group."""
        head, _, rest = config_path.partition("/")
        return rest if head == GROUP else None

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def load_config(self, config_path: str) -> ConfigResult:
        inside = self._inside(config_path)
        if inside is None:
            raise ConfigLoadError(f"{config_path} is not a recipe")
        return super().load_config(inside)

    def is_group(self, config_path: str) -> bool:
        inside = self._inside(config_path)
        return inside is not None and super().is_group(inside)

    def is_config(self, config_path: str) -> bool:
        inside = self._inside(config_path)
        return bool(inside) and super().is_config(inside)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        inside = self._inside(config_path)
        if inside is None or not super().is_group(inside):
            return []
        files: List[str] = []
        for name in os.listdir(os.path.join(self.path, inside)):
            self._list_add_result(files, os.path.join(config_path, name), name, results_filter)
        return sorted(set(files))


class RecipesSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append("finetune-recipes", f"recipes://{RECIPES_DIR}")


def register() -> None:
    SourcesRegistry.instance().register(RecipesConfigSource)
    Plugins.instance().register(RecipesSearchPath)


def shipped() -> list[str]:
    """Every shipped recipe's name, nested ones included (`examples/dora_demo`), and `none`."""
    return ["none"] + sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))


def check_recipe_overrides(argv: list[str]) -> None:
    """`recipe=NAME` that no shipped recipe has: one line with the near names and every recipe, before Hydra's
    error (which lists the top folder only and suggests nothing). A user's folder (--config-dir, -cd,
    hydra.searchpath) is Hydra's to search."""
    if any(arg.startswith(("--config-dir", "-cd", "hydra.searchpath", "+hydra.searchpath")) for arg in argv):
        return
    names = shipped()
    for arg in argv:
        if not arg.startswith("recipe=") or "(" in arg:  # a sweep's choice(...) / glob(...) is Hydra's
            continue
        for name in arg.split("=", 1)[1].split(","):
            if name in names:
                continue
            near = [n for n in names if Path(n).name == Path(name).name]
            near += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in near]
            hint = f" (did you mean {' or '.join(f'recipe={n}' for n in near)}?)" if near else ""
            raise ConfigError(f"recipe={name}: no such recipe in {RECIPES_DIR}{hint}; recipes: {', '.join(names)}; "
                              "a folder of your own: --config-dir DIR, before the overrides")
