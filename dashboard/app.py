"""The dashboard's FastAPI apps: the coordinator's (runs, sweeps) and the hospital operator's (site state).

Routes of :func:`create_app` (all GET, read-only)::

    /                       runs list (state, rounds, headline metric) and sweeps
    /api/runs               the runs list's live part: {"version", "html"?}
    /run/{key}              a run page: settings, links, charts, ε per site, rounds
    /api/run/{key}          the run page's live part: {"version", "html"?}
    /sweep/{key}            comparison table, privacy-utility plot, the sweep's runs
    /file/{key}?path=REL    a report, plot or record file inside run or sweep ``key``
    /static/{name}          the shipped script and stylesheet

The ``api`` routes take ``?version=`` (what the page shows) and send ``html`` only
when something changed; each call reads only what was appended to the records.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from dashboard.pages import layout, run_live, run_page, runs_live, sweep_page
from dashboard.records import RunIndex
from dashboard.security import MEDIA_TYPES, FileRefused, install_guard, safe_file
from dashboard.site_pages import site_live, site_page
from dashboard.site_state import Budget, SiteState

#: Files under ``dashboard/static`` that are served, with their media type.
STATIC = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}


def _static_routes(app: FastAPI) -> None:
    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        body = resources.files("dashboard").joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name])


def _live(version: str, current: str, render) -> JSONResponse:  # noqa: ANN001 - a no-argument callable
    if version == current:
        return JSONResponse({"version": current})
    return JSONResponse({"version": current, "html": render()})


def create_app(roots: Iterable[Path], *, token: str | None = None, rescan_seconds: float = 2.0) -> FastAPI:
    """The coordinator's dashboard over the run directories under ``roots``.

    Args:
        roots: Folders holding runs (``server.out_dir``), sweeps, or a single run.
        token: When set, every request must carry it (see :mod:`dashboard.security`).
        rescan_seconds: How often the roots are searched for new runs.
    """
    index = RunIndex(roots, rescan_seconds=rescan_seconds)
    app = FastAPI(title="medfed dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    install_guard(app, token=token)
    _static_routes(app)

    def runs_version() -> tuple[str, list]:
        runs = index.all_runs()
        return "|".join(f"{r.key}:{r.version()}" for r in runs) + f"|{len(index.sweeps)}", runs

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        version, runs = runs_version()
        where = ", ".join(str(r) for r in index.roots)
        return layout(title="runs", body=runs_live(runs, list(index.sweeps.values())), live_url="/api/runs",
                      version=version, crumbs=f"› {where}")

    @app.get("/api/runs")
    def runs_api(version: str = Query("")) -> JSONResponse:
        current, runs = runs_version()
        return _live(version, current, lambda: runs_live(runs, list(index.sweeps.values())))

    def find(key: str):  # noqa: ANN202
        run = index.run(key)
        if run is None:
            raise HTTPException(404, f"no run {key!r} under {', '.join(map(str, index.roots))}")
        return run

    @app.get("/run/{key:path}", response_class=HTMLResponse)
    def run_view(key: str) -> str:
        return run_page(find(key))

    @app.get("/api/run/{key:path}")
    def run_api(key: str, version: str = Query("")) -> JSONResponse:
        run = find(key)
        return _live(version, run.version(), lambda: run_live(run))

    @app.get("/sweep/{key:path}", response_class=HTMLResponse)
    def sweep_view(key: str) -> str:
        index.scan()
        sweep = index.sweeps.get(key)
        if sweep is None:
            raise HTTPException(404, f"no sweep {key!r}")
        for run_key in sweep.runs:
            index.run(run_key)
        return sweep_page(sweep, index.runs)

    @app.get("/file/{key:path}")
    def file(key: str, path: str = Query(..., description="file inside the run or sweep")) -> FileResponse:
        index.scan()
        folder = index.runs[key].path if key in index.runs else (
            index.sweeps[key].path if key in index.sweeps else None)
        if folder is None:
            raise HTTPException(404, f"no run or sweep {key!r}")
        try:
            target = safe_file(folder, path)
        except FileRefused as err:
            raise HTTPException(404, str(err)) from None
        return FileResponse(target, media_type=MEDIA_TYPES[target.suffix.lower()])

    return app


def create_site_app(state_dir: Path, *, budget: Budget | None = None, token: str | None = None) -> FastAPI:
    """The hospital operator's dashboard over its own state dir (ledger, audit log); never calls the coordinator.

    Routes: ``/`` (the page), ``/api/site`` (its live part), ``/static/{name}``.
    """
    state = SiteState(Path(state_dir), budget=budget)
    app = FastAPI(title="medfed site dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    install_guard(app, token=token)
    _static_routes(app)

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return site_page(state)

    @app.get("/api/site")
    def site_api(version: str = Query("")) -> JSONResponse:
        state.refresh()
        return _live(version, state.version(), lambda: site_live(state))

    return app
