"""The ``lightning-landscape`` command: LightningCLI plus named recipes.

Usage::

    lightning-landscape recipes                          # list the recipes
    lightning-landscape fit --recipe quickstart          # run one
    lightning-landscape fit --recipe edge_of_stability_gd --trainer.max_steps=500
    lightning-landscape fit --config my_experiment.yaml  # any LightningCLI config
    python -m lightning_landscape ...                    # the same

``--recipe NAME`` is shorthand for ``--config <path of NAME.yaml>``; options after it override
the recipe, as with ``--config``.

A config may hold a top-level ``variants:`` mapping ``{name: overrides}``: the command then runs
once per variant, one after another, each with the rest of the config deep-merged with that
variant's overrides (mappings merge, anything else is replaced) and the TensorBoard logger's
``name`` extended by the variant's, so the runs sit side by side in TensorBoard
(``<save_dir>/<name>/<variant>/version_<n>``; running a recipe again adds a new version
instead of writing into the old run). ``--variant NAME`` (repeatable) runs only the named ones. Recipes are YAML files whose first line is
``# description: ...``. They are looked up in the installed package
(``lightning_landscape/recipes``, where the wheel ships them) and otherwise in the top-level
``recipes/`` folder of a source checkout.

Any :class:`~lightning.pytorch.LightningModule` / :class:`~lightning.pytorch.LightningDataModule`
can be named by ``class_path``. An ``optimizer:`` entry (``--optimizer``) replaces the module's
own ``configure_optimizers``.

Example::

    >>> "quickstart" in available_recipes()
    True
"""

from __future__ import annotations

import copy
import importlib.resources
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_landscape.zoo  # noqa: F401  (registers the zoo's classes for short names)

__all__ = [
    "LandscapeCLI",
    "available_recipes",
    "entry",
    "main",
    "merge_config",
    "recipe_description",
    "recipe_path",
    "variant_configs",
]

PROG = "lightning-landscape"
_DESCRIPTION_PREFIX = "# description:"


def _recipe_dirs() -> list[Path]:
    """Folders searched for recipes: the installed package's first, then the source tree's."""
    dirs: list[Path] = []
    packaged = importlib.resources.files("lightning_landscape") / "recipes"
    if isinstance(packaged, os.PathLike) and packaged.is_dir():
        dirs.append(Path(os.fspath(packaged)))
    source = Path(__file__).resolve().parent.parent / "recipes"
    if source.is_dir():
        dirs.append(source)
    return dirs


def available_recipes() -> dict[str, Path]:
    """Recipe names mapped to their YAML files, sorted by name.

    A name found in the installed package shadows the same name in a source checkout.
    """
    found: dict[str, Path] = {}
    for folder in _recipe_dirs():
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def recipe_description(path: str | os.PathLike[str]) -> str:
    """The text after ``# description:`` on a recipe's first line (empty if there is none)."""
    with open(path, encoding="utf-8") as handle:
        first = handle.readline().strip()
    if first.lower().startswith(_DESCRIPTION_PREFIX):
        return first[len(_DESCRIPTION_PREFIX) :].strip()
    return ""


def recipe_path(name: str) -> Path:
    """Path of recipe ``name``.

    Raises:
        ValueError: If there is no such recipe; the message lists the available ones.
    """
    recipes = available_recipes()
    if name not in recipes:
        listing = ", ".join(recipes) or "(none found)"
        raise ValueError(f"unknown recipe {name!r}; available recipes: {listing}")
    return recipes[name]


def _format_recipes() -> str:
    recipes = available_recipes()
    if not recipes:
        return "no recipes found"
    width = max(len(name) for name in recipes)
    lines = [
        f"{name:<{width}}  {recipe_description(path)}".rstrip() for name, path in recipes.items()
    ]
    return "\n".join(lines)


