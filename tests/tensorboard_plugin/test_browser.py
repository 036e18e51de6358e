"""The Landscape tab in a real browser: headless Chromium over TensorBoard on a real run's logs.

Skipped (with the reason) only where there is no Chromium or no chromedriver on the machine;
Debian: ``apt-get install -y chromium chromium-driver``. The screenshot lands in the test's
tmp dir (``landscape_tab.png``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import launch
from .real_run import write_real_logs

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver",)
#: Panel kinds each run must show, with drawn points.
EXPECTED = {
    "digits/sgd": {"eos", "ratio", "spectrum", "density", "depth-heatmap", "flow", "surface"},
    "digits/kfac": {"eos", "ratio", "kfac", "kfac-seconds"},
}
OVERLAID = {"depth-profile", "interpolation"}  # one panel over all runs of the instance


def _which(names: tuple[str, ...]) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture
def driver() -> Any:
    browser, chromedriver = _which(BROWSERS), _which(DRIVERS)
    if browser is None or chromedriver is None:
        missing = " and ".join(
            name
            for name, path in (("chromium", browser), ("chromedriver", chromedriver))
            if not path
        )
        pytest.skip(
            f"no {missing} on PATH: the browser test needs a headless Chromium "
            "(Debian: apt-get install -y chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1720,2900", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield drv
    drv.quit()


def _open_tab(drv: Any, url: str) -> Any:
    """Open the Landscape tab at ``url``, switch into its iframe, wait until it has drawn."""
    drv.get(f"{url}/#landscape")
    wait = WebDriverWait(drv, 30)
    frame = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "iframe") or False)[0]
    drv.switch_to.frame(frame)
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    return wait


def _panels(drv: Any) -> list[dict[str, Any]]:
    return drv.execute_script(
        "return [...document.querySelectorAll('.panel')].map((p) => ({kind: p.dataset.panel,"
        " instance: p.dataset.instance, run: p.dataset.run || null,"
        " points: Number(p.dataset.points), series: Number(p.dataset.series || 0)}));"
    )


def test_landscape_tab_draws_every_panel_of_a_real_run(
    driver: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = time.monotonic()
    logs = write_real_logs(tmp_path / "logs", monkeypatch)
    trained = time.monotonic() - start
    url = launch(logs, 2)
    wait = _open_tab(driver, url)

    drawn = _panels(driver)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for p in drawn:
        by_kind.setdefault(p["kind"], []).append(p)
    assert all(p["points"] > 0 for p in drawn), [p for p in drawn if p["points"] <= 0]
    for kind in OVERLAID:
        assert kind in by_kind, (kind, drawn)
    # each run's line charts overlay: both runs in the sharpness charts (3 + 2 series)
    assert by_kind["eos"][0]["series"] == 5, by_kind["eos"]
    per_run = {(p["kind"], p["run"]) for p in drawn if p["run"]}
    for run, kinds in EXPECTED.items():
        for kind in kinds:
            if kind in {"density", "depth-heatmap", "surface"}:
                assert (kind, run) in per_run, (kind, run, drawn)
            else:
                assert kind in by_kind, (kind, drawn)
    # no panels of families nobody logged
    assert set(by_kind) <= {k for kinds in EXPECTED.values() for k in kinds} | OVERLAID
    # a run's K-FAC panel disappears when it is deselected
    driver.find_element(By.CSS_SELECTOR, 'input[data-run="digits/kfac"]').click()
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    assert not {"kfac", "kfac-seconds"} & {p["kind"] for p in _panels(driver)}
    driver.find_element(By.CSS_SELECTOR, 'input[data-run="digits/kfac"]').click()
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    # the log-scale toggle redraws with the same points
    eos = driver.find_element(By.CSS_SELECTOR, '.panel[data-panel="eos"]')
    before = eos.get_attribute("data-points")
    eos.find_element(By.CSS_SELECTOR, ".log-toggle").click()
    assert eos.get_attribute("data-points") == before
    eos.find_element(By.CSS_SELECTOR, ".log-toggle").click()

    driver.switch_to.default_content()
    shot = tmp_path / "landscape_tab.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot} (training {trained:.1f} s, total {time.monotonic() - start:.1f} s)")


def test_every_panel_kind_of_the_synthetic_runs_is_drawn(driver: Any, board: str) -> None:
    """Quantities the real run does not log: trace, per-layer block λ_max, R_med by layer."""
    _open_tab(driver, board)
    drawn = _panels(driver)
    assert all(p["points"] > 0 for p in drawn), [p for p in drawn if p["points"] <= 0]
    kinds = {(p["kind"], p["instance"]) for p in drawn}
    assert {
        ("eos", "sharpness"), ("ratio", "sharpness"), ("eos", "heldout"), ("ratio", "heldout"),
        ("spectrum", "hessian"), ("trace", "hessian"), ("layer-eig", "hessian"),
        ("layer-rmed", "hessian"), ("density", "hessian"), ("depth-heatmap", "sample_variance"),
        ("depth-profile", "sample_variance"), ("flow", "gradient_flow"), ("kfac", "kfac"),
        ("surface", "landscape"), ("interpolation", "landscape"),
    } <= kinds, kinds  # fmt: skip
    # one point per layer block and run at the chosen step; several steps: a step slider
    layer = next(p for p in drawn if p["kind"] == "layer-eig")
    assert layer["points"] == 1, layer  # run a logs one layer block (net.0)
    node = driver.find_element(By.CSS_SELECTOR, '.panel[data-panel="layer-eig"]')
    assert node.find_elements(By.CSS_SELECTOR, ".step-slider")
    # runs are listed in natural order
    runs = driver.execute_script(
        "return [...document.querySelectorAll('#runs input')].map((b) => b.dataset.run)"
    )
    assert runs == sorted(runs), runs
