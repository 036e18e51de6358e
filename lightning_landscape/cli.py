"""The ``lightning-landscape`` command: LightningCLI plus named recipes.

Usage::

    lightning-landscape recipes                          # list the recipes
    lightning-landscape fit --recipe quickstart          # run one
    lightning-landscape fit --recipe edge_of_stability_gd --trainer.max_steps=500
    lightning-landscape fit --config my_experiment.yaml  # any LightningCLI config
    python -m lightning_landscape ...                    # the same

``--recipe NAME`` is shorthand for ``--config <path of NAME.yaml>``; options after it override
the recipe, as with ``--config``. ``--threads N``: ``torch.set_num_threads(N)`` (default 1 unless
``OMP_NUM_THREADS`` is set; "recipe options" in ``fit --help``). ``fit`` ends by printing the log
folder and the ``tensorboard`` command to view it; Lightning's "💡 Tip" lines are dropped.

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

import argparse
import copy
import importlib.resources
import logging
import os
import shlex
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_landscape.zoo  # noqa: F401  (registers the zoo's classes for short names)

__all__ = [
    "LandscapeCLI",
    "available_recipes",
    "default_threads",
    "entry",
    "main",
    "merge_config",
    "recipe_description",
    "recipe_path",
    "silence_tips",
    "variant_configs",
]

PROG = "lightning-landscape"
_DESCRIPTION_PREFIX = "# description:"
_USAGE = (
    "%(prog)s [-h] [--recipe NAME | --config FILE] [--variant NAME] [--threads N]\n"
    "       [--trainer.* ...] [--model.* ...] [--data.* ...] [--optimizer ...] [...]"
)
_FIT_DESCRIPTION = (
    "Runs the full optimization routine of a bundled recipe (--recipe NAME; list them with "
    f"`{PROG} recipes`) or of your own config (--config FILE). Options after it override it: "
    "--trainer.*, --model.*, --data.*, --optimizer, ... (below)."
)


def _recipe_dirs() -> list[Path]:
    """Folders searched for recipes: the installed package's first, then the source tree's."""
    packaged = importlib.resources.files("lightning_landscape") / "recipes"
    source = Path(__file__).resolve().parent.parent / "recipes"
    found = [packaged] if isinstance(packaged, os.PathLike) and packaged.is_dir() else []
    return [Path(os.fspath(p)) for p in found] + ([source] if source.is_dir() else [])


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
    width = max(map(len, recipes), default=0)
    lines = [f"{name:<{width}}  {recipe_description(p)}".rstrip() for name, p in recipes.items()]
    return "\n".join(lines) or "no recipes found"


def _expand_recipe(args: list[str]) -> list[str]:
    """Replace every ``--recipe NAME`` / ``--recipe=NAME`` by ``--config <path>``."""
    expand = lambda name: ["--config", str(recipe_path(name))]  # noqa: E731
    return _pop_option(args, "--recipe", "a name, e.g. `--recipe quickstart`", expand)[0]


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
        path = str(logger.get("class_path", "")) if isinstance(logger, dict) else ""
        if path.endswith("TensorBoardLogger"):
            init = logger.setdefault("init_args", {})
            if "version" not in init:
                init["name"] = f"{init.get('name', 'lightning_logs')}/{name}"
        out[name] = merged
    return out


def _pop_option(
    args: list[str], option: str, example: str, expand: Callable[[str], list[str]] | None = None
) -> tuple[list[str], list[str]]:
    """Split every ``option VALUE`` / ``option=VALUE`` off ``args``: (the rest, the values).
    With ``expand``, ``expand(VALUE)`` (a list of arguments) takes the option's place."""
    rest: list[str] = []
    values: list[str] = []
    i = 0
    while i < len(args):
        if (arg := args[i]) == option and (i + 1 >= len(args) or args[i + 1].startswith("-")):
            raise ValueError(f"`{option}` needs {example}")
        if arg == option or arg.startswith(option + "="):
            values.append(args[i + 1] if arg == option else arg.split("=", 1)[1])
            rest += expand(values[-1]) if expand else []
            i += 2 if arg == option else 1
        else:
            rest.append(arg)
            i += 1
    return rest, values


def _pop_threads(args: list[str]) -> tuple[list[str], int | None]:
    """Split ``--threads N`` / ``--threads=N`` off ``args`` (the last one wins)."""
    rest, values = _pop_option(args, "--threads", "a number, e.g. `--threads 2`")
    if bad := [v for v in values if not v.isdigit() or int(v) < 1]:
        raise ValueError(f"`--threads` must be a positive integer, got {bad[0]!r}")
    return rest, int(values[-1]) if values else None


