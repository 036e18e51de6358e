"""The TensorBoard "Landscape" tab: backend of a dynamic (iframed ES module) plugin.

TensorBoard finds :class:`LandscapePlugin` through the ``tensorboard_plugins`` entry point of
the installed wheel. The frontend (``static/index.js``, drawn with the vendored uPlot) asks
these routes, all under ``/data/plugin/landscape/``:

- ``/metrics``: the declared metrics of every family (:func:`.metrics.frontend_table`): the
  sections in order, and which quantities (as regexes) each panel draws, with their labels;
- ``/runs``: ``{"runs": {run: {"instances": {name: {"family", "quantities"}},
  "landscape_steps": [step, ...]}}}`` — the callback instances recognised from each run's
  ``landscape/*`` scalar and text tags (see :mod:`.families`), and the steps of the
  ``landscape_step<step>.npz`` files of ``LossLandscape`` in the run's folder;
- ``/scalars?run=R&instance=N``: ``{quantity: {"steps": [...], "values": [...]}}`` for every
  scalar quantity of that instance (non-finite values are ``null``);
- ``/density?run=R&instance=N``: ``{"steps": [...], "grids": [[...]], "densities": [[...]]}``
  from the JSON text summaries ``landscape/<N>/density_data`` (``panels.log_data``);
- ``/landscape?run=R&step=S``: the arrays of ``landscape_step<S>.npz`` as JSON lists;
- ``/index.js`` and ``/static/<file>``: the frontend.

Every read goes through ``context.data_provider`` except the ``.npz`` files, which are read from
``<logdir>/<run>/`` only for a run the data provider lists, whose path lies inside the logdir
(no path traversal), and only regular files named exactly ``landscape_step<int>.npz``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard import context as tb_context
from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from lightning_landscape.metrics import frontend_table
from lightning_landscape.tensorboard_plugin.families import PREFIX, TEXT_SUFFIX, families

__all__ = ["PLUGIN_NAME", "STATIC_DIR", "LandscapePlugin"]

PLUGIN_NAME = "landscape"
STATIC_DIR = Path(__file__).resolve().parent / "static"
_NPZ = re.compile(r"landscape_step(\d+)\.npz")
_STATIC_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".json": "application/json"}
_DOWNSAMPLE = 100_000  # no thinning beyond what TensorBoard itself kept
_JSON = "application/json"


def _finite(values: Iterable[float]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _jsonable(value: np.ndarray) -> Any:
    """An npz array as JSON: numbers (non-finite → ``None``), strings or nested lists."""
    if value.dtype.kind == "f":
        flat = _finite(value.astype(np.float64).reshape(-1).tolist())
        if value.ndim == 0:
            return flat[0]
        return np.array(flat, dtype=object).reshape(value.shape).tolist()
    return value.tolist()


class LandscapePlugin(base_plugin.TBPlugin):
    """The "Landscape" tab (see the module docstring for its routes)."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._provider = context.data_provider
        self._logdir = context.logdir or ""

    # -- TBPlugin ---------------------------------------------------------------------------
    def get_plugin_apps(self) -> dict[str, Callable[..., Any]]:
        routes = {
            "/index.js": self._serve_index,
            "/static/*": self._serve_static,
            "/metrics": self._serve_metrics,
            "/runs": self._serve_runs,
            "/scalars": self._serve_scalars,
            "/density": self._serve_density,
            "/landscape": self._serve_landscape,
        }
        return {path: wrappers.Request.application(handler) for path, handler in routes.items()}

    def is_active(self) -> bool:
        """Whether any run has a ``landscape/*`` scalar tag (the tab is hidden otherwise)."""
        if self._provider is None:
            return False
        ctx = tb_context.RequestContext()
        runs = self._provider.list_scalars(ctx, experiment_id="", plugin_name="scalars")
        return any(tag.startswith(PREFIX) for tags in runs.values() for tag in tags)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Landscape")

    # -- data -------------------------------------------------------------------------------
    def _scalar_tags(self, ctx: Any, eid: str, runs: list[str] | None = None) -> dict[str, Any]:
        return self._provider.list_scalars(
            ctx,
            experiment_id=eid,
            plugin_name="scalars",
            run_tag_filter=provider.RunTagFilter(runs=runs),
        )

    def _text_tags(self, ctx: Any, eid: str, runs: list[str] | None = None) -> dict[str, Any]:
        return self._provider.list_tensors(
            ctx,
            experiment_id=eid,
            plugin_name="text",
            run_tag_filter=provider.RunTagFilter(runs=runs),
        )

    def _known_runs(self, ctx: Any, eid: str) -> set[str]:
        return {r.run_name for r in self._provider.list_runs(ctx, experiment_id=eid)}

    def _run_dir(self, known: set[str], run: str) -> Path | None:
        """The local folder of a run the data provider lists, if its path lies in the logdir.

        The run name must be one TensorBoard itself lists (so ``..`` and absolute names never
        are), and ``<logdir>/<run>`` must stay inside the logdir as written (a run folder that
        is a symlink TensorBoard followed is the user's choice and is read).
        """
        if not self._logdir or not os.path.isdir(self._logdir):
            return None
        if run not in known or os.path.isabs(run):
            return None
        root = os.path.abspath(self._logdir)
        folder = os.path.normpath(os.path.join(root, run))
        if os.path.commonpath([root, folder]) != root or not os.path.isdir(folder):
            return None
        return Path(folder)

    def _landscape_files(self, folder: Path | None) -> dict[int, Path]:
        """``{step: path}`` of the regular ``landscape_step<step>.npz`` files in ``folder``."""
        if folder is None:
            return {}
        found = {}
        for path in folder.iterdir():
            match = _NPZ.fullmatch(path.name)
            if match and path.is_file() and not path.is_symlink():
                found[int(match.group(1))] = path
        return dict(sorted(found.items()))

    @staticmethod
    def _instance_tags(tags: Iterable[str], instance: str) -> dict[str, str]:
        """``{quantity: tag}`` of the tags that belong to ``instance``."""
        grouped = families(tags)
        if instance not in grouped:
            return {}
        wanted = set(grouped[instance][1])
        out = {}
        for tag in tags:
            rest = tag[len(PREFIX) :]
            if rest.endswith(TEXT_SUFFIX):
                rest = rest[: -len(TEXT_SUFFIX)]
            head = instance + "/"
            if tag.startswith(PREFIX) and rest.startswith(head) and rest[len(head) :] in wanted:
                out[rest[len(head) :]] = tag
        return out

    # -- routes -----------------------------------------------------------------------------
    def _serve_index(self, request: wrappers.Request) -> wrappers.Response:
        return self._file(request, "index.js")

    def _serve_static(self, request: wrappers.Request) -> wrappers.Response:
        name = request.path.rsplit("/", 1)[-1]
        return self._file(request, name)

    def _file(self, request: wrappers.Request, name: str) -> wrappers.Response:
        path = STATIC_DIR / name
        if not _STATIC_NAME.fullmatch(name) or name.startswith(".") or not path.is_file():
            raise errors.NotFoundError(f"no static file {name!r}")
        content_type = _CONTENT_TYPES.get(path.suffix, "text/plain")
        return http_util.Respond(request, path.read_bytes(), content_type)

    def _serve_metrics(self, request: wrappers.Request) -> wrappers.Response:
        return http_util.Respond(request, frontend_table(), _JSON)

    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        scalars = self._scalar_tags(ctx, eid)
        texts = self._text_tags(ctx, eid)
        known = self._known_runs(ctx, eid)
        out: dict[str, Any] = {}
        for run in sorted(set(scalars) | set(texts)):
            tags = [*scalars.get(run, {}), *texts.get(run, {})]
            instances = {
                name: {"family": family, "quantities": list(quantities)}
                for name, (family, quantities) in families(tags).items()
            }
            steps = list(self._landscape_files(self._run_dir(known, run)))
            if instances or steps:
                out[run] = {"instances": instances, "landscape_steps": steps}
        return http_util.Respond(request, {"runs": out}, _JSON)

    def _args(self, request: wrappers.Request, *names: str) -> list[str]:
        values = [request.args.get(name) for name in names]
        missing = [n for n, v in zip(names, values) if not v]
        if missing:
            raise errors.InvalidArgumentError(f"missing query parameter(s): {', '.join(missing)}")
        return [str(v) for v in values]

    def _serve_scalars(self, request: wrappers.Request) -> wrappers.Response:
        run, instance = self._args(request, "run", "instance")
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        all_tags = [*self._scalar_tags(ctx, eid, [run]).get(run, {})]
        text_tags = [*self._text_tags(ctx, eid, [run]).get(run, {})]
        by_quantity = {
            q: tag
            for q, tag in self._instance_tags([*all_tags, *text_tags], instance).items()
            if tag in all_tags
        }
        out: dict[str, Any] = {}
        if by_quantity:
            data = self._provider.read_scalars(
                ctx,
                experiment_id=eid,
                plugin_name="scalars",
                downsample=_DOWNSAMPLE,
                run_tag_filter=provider.RunTagFilter(runs=[run], tags=list(by_quantity.values())),
            ).get(run, {})
            for quantity, tag in sorted(by_quantity.items()):
                points = data.get(tag, [])
                out[quantity] = {
                    "steps": [int(p.step) for p in points],
                    "values": _finite(p.value for p in points),
                }
        return http_util.Respond(request, out, _JSON)

    def _serve_density(self, request: wrappers.Request) -> wrappers.Response:
        run, instance = self._args(request, "run", "instance")
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        text_tags = [*self._text_tags(ctx, eid, [run]).get(run, {})]
        tag = self._instance_tags(text_tags, instance).get("density_data")
        by_step: dict[int, tuple[list[float | None], list[float | None]]] = {}
        if tag is not None:
            data = self._provider.read_tensors(
                ctx,
                experiment_id=eid,
                plugin_name="text",
                downsample=_DOWNSAMPLE,
                run_tag_filter=provider.RunTagFilter(runs=[run], tags=[tag]),
            ).get(run, {})
            for datum in sorted(data.get(tag, []), key=lambda d: d.step):
                try:
                    raw = np.asarray(datum.numpy).reshape(-1)[0]
                    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
                    payload = json.loads(text)
                    grid = _finite(map(float, payload["grid"]))
                    density = _finite(map(float, payload["density"]))
                except (IndexError, KeyError, TypeError, ValueError):
                    continue  # not a density payload: skip that step
                if len(grid) == len(density) and grid:
                    by_step[int(datum.step)] = (grid, density)  # a step written twice: the last
        out = {
            "steps": list(by_step),
            "grids": [g for g, _ in by_step.values()],
            "densities": [d for _, d in by_step.values()],
        }
        return http_util.Respond(request, out, _JSON)

    def _serve_landscape(self, request: wrappers.Request) -> wrappers.Response:
        run, step = self._args(request, "run", "step")
        if not step.isdigit():
            raise errors.InvalidArgumentError(f"step must be a non-negative integer, got {step!r}")
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        folder = self._run_dir(self._known_runs(ctx, eid), run)
        path = self._landscape_files(folder).get(int(step))
        if path is None:
            raise errors.NotFoundError(f"no landscape_step{step}.npz for run {run!r}")
        with np.load(path, allow_pickle=False) as arrays:
            out = {key: _jsonable(arrays[key]) for key in arrays.files}
        return http_util.Respond(request, out, _JSON)
