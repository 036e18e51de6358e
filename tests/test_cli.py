"""Tests for the ``lightning-landscape`` command and the bundled recipes."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_landscape import cli
from lightning_landscape.cli import available_recipes, main, recipe_description, recipe_path

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RECIPE_FILES = sorted(REPO_RECIPES.glob("*.yaml"))
RECIPE_NAMES = [p.stem for p in RECIPE_FILES]
HAVE_CALLBACKS = importlib.util.find_spec("lightning_landscape.callbacks") is not None
if HAVE_CALLBACKS:
    try:
        import lightning_landscape.callbacks  # noqa: F401
    except ImportError:
        HAVE_CALLBACKS = False


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run from a scratch folder with a clean argv (no writes into the repository)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-landscape"])


def test_there_are_recipes_and_each_has_a_description() -> None:
    assert {"quickstart", "edge_of_stability_gd", "edge_of_stability_adam"} <= set(RECIPE_NAMES)
    for path in RECIPE_FILES:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# description: "), path.name
        assert recipe_description(path) == first[len("# description: ") :].strip() != ""


def test_recipes_command_lists_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == RECIPE_NAMES
    for line, path in zip(lines, RECIPE_FILES):
        assert line.endswith(recipe_description(path))


def test_recipe_lookup_finds_the_source_tree() -> None:
    assert available_recipes() == dict(zip(RECIPE_NAMES, RECIPE_FILES))
    assert recipe_path("quickstart") == REPO_RECIPES / "quickstart.yaml"


def test_packaged_recipes_shadow_the_source_tree(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    packaged, source = tmp_path / "pkg", tmp_path / "src"
    for folder, names in ((packaged, ["a", "b"]), (source, ["b", "c"])):
        folder.mkdir()
        for name in names:
            (folder / f"{name}.yaml").write_text(f"# description: {name} in {folder.name}\n")
    monkeypatch.setattr(cli, "_recipe_dirs", lambda: [packaged, source])
    found = available_recipes()
    assert list(found) == ["a", "b", "c"]
    assert found["b"] == packaged / "b.yaml" and found["c"] == source / "c.yaml"
    assert recipe_description(found["b"]) == "b in pkg"


def test_unknown_recipe_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--recipe", "no_such_recipe"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'no_such_recipe'" in err
    assert all(name in err for name in RECIPE_NAMES)
    with pytest.raises(ValueError, match="available recipes: "):
        recipe_path("no_such_recipe")


def test_recipe_needs_a_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--recipe"])
    assert "`--recipe` needs a name" in capsys.readouterr().err


def test_recipe_flag_becomes_config() -> None:
    path = str(REPO_RECIPES / "quickstart.yaml")
    assert cli._expand_recipe(["fit", "--recipe", "quickstart", "--x=1"]) == [
        "fit", "--config", path, "--x=1",
    ]  # fmt: skip
    assert cli._expand_recipe(["fit", "--recipe=quickstart"]) == ["fit", "--config", path]


def test_python_dash_m_runs_the_same_command() -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "lightning_landscape", "recipes"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        timeout=120,
    )
    assert [line.split()[0] for line in result.stdout.strip().splitlines()] == RECIPE_NAMES


def _expected_optimizer(config: dict) -> tuple[type[torch.optim.Optimizer], float]:
    """The optimizer a recipe asks for: its ``optimizer:`` entry, else the module's SGD."""
    if "optimizer" in config:
        spec = config["optimizer"]
        module, _, name = spec["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name), spec["init_args"]["lr"]
    return torch.optim.SGD, config["model"]["init_args"]["lr"]


def _two_step_args(tmp_path: Path) -> list[str]:
    return [
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]


def _last_variant(config: dict) -> dict:
    """The config of the run ``main`` returns: the last variant's, if there are variants."""
    variants = cli.variant_configs(config)
    return list(variants.values())[-1] if variants else config


def _check_run(result: cli.LightningCLI | None, config: dict, tmp_path: Path, name: str) -> None:
    assert result is not None
    trainer = result.trainer
    assert trainer.global_step == 2
    cls, lr = _expected_optimizer(config)
    assert type(trainer.optimizers[0]) is cls
    assert trainer.optimizers[0].param_groups[0]["lr"] == lr
    log_dir = Path(trainer.log_dir or "")
    assert log_dir.is_relative_to(tmp_path / config["trainer"]["logger"]["init_args"]["name"])
    assert (log_dir / "config.yaml").is_file()
    assert any(log_dir.glob("events.out.tfevents.*"))
    assert name in str(log_dir)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=RECIPE_NAMES)
