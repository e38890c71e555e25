"""The hospital operator's page: ε per run and over the site's lifetime against the policy, refusals and errors."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from dashboard.pages import fmt, h, layout, table
from dashboard.site_state import Budget, SiteFolder, SiteState
from dashboard.svg import Series, line_chart

#: Refusals and errors listed one by one (newest first).
MAX_INCIDENTS = 50


def _when(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.timezone.utc).strftime("%Y-%m-%d %H:%M") if unix else "–"


def _budget_line(site: SiteFolder, budget: Budget | None) -> str:
    ledger = site.ledger
    if ledger is None:
        problem = site.ledger_error or "no ledger.json yet (the site has not trained)"
        return f'<p class="error">{h(problem)}</p>' if site.ledger_error else f"<p>{h(problem)}</p>"
    eps, delta = ledger.spent_epsilon(), ledger.spent_delta()
    if budget is None:
        return (f"<p>Lifetime ε <b>{fmt(eps)}</b>, δ {delta:g} over {len(ledger.runs)} run(s); "
                "no policy given (<code>--policy</code>), so no budget to compare with.</p>")
    share = 100 * eps / budget.epsilon
    cls = "error" if eps > budget.epsilon * (1 + 1e-6) else ("warn" if share >= 80 else "ok")
    return (f'<p class="budget {cls}">Lifetime ε <b>{fmt(eps)}</b> of {fmt(budget.epsilon)} '
            f"({share:.0f}% of the policy's budget), δ {delta:g} of {budget.delta:g}, over "
            f"{len(ledger.runs)} run(s). Policy: {h(budget.source)}</p>")


def _runs_table(site: SiteFolder, audits: Sequence) -> str:
    by_run = {a.run_name: a for a in audits}
    names = sorted(set(site.ledger.runs if site.ledger else ()) | set(by_run))
    rows = []
    for name in names:
        entry = site.ledger.runs.get(name) if site.ledger else None
        audit = by_run.get(name)
        rows.append([
            h(name), fmt(entry.epsilon if entry else (audit.epsilon if audit else None)),
            fmt(entry.reserved) if entry and entry.reserved else "–",
            f"{entry.delta:g}" if entry else "–", ("yes" if entry.dp else "no") if entry else "–",
            h(entry.rounds) if entry else "–", h(audit.rounds_trained if audit else 0),
            h(audit.rounds_evaluated if audit else 0), h(audit.refusals if audit else 0),
            h(audit.errors if audit else 0),
            h(_when(entry.updated)) if entry else h((audit.last if audit else "")[:16]),
        ])
    head = ["run", "ε spent", "ε reserved", "δ", "DP", "rounds (ledger)", "trained", "evaluated", "refused",
            "errors", "last"]
    return table(head, rows, css="site-runs") if rows else "<p>No runs recorded yet.</p>"


def _incidents(incidents: Sequence[dict]) -> str:
    if not incidents:
        return "<p>No refusals or errors.</p>"
    shown = list(reversed(incidents))[:MAX_INCIDENTS]
    rows = []
    for i in shown:
        code, _, detail = str(i.get("reason", "")).partition(":")
        rows.append([h(str(i.get("time", ""))[:19]), h(i.get("run_name")), h(i.get("round")), h(i.get("event")),
                     h(i.get("kind")), f"<b>{h(code)}</b>{':' + h(detail) if detail else ''}"])
    more = f" (newest {len(shown)} of {len(incidents)})" if len(shown) < len(incidents) else ""
    return f"<p>{len(incidents)} refusal(s)/error(s){more}</p>" + table(
        ["time", "run", "round", "event", "kind", "reason"], rows, css="incidents")


def site_section(site: SiteFolder, budget: Budget | None) -> str:
    """One site: budget, lifetime ε chart, runs, refusals and errors."""
    audits, incidents = site.audit_summary()
    curve = site.lifetime_curve()
    top = max([budget.epsilon if budget else 0.0, *(y for _, y in curve)])
    chart = line_chart(chart_id=f"lifetime-{site.name}", title=f"{site.name}: lifetime ε after each request",
                       series=[Series("lifetime ε", curve)], x_label="request (audit log line)",
                       y_range=(0.0, top * 1.05) if top > 0 else None,
                       target=("policy budget", budget.epsilon) if budget else None)
    return (f'<section class="site" id="site-{h(site.name)}"><h2>Site {h(site.name)}</h2>'
            f"{_budget_line(site, budget)}<div class=\"charts\">{chart}</div><h3>Runs</h3>{_runs_table(site, audits)}"
            f"<h3>Refusals and errors</h3>{_incidents(incidents)}</section>")


def site_live(state: SiteState) -> str:
    """Everything on the site page (all of it may change)."""
    sites = state.refresh()
    note = "<p class=\"note\">Read from this machine's site state only; nothing is asked of the coordinator.</p>"
    if not sites:
        return note + (f"<p>No site state in {h(state.state_dir)} yet: it appears when the SuperNode handles its "
                       "first request (ledger.json, audit.jsonl).</p>")
    return note + "".join(site_section(site, state.budget) for site in sites)


def site_page(state: SiteState) -> str:
    """The whole site page."""
    body = site_live(state)
    return layout(title=f"site state {state.state_dir}", body=body, live_url="/api/site", version=state.version(),
                  crumbs="› site")
