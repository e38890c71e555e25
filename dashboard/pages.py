"""The coordinator's HTML pages: runs list, run page, sweep page (plain string templates, every value escaped).

Each page has one ``<main id="live">`` whose ``data-live-url`` the shipped script
polls; the part that changes (:func:`run_live`, :func:`runs_live`) is rendered by the
same function for the first page and for every update.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dashboard.records import RunRecords, Sweep, number
from dashboard.svg import GLOBAL_COLOUR, Series, line_chart, site_colour

#: Files of a run linked from its page when present (run-relative paths).
RUN_LINKS = (
    ("clinical report", "clinical/report.md"), ("model card", "model_card.md"), ("research report", "report.md"),
    ("summary", "summary.json"), ("config", "config.yaml"),
)
#: Config sections listed on a run page, first the ones a reader looks for.
SETTINGS = ("strategy", "privacy", "central_dp", "data", "model", "train", "server")
METRIC_NAMES = {"auc": "AUC", "dice": "Dice", "accuracy": "accuracy"}


def h(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number rounded for a table cell; ``–`` when missing."""
    num = number(value)
    return "–" if num is None else f"{num:.{digits}f}"


def file_url(key: str, rel: str) -> str:
    """URL of a file inside run or sweep ``key``."""
    return f"/file/{quote(key)}?path={quote(rel)}"


def layout(*, title: str, body: str, live_url: str | None = None, version: str = "", crumbs: str = "") -> str:
    """A whole page: header, the live ``<main>`` and the shipped CSS and script."""
    live = f' data-live-url="{h(live_url)}" data-version="{h(version)}"' if live_url else ""
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{h(title)} · medfed</title><meta name=\"viewport\" content=\"width=device-width\">"
        "<link rel=\"icon\" href=\"data:,\"><link rel=\"stylesheet\" href=\"/static/dashboard.css\">"
        "<script src=\"/static/dashboard.js\" defer></script></head><body>"
        f"<header><a href=\"/\">medfed</a> {crumbs}<span id=\"live-status\"></span></header>"
        f"<h1>{h(title)}</h1><main id=\"live\"{live}>{body}</main></body></html>"
    )