def test_recipe_runs_two_steps_without_callbacks(path: Path, tmp_path: Path) -> None:
    """Every recipe parses, instantiates and trains (callbacks stripped)."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["trainer"].pop("callbacks", None)
    for variant in (config.get("variants") or {}).values():
        variant.get("trainer", {}).pop("callbacks", None)
    stripped = tmp_path / path.name
    stripped.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = main(["fit", "--config", str(stripped), *_two_step_args(tmp_path)])
    _check_run(result, _last_variant(config), tmp_path, path.stem)
    # an `optimizer:` entry replaces configure_optimizers silently (it is what it is for)
    assert not [w for w in caught if "will be overridden" in str(w.message)]


@pytest.mark.skipif(
    not HAVE_CALLBACKS, reason="lightning_landscape.callbacks is not importable yet"
)
@pytest.mark.parametrize("path", RECIPE_FILES, ids=RECIPE_NAMES)
def test_recipe_runs_two_steps(path: Path, tmp_path: Path) -> None:
    """``fit --recipe NAME`` runs 2 steps with the recipe's callbacks attached."""
    config = _last_variant(yaml.safe_load(path.read_text(encoding="utf-8")))
    result = main(["fit", "--recipe", path.stem, *_two_step_args(tmp_path)])
    _check_run(result, config, tmp_path, path.stem)
    assert result is not None
    wanted = [c["class_path"].rpartition(".")[2] for c in config["trainer"].get("callbacks", [])]
    attached = [type(c).__name__ for c in result.trainer.callbacks]
    assert all(name in attached for name in wanted)


def _variants_recipe(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO_RECIPES / "quickstart.yaml").read_text(encoding="utf-8"))
    config["trainer"].pop("callbacks", None)
    config["variants"] = {
        "narrow": {"model": {"init_args": {"net": {"init_args": {"width": 8}}}}},
        "wide": {"model": {"init_args": {"net": {"init_args": {"width": 16}}, "lr": 0.02}}},
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_merge_config_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"x": 1, "l": [1, 2]}, "b": "keep"}
    merged = cli.merge_config(base, {"a": {"l": [3], "y": 2}})
    assert merged == {"a": {"x": 1, "l": [3], "y": 2}, "b": "keep"}
    assert base == {"a": {"x": 1, "l": [1, 2]}, "b": "keep"}  # inputs untouched


def test_variant_configs_name_the_logger_runs_and_reject_bad_entries(tmp_path: Path) -> None:
    config = yaml.safe_load(_variants_recipe(tmp_path).read_text(encoding="utf-8"))
    variants = cli.variant_configs(config)
    assert list(variants) == ["narrow", "wide"]
    wide = variants["wide"]
    assert "variants" not in wide
    assert wide["model"]["init_args"]["net"]["init_args"] == {
        **config["model"]["init_args"]["net"]["init_args"], "width": 16,
    }  # fmt: skip
    assert wide["model"]["init_args"]["lr"] == 0.02
    assert wide["trainer"]["logger"]["init_args"]["name"] == "quickstart/wide"
    assert "version" not in wide["trainer"]["logger"]["init_args"]  # a rerun gets a new version
    assert cli.variant_configs({"trainer": {}}) == {}
    with pytest.raises(ValueError, match="`variants` must be a non-empty mapping"):
        cli.variant_configs({"variants": []})
    with pytest.raises(ValueError, match="`variants` entries must map a name"):
        cli.variant_configs({"variants": {"a": 3}})


def test_variants_run_one_after_another_side_by_side(tmp_path: Path) -> None:
    path = _variants_recipe(tmp_path)
    result = main(["fit", "--config", str(path), *_two_step_args(tmp_path)])
    assert result is not None and result.trainer.global_step == 2
    runs = tmp_path / "quickstart"
    assert sorted(p.name for p in runs.iterdir()) == ["narrow", "wide"]
    for name, width in (("narrow", 8), ("wide", 16)):
        run = runs / name / "version_0"
        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        assert saved["model"]["init_args"]["net"]["init_args"]["width"] == width
        assert any(run.glob("events.out.tfevents.*"))
    # the last run is the one returned
    assert result.model.net.layers[0].out_features == 16


def test_variant_flag_picks_one_and_names_unknown_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _variants_recipe(tmp_path)
    for _ in range(2):
        args = ["fit", "--config", str(path), "--variant", "narrow", *_two_step_args(tmp_path)]
        result = main(args)
        assert result is not None and result.model.net.layers[0].out_features == 8
    assert [p.name for p in (tmp_path / "quickstart").iterdir()] == ["narrow"]
    # running it again adds a version next to the first run instead of writing into it
    versions = sorted(p.name for p in (tmp_path / "quickstart" / "narrow").iterdir())
    assert versions == ["version_0", "version_1"]
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--variant=huge"])
    assert "unknown `--variant` 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--recipe", "quickstart", "--variant", "x"])
    assert "no config has `variants:`" in capsys.readouterr().err