def _expand_recipe(args: list[str]) -> list[str]:
    """Replace every ``--recipe NAME`` / ``--recipe=NAME`` by ``--config <path>``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--recipe" or arg.startswith("--recipe="):
            if arg == "--recipe":
                if i + 1 >= len(args) or args[i + 1].startswith("-"):
                    raise ValueError("`--recipe` needs a name, e.g. `--recipe quickstart`")
                name = args[i + 1]
                i += 2
            else:
                name = arg.split("=", 1)[1]
                i += 1
            out += ["--config", str(recipe_path(name))]
        else:
            out.append(arg)
            i += 1
    return out


def merge_config(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` deep-merged with ``override``: mappings merge key by key, anything else
    (lists included) is replaced by the override's value. Neither input is modified.

    Example::

        >>> merge_config({"a": {"x": 1, "y": [1]}, "b": 2}, {"a": {"y": [3]}, "c": 4})
        {'a': {'x': 1, 'y': [3]}, 'b': 2, 'c': 4}
    """
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def variant_configs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The configs a config's ``variants:`` expands to, by variant name (see the module doc).

    A config without ``variants`` gives ``{}``. Each variant's TensorBoard logger (if the
    merged config has one in ``trainer.logger``) gets ``name: <name>/<variant name>`` unless
    the variant sets the logger's ``version`` itself.

    Raises:
        ValueError: If ``variants`` is not a non-empty mapping of names to mappings.
    """
    variants = config.get("variants")
    if variants is None:
        return {}
    if not isinstance(variants, Mapping) or not variants:
        raise ValueError(
            f"`variants` must be a non-empty mapping of name: overrides, got {variants!r}"
        )
    base = {k: v for k, v in config.items() if k != "variants"}
    out: dict[str, dict[str, Any]] = {}
    for name, override in variants.items():
        if not isinstance(name, str) or not name or not isinstance(override, Mapping):
            raise ValueError(
                f"`variants` entries must map a name to a mapping of overrides, got {name!r}: {override!r}"
            )
        merged = merge_config(base, override)
        logger = merged.get("trainer", {}).get("logger")
        if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith(
            "TensorBoardLogger"
        ):
            init = logger.setdefault("init_args", {})
            if "version" not in init:
                init["name"] = f"{init.get('name', 'lightning_logs')}/{name}"
        out[name] = merged
    return out


def _pop_variants(args: list[str]) -> tuple[list[str], list[str]]:
    """Split ``--variant NAME`` / ``--variant=NAME`` off ``args``."""
    rest: list[str] = []
    chosen: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--variant":
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                raise ValueError("`--variant` needs a name, e.g. `--variant batchnorm`")
            chosen.append(args[i + 1])
            i += 2
        elif arg.startswith("--variant="):
            chosen.append(arg.split("=", 1)[1])
            i += 1
        else:
            rest.append(arg)
            i += 1
    return rest, chosen


def _variant_runs(args: list[str], chosen: list[str], folder: str) -> list[tuple[str, list[str]]]:
    """One argument list per variant to run (``[("", args)]`` if no config has variants)."""
    for i, arg in enumerate(args[:-1]):
        if arg != "--config":
            continue
        path = Path(args[i + 1])
        if not path.is_file():
            continue
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        variants = variant_configs(config) if isinstance(config, dict) else {}
        if not variants:
            continue
        unknown = [name for name in chosen if name not in variants]
        if unknown:
            raise ValueError(
                f"unknown `--variant` {unknown[0]!r} for {path.name}; "
                f"its variants are: {', '.join(variants)}"
            )
        runs = []
        for name, merged in variants.items():
            if chosen and name not in chosen:
                continue
            target = Path(folder) / f"{path.stem}.{name}.yaml"
            target.write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")
            runs.append((name, [*args[: i + 1], str(target), *args[i + 2 :]]))
        return runs
    if chosen:
        raise ValueError(f"`--variant` {chosen[0]!r} given, but no config has `variants:`")
    return [("", args)]


class LandscapeCLI(LightningCLI):
    """The LightningCLI that :func:`main` runs.

    :func:`main` sets the project's defaults: any LightningModule and LightningDataModule
    subclass (``subclass_mode``), ``seed_everything`` 0, and a ``config.yaml`` that is
    overwritten when a run reuses a log folder. An ``optimizer:`` given in the config replaces
    the module's ``configure_optimizers`` without Lightning's warning about it (replacing it is
    what the option is for).
    """

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """Lightning's own method, minus its 'will be overridden' warning (that is the point)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden")
            super()._add_configure_optimizers_method_to_model(subcommand)


def main(argv: Sequence[str] | None = None) -> LightningCLI | None:
    """Entry point of ``lightning-landscape`` and ``python -m lightning_landscape``.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The :class:`LandscapeCLI` that ran (the last one when a config has ``variants``), or
        ``None`` for ``recipes``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["recipes"]:
        print(_format_recipes())
        return None
    if not args or args[0] in ("-h", "--help"):
        print(
            f"{PROG} recipes                 list the bundled recipes\n"
            f"{PROG} fit --recipe NAME [...]  run a recipe (shorthand for --config <its yaml>)\n"
        )
    with tempfile.TemporaryDirectory(prefix="lightning_landscape_") as folder:
        try:
            args, chosen = _pop_variants(_expand_recipe(args))
            runs = _variant_runs(args, chosen, folder)
        except ValueError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        result: LightningCLI | None = None
        for name, run_args in runs:
            if name and len(runs) > 1:
                print(f"{PROG}: variant {name!r}", file=sys.stderr)
            result = _run_cli(run_args, from_argv=argv is None)
        return result


def entry() -> None:
    """The console script ``lightning-landscape`` (and ``python -m lightning_landscape``).

    Runs :func:`main` on ``sys.argv`` and returns nothing, so the process exits with status 0
    (``sys.exit`` of the returned CLI object would print it and exit with status 1).
    """
    main()


def _run_cli(args: list[str], *, from_argv: bool) -> LightningCLI:
    if from_argv:
        # Run "from the command line" (LightningCLI warns when given both args and sys.argv).
        sys.argv[1:] = args
    return LandscapeCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs={"prog": PROG},
        args=None if from_argv else args,
    )