def default_threads(threads: int | None, environ: Mapping[str, str] = os.environ) -> int | None:
    """Threads for a run: ``threads``, else 1 unless ``OMP_NUM_THREADS`` is set (``None``).

    Example::

        >>> default_threads(None, {}), default_threads(None, {"OMP_NUM_THREADS": "4"})
        (1, None)
    """
    return threads if threads is not None else None if environ.get("OMP_NUM_THREADS") else 1


class _NoTips(logging.Filter):
    """Drops Lightning's advertising records ("💡 Tip: ... litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


_NO_TIPS = _NoTips()


def silence_tips() -> None:
    """Filter "💡 Tip" records out of Lightning's loggers (idempotent). ``rank_zero_info`` logs
    on its own module's logger, whose records skip the parent logger's filters: both get it."""
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        if _NO_TIPS not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_NO_TIPS)


def _shown(path: str) -> str:
    """``path`` relative to the working folder if it lies inside it, else absolute; quoted."""
    full, here = os.path.abspath(path), os.getcwd()
    return shlex.quote(os.path.relpath(full) if os.path.commonpath([full, here]) == here else full)


def _report(results: list[LightningCLI]) -> None:
    """Print where the runs logged and the ``tensorboard`` command that shows them (rank 0)."""
    trainers = [t for r in results if (t := getattr(r, "trainer", None)) and t.is_global_zero]
    if folders := [t.log_dir for t in trainers if t.log_dir]:
        print(f"{PROG}: logs in {', '.join(map(_shown, folders))}")
    loggers = [lg for t in trainers for lg in t.loggers if isinstance(lg, TensorBoardLogger)]
    if roots := [os.path.abspath(lg.save_dir) for lg in loggers if lg.save_dir]:
        command = f"tensorboard --logdir {_shown(os.path.commonpath(roots))}"
        print(f'{PROG}: see them with\n    {command}\n  and open the "Landscape" tab.')


#: Options :func:`main` reads before LightningCLI parses: (metavar, help), listed by ``--help``.
_RECIPE_OPTIONS = {
    "--recipe": ("NAME", f"Run a bundled recipe (`{PROG} recipes`): --config <its yaml>."),
    "--variant": ("NAME", "Run only this variant of a config's `variants:` (repeatable)."),
    "--threads": ("N", "torch.set_num_threads(N). Default: 1, unless OMP_NUM_THREADS is set."),
}


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

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser plus a "recipe options" group (what :func:`main` reads before
        parsing: they are listed for ``--help`` and never reach the parsed config)."""
        parser = super().init_parser(**kwargs)
        group = parser.add_argument_group(f"recipe options (read by {PROG} before the rest)")
        for option, (metavar, text) in _RECIPE_OPTIONS.items():
            group.add_argument(option, metavar=metavar, default=argparse.SUPPRESS, help=text)
        return parser

    def before_instantiate_classes(self) -> None:
        """Ignore Lightning's warning that an ``optimizer:`` entry overrides the module's
        ``configure_optimizers`` (that is what it is for): a filter that names this class."""
        message = rf".*will be overridden by `{type(self).__name__}\.configure_optimizers`"
        warnings.filterwarnings("ignore", message)


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
    silence_tips()
    with tempfile.TemporaryDirectory(prefix="lightning_landscape_") as folder:
        try:
            args, threads = _pop_threads(args)
            args, chosen = _pop_option(_expand_recipe(args), "--variant", "a variant's name")
            runs = _variant_runs(args, chosen, folder)
        except ValueError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        previous = torch.get_num_threads()
        torch.set_num_threads(default_threads(threads) or previous)
        results: list[LightningCLI] = []
        try:
            for name, run_args in runs:
                if name and len(runs) > 1:
                    print(f"{PROG}: variant {name!r}", file=sys.stderr)
                results.append(_run_cli(run_args, from_argv=argv is None))
        finally:
            torch.set_num_threads(previous)
        if any(getattr(r, "subcommand", None) == "fit" for r in results):
            _report(results)
        return results[-1] if results else None


def entry() -> None:
    """The console script ``lightning-landscape`` (and ``python -m lightning_landscape``): runs
    :func:`main` on ``sys.argv`` and returns nothing, so the process exits with status 0
    (``sys.exit`` of the returned CLI object would print it and exit with status 1)."""
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
        parser_kwargs={
            "prog": PROG,
            **{name: {"usage": _USAGE} for name in LightningCLI.subcommands()},
            "fit": {"usage": _USAGE, "description": _FIT_DESCRIPTION},
        },
        args=None if from_argv else args,
    )