def test_console_script_exits_zero_after_a_run(tmp_path: Path) -> None:
    """The installed script is ``sys.exit(<entry point>())``: it must return None (status 0)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert scripts["lightning-landscape"] == "lightning_landscape.cli:entry"
    args = [
        "fit", "--recipe", "quickstart", "--trainer.callbacks=[]", *_two_step_args(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from lightning_landscape.cli import entry; "
         "sys.exit(entry())", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LandscapeCLI object" not in result.stderr
    # the end of `fit` says where the logs are and how to see them; no Lightning advertising
    assert "💡" not in result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()[-4:]
    assert lines == [
        "lightning-landscape: logs in quickstart/version_0",
        "lightning-landscape: see them with",
        "    tensorboard --logdir .",
        '  and open the "Landscape" tab.',
    ], result.stdout[-1000:]


def test_fit_help_starts_with_the_recipe_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    usage = out.split("\n\n", 1)[0]
    assert usage.startswith("usage: lightning-landscape") and "--recipe NAME" in usage
    assert len(usage.splitlines()) <= 3  # not Lightning's 50 lines of every trainer flag
    group = out.index("recipe options")
    assert out.index("Runs the full optimization routine") < group
    assert group < out.index("\n  --trainer.accelerator") < out.index("\n  --model")
    section = out[group : out.index("\n\n", group)]
    for option in ("--recipe NAME", "--variant NAME", "--threads N"):
        assert option in section, section


def test_threads_default_to_one_unless_omp_num_threads_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    monkeypatch.setattr(
        cli, "_run_cli", lambda args, from_argv: seen.append(torch.get_num_threads())
    )
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    main(["fit", "--trainer.max_steps=1"])
    main(["fit", "--threads", "3"])
    main(["fit", "--threads=2", "--trainer.max_steps=1"])
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    main(["fit"])  # OMP_NUM_THREADS set: torch's own choice is left alone
    main(["fit", "--threads", "3"])  # ... unless --threads says otherwise
    assert seen == [1, 3, 2, before, 3]
    assert torch.get_num_threads() == before  # restored after the run
    assert (
        cli.default_threads(None, {}) == 1
        and cli.default_threads(None, {"OMP_NUM_THREADS": "2"}) is None
    )


@pytest.mark.parametrize("args", [["--threads", "0"], ["--threads=two"], ["--threads"]])
def test_threads_must_be_a_positive_integer(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", *args])
    assert exc.value.code == 2
    assert "`--threads`" in capsys.readouterr().err


def test_lightning_tips_are_silenced() -> None:
    import logging

    from lightning.pytorch.utilities import rank_zero_info

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        cli.silence_tips()
        cli.silence_tips()  # idempotent
        rank_zero_info("💡 Tip: try installing something")
        rank_zero_info("a real message")
    finally:
        logger.removeHandler(handler)
    assert records == ["a real message"]


def _instantiate(cli_class: type, optimizer: list[str]) -> list[str]:
    """Messages of the warnings while ``cli_class`` instantiates a zoo Classifier (no run)."""
    args = [
        "--model=lightning_landscape.zoo.Classifier",
        "--model.net=lightning_landscape.zoo.MLP",
        "--model.net.in_features=64",
        "--model.net.out_features=10",
        "--data=lightning_landscape.zoo.DigitsDataModule",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        *optimizer,
    ]
    from lightning.pytorch import LightningDataModule, LightningModule

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = cli_class(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=args,
        )
    assert type(made.model.configure_optimizers()).__name__ == ("Adam" if optimizer else "SGD")
    return [str(w.message) for w in caught]


def test_optimizer_entry_replaces_configure_optimizers_without_the_warning() -> None:
    from lightning.pytorch.cli import LightningCLI

    overridden = "configure_optimizers` will be overridden"
    assert not [m for m in _instantiate(cli.LandscapeCLI, ["--optimizer=Adam"]) if overridden in m]
    # the filter names LandscapeCLI only: Lightning's own CLI still warns, and no optimizer entry
    # leaves the module's own configure_optimizers in place
    assert [m for m in _instantiate(LightningCLI, ["--optimizer=Adam"]) if overridden in m]
    assert not [m for m in _instantiate(cli.LandscapeCLI, []) if overridden in m]