def table(head: Sequence[str], rows: Iterable[Sequence[str]], *, css: str = "") -> str:
    """A table from already-escaped cells."""
    cls = f' class="{h(css)}"' if css else ""
    out = [f"<table{cls}><thead><tr>", *(f"<th>{h(c)}</th>" for c in head), "</tr></thead><tbody>"]
    out.extend("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return "".join(out) + "</tbody></table>"


def state_badge(state: str) -> str:
    """The run state as a coloured label."""
    return f'<span class="state state-{h(state)}">{h(state)}</span>'


# ----------------------------------------------------------------------------- runs list
def runs_live(runs: Sequence[RunRecords], sweeps: Sequence[Sweep]) -> str:
    """The runs table and the sweeps list."""
    rows = []
    for run in runs:
        metric = run.headline_metric()
        done = sum(1 for r in run.rounds.rows if int(r.get("round", 0)) > 0)
        planned = run.setting("server.rounds", "?")
        rows.append([f'<a href="/run/{quote(run.key)}">{h(run.key)}</a>', state_badge(run.state()),
                     f"{done}/{h(planned)}", f"{h(METRIC_NAMES.get(metric, metric))} {fmt(run.headline())}",
                     h(run.setting("strategy.name", "?")), _dp_text(run)])
    body = table(["run", "state", "rounds", "headline", "strategy", "privacy"], rows, css="runs") if rows else (
        "<p>No runs yet. Start one with <code>medfed simulate</code>; it appears here.</p>")
    if sweeps:
        body += "<h2>Sweeps</h2><ul>" + "".join(
            f'<li><a href="/sweep/{quote(s.key)}">{h(s.key)}</a> ({len(s.runs)} runs)</li>' for s in sweeps) + "</ul>"
    return body


def _dp_text(run: RunRecords) -> str:
    if not run.setting("privacy.enabled", False):
        return "no DP"
    return f"DP-SGD ε≤{h(run.setting('privacy.target_epsilon'))}, δ={h(run.setting('privacy.target_delta'))}"


# ----------------------------------------------------------------------------- run page
def run_live(run: RunRecords) -> str:
    """Everything on a run page that changes while it runs."""
    metric = run.headline_metric()
    name = METRIC_NAMES.get(metric, metric)
    parts = [_links(run), f"<p>{state_badge(run.state())} {_progress(run)}</p>", _failure(run)]
    parts.append('<div class="charts">' + _metric_chart(run, metric, name) + _loss_chart(run)
                 + _epsilon_chart(run) + "</div>")
    parts.append("<h2>Privacy: ε per site</h2>" + _epsilon_table(run))
    parts.append("<h2>Rounds</h2>" + _rounds_table(run, metric, name))
    return "".join(parts)


def _progress(run: RunRecords) -> str:
    done = sum(1 for r in run.rounds.rows if int(r.get("round", 0)) > 0)
    text = f"{done} of {h(run.setting('server.rounds', '?'))} rounds recorded"
    pending = run.round_in_progress()
    if pending:
        phases = "; ".join(f"{h(p)}: {h(', '.join(sorted(s)))}" for p, s in sorted(pending["phases"].items()))
        text += f' · <span class="pending">round {pending["round"]} in progress ({phases})</span>'
    return text


def _failure(run: RunRecords) -> str:
    if run.state() != "failed":
        return ""
    for record in run.rounds.rows:
        problems = {**(record.get("failed") or {}), **(record.get("refused") or {})}
        if problems:
            site, why = sorted(problems.items())[0]
            return f'<p class="error">No round aggregated; first failure: {h(site)}: {h(why)}</p>'
    return '<p class="error">No round aggregated.</p>'


def _metric_chart(run: RunRecords, metric: str, name: str) -> str:
    rows = run.rounds.rows
    series = [Series("global", [(r.get("round", 0), number((r.get("global") or {}).get(metric))) for r in rows],
                     colour=GLOBAL_COLOUR)]
    for i, site in enumerate(_site_names(run)):
        series.append(Series(site, [(r.get("round", 0), number(((r.get("sites") or {}).get(site) or {})
                                                                  .get("evaluate", {}).get(metric))) for r in rows],
                             dashed=True, colour=site_colour(i)))
    return line_chart(chart_id="metric", title=f"{name}: global and per site", series=series, y_range=(0.0, 1.0))


def _loss_chart(run: RunRecords) -> str:
    rows = run.rounds.rows
    series = [Series("global loss", [(r.get("round", 0), number((r.get("global") or {}).get("loss"))) for r in rows]),
              Series("site eval loss", [(r.get("round", 0), number((r.get("evaluate") or {}).get("loss")))
                                        for r in rows]),
              Series("train loss", [(r.get("round", 0), number((r.get("train") or {}).get("train-loss")))
                                    for r in rows], dashed=True)]
    return line_chart(chart_id="loss", title="loss", series=series)


def _epsilon_chart(run: RunRecords) -> str:
    by_site: dict[str, list[tuple[float, float | None]]] = {}
    for row in run.privacy.rows:
        by_site.setdefault(str(row.get("site", "?")), []).append((row.get("round", 0), number(row.get("epsilon"))))
    target = number(run.setting("privacy.target_epsilon")) if run.setting("privacy.enabled", False) else None
    top = max([target or 0.0, *(y for pts in by_site.values() for _, y in pts if y is not None)])
    return line_chart(chart_id="epsilon", y_range=(0.0, top * 1.05) if top > 0 else None, title="ε spent per site",
                      series=[Series(s, by_site[s], colour=site_colour(i))
                              for i, s in enumerate(_site_names(run)) if s in by_site],
                      target=("target ε", target) if target is not None else None)


def _epsilon_table(run: RunRecords) -> str:
    spent = run.epsilon()
    if not spent:
        return "<p>No ε recorded (no DP, or no round trained yet).</p>"
    target = number(run.setting("privacy.target_epsilon")) if run.setting("privacy.enabled", False) else None
    rows = []
    for site, eps in sorted(spent.items()):
        share = f"{100 * eps / target:.0f}%" if target else "–"
        over = ' class="error"' if target and eps > target * (1 + 1e-6) else ""
        rows.append([h(site), f"<span{over}>{fmt(eps, 3)}</span>", fmt(target, 3), share])
    return table(["site", "ε spent", "ε target", "of target"], rows, css="epsilon")


def _site_names(run: RunRecords) -> list[str]:
    """Every site that replied so far (sorted: a site keeps its colour on every chart)."""
    return sorted({str(s) for r in run.rounds.rows for s in (r.get("sites") or {})}
                  | {str(r.get("site")) for r in run.privacy.rows})


def _reasons(found: Any) -> str:
    """``site: code`` per refusal/failure; the code (before ``:``) in bold, the detail as a tooltip."""
    items = []
    for site, reason in sorted((found or {}).items()):
        code, _, detail = str(reason).partition(":")
        items.append(f'<span class="reason" title="{h(detail.strip())}">{h(site)}: <b>{h(code)}</b></span>')
    return " ".join(items)


def _rounds_table(run: RunRecords, metric: str, name: str) -> str:
    rows = []
    for r in reversed(run.rounds.rows):
        g = r.get("global") or {}
        trained = sorted(s for s, m in (r.get("sites") or {}).items() if "train" in (m or {}))
        aggregated = "" if int(r.get("round", 0)) == 0 else ("yes" if r.get("aggregated") else "<b>no</b>")
        rows.append([h(r.get("round", "?")), fmt(g.get(metric)), fmt(g.get("accuracy")), fmt(g.get("loss")),
                     fmt((r.get("train") or {}).get("train-loss")), h(", ".join(trained)),
                     _reasons(r.get("refused")), _reasons(r.get("failed")), aggregated, fmt(r.get("time"), 1)])
    head = ["round", f"global {name}", "accuracy", "loss", "train loss", "trained", "refused", "failed",
            "aggregated", "time (s)"]
    return table(head, rows, css="rounds")


def _links(run: RunRecords) -> str:
    """Links to the run's reports and plots that exist so far (most are written when it ends)."""
    links = [f'<a href="{file_url(run.key, rel)}">{h(label)}</a>' for label, rel in RUN_LINKS
             if (run.path / rel).is_file()]
    for folder in ("plots", "clinical"):
        links += [f'<a href="{file_url(run.key, f"{folder}/{p.name}")}">{h(folder)}/{h(p.name)}</a>'
                  for p in sorted((run.path / folder).glob("*.png"))]
    return '<p class="links">' + " · ".join(links) + "</p>" if links else ""


def run_page(run: RunRecords) -> str:
    """The whole run page: settings and links (static), then :func:`run_live`."""
    settings = run.config()
    head = f"<p>{h(run.setting('data.dataset', '?'))} · {h(run.setting('data.num_sites', '?'))} sites · " \
           f"{h(run.setting('model.name', '?'))} · {h(run.setting('strategy.name', '?'))} · {_dp_text(run)}</p>"
    details = "".join(
        f"<details><summary>{h(section)}</summary>"
        + table(["key", "value"], ([h(k), h(v)] for k, v in (settings.get(section) or {}).items())) + "</details>"
        for section in SETTINGS if isinstance(settings.get(section), dict))
    body = (head + f'<div id="live-part">{run_live(run)}</div>'
            + f'<section class="settings"><h2>Strategy and DP settings</h2>{details}</section>')
    return layout(title=run.key, body=body, live_url=f"/api/run/{quote(run.key)}", version=run.version(),
                  crumbs="› run")


# ----------------------------------------------------------------------------- sweep page
def read_comparison(path: Path) -> tuple[list[str], list[list[str]]]:
    """``comparison.csv``: header and rows (empty when missing)."""
    if not path.is_file():
        return [], []
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    return (rows[0], rows[1:]) if rows else ([], [])


def sweep_page(sweep: Sweep, runs: dict[str, RunRecords]) -> str:
    """Comparison table, privacy-utility plot and the sweep's runs."""
    head, rows = read_comparison(sweep.path / "comparison.csv")
    body = ""
    if (sweep.path / "report.md").is_file():
        body += f'<p class="links"><a href="{file_url(sweep.key, "report.md")}">sweep report</a></p>'
    body += "<h2>Comparison (mean ± std over seeds)</h2>" + table(
        head, ([fmt(_float(c), 3) if _float(c) is not None and "." in c else h(c) for c in row] for row in rows),
        css="comparison")
    plot = sweep.path / "plots" / "privacy_utility.png"
    if plot.is_file():
        body += (f'<h2>Privacy–utility</h2><img class="plot" alt="privacy-utility plot" '
                 f'src="{file_url(sweep.key, "plots/privacy_utility.png")}">')
    members = [runs[k] for k in sweep.runs if k in runs]
    if members:
        body += "<h2>Runs</h2>" + runs_live(members, [])
    return layout(title=f"sweep {sweep.key}", body=body, crumbs="› sweep")


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
