"""The dashboard over HTTP (FastAPI's test client): every route, live updates, the token, traversal attempts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from client.audit import AuditLog
from client.ledger import PrivacyLedger
from dashboard.app import create_app, create_site_app
from dashboard.records import JsonlTail, RunRecords
from dashboard.security import TOKEN_COOKIE, is_loopback
from dashboard.site_state import load_budget
from federation.config import validate_config
from server.run_dir import PRIVACY_FILE, ROUNDS_FILE, SITES_FILE, RunDirectory

REPO = Path(__file__).resolve().parents[1]
SITES = ("north", "south")


def round_record(rnd: int, *, auc: float, refused: dict | None = None, failed: dict | None = None) -> dict:
    """A round's ``rounds.jsonl`` line as the ServerApp writes it (``server/recording.py``)."""
    if rnd == 0:
        return {"round": 0, "global": {"auc": auc, "accuracy": 0.5, "loss": 0.69}, "time": 1.0}
    trained = [s for s in SITES if s not in (refused or {}) and s not in (failed or {})]
    return {
        "round": rnd,
        "sites": {s: {"train": {"train-loss": 0.6, "epsilon": 2.0 * rnd}, "evaluate": {"auc": auc - 0.1 * i}}
                  for i, s in enumerate(trained)},
        "refused": refused or {}, "failed": failed or {}, "aggregated": bool(trained),
        "train": {"train-loss": 0.7 - 0.1 * rnd}, "evaluate": {"loss": 0.65}, "time": 10.0 * rnd,
        "global": {"auc": auc, "accuracy": 0.75, "loss": 0.5},
    }


def append_round(run: RunDirectory, record: dict) -> None:
    """Append a round's lines the way the ServerApp does: sites and privacy first, then the round."""
    for site, metrics in (record.get("sites") or {}).items():
        run.append(SITES_FILE, {"round": record["round"], "site": site, "phase": "train", "metrics": metrics["train"]})
        run.append(PRIVACY_FILE, {"round": record["round"], "site": site, "epsilon": metrics["train"]["epsilon"],
                                  "delta": 1e-5})
    run.append(ROUNDS_FILE, record)


def write_run(out_dir: Path, *, name: str = "demo", rounds: int = 2, planned: int = 5) -> RunDirectory:
    """A run directory written with the ServerApp's own writer: round 0 and ``rounds`` rounds."""
    config = validate_config({"name": name, "server": {"out_dir": str(out_dir), "run_name": name, "rounds": planned},
                              "privacy": {"target_epsilon": 8.0}, "strategy": {"name": "fedprox"}})
    run = RunDirectory.create(config)
    append_round(run, round_record(0, auc=0.5))
    for rnd in range(1, rounds + 1):
        refused = {"south": "lifetime-epsilon: would exceed 10"} if rnd == 2 else None
        append_round(run, round_record(rnd, auc=0.6 + 0.1 * rnd, refused=refused))
    return run


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(root)
    return root


def _client(root: Path, **kwargs) -> TestClient:
    return TestClient(create_app([root], rescan_seconds=0.0, **kwargs))


def _rounds_rows(html: str) -> list[str]:
    body = html.split('<table class="rounds">', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr><td>(\d+)</td>", body)


def test_runs_list_shows_state_rounds_and_headline(runs_dir: Path) -> None:
    page = _client(runs_dir).get("/")
    assert page.status_code == 200
    assert '<a href="/run/demo">demo</a>' in page.text
    assert "state-running" in page.text and "2/5" in page.text and "AUC 0.8000" in page.text
    assert "fedprox" in page.text and "DP-SGD ε≤8.0" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")


def test_run_states_from_what_the_run_recorded(runs_dir: Path) -> None:
    records = RunRecords(runs_dir / "demo", key="demo")
    records.refresh()
    assert records.state() == "running"
    stale = records.last_change() + 3600 + 61
    assert records.state(now=stale) == "stopped"
    (runs_dir / "demo" / "summary.json").write_text(json.dumps({"rounds_completed": 2, "rounds_aggregated": 2,
                                                                "final_global": {"auc": 0.81}}))
    assert records.state() == "finished" and records.headline() == 0.81
    (runs_dir / "demo" / "summary.json").write_text(json.dumps({"rounds_completed": 2, "rounds_aggregated": 0}))
    assert records.state() == "failed"
    (runs_dir / "demo" / "summary.json").write_text(json.dumps({"headline_metric": "dice",
                                                                "final_global": {"dice": 0.42}}))
    assert records.headline_metric() == "dice" and records.headline() == 0.42
    assert "Dice 0.4200" in _client(runs_dir).get("/").text


def test_run_page_rounds_sites_refusals_epsilon_and_settings(runs_dir: Path) -> None:
    (runs_dir / "demo" / "clinical").mkdir()
    (runs_dir / "demo" / "clinical" / "report.md").write_text("# clinical report\n")
    page = _client(runs_dir).get("/run/demo").text
    assert _rounds_rows(page) == ["2", "1", "0"]  # newest first
    assert '<td>2</td><td>0.8000</td><td>0.7500</td><td>0.5000</td><td>0.5000</td><td>north</td>' in page
    assert 'title="would exceed 10">south: <b>lifetime-epsilon</b></span>' in page
    for chart in ("metric", "loss", "epsilon"):
        assert f'data-chart="{chart}"' in page
    # lines of 2+ points: global and north AUC (south refused round 2: one point), 3 losses, north's ε
    assert page.count('<polyline class="series"') == 2 + 3 + 1
    assert "target ε" in page  # the target line on the ε chart
    assert "<td>north</td><td><span>4.000</span></td><td>8.000</td><td>50%</td>" in page
    assert "<td>south</td><td><span>2.000</span></td><td>8.000</td><td>25%</td>" in page
    assert "<td>proximal_mu</td>" in page and "<summary>privacy</summary>" in page
    assert '<a href="/file/demo?path=clinical/report.md">clinical report</a>' in page
    assert "model card" not in page  # not written (yet): not linked
    report = _client(runs_dir).get("/file/demo", params={"path": "clinical/report.md"})
    assert report.text == "# clinical report\n" and report.headers["content-type"].startswith("text/plain")


def test_live_api_sends_html_only_when_a_round_was_recorded(runs_dir: Path) -> None:
    client = _client(runs_dir)
    first = client.get("/api/run/demo").json()
    assert "<table" in first["html"]
    assert client.get("/api/run/demo", params={"version": first["version"]}).json() == {"version": first["version"]}
    run = RunDirectory(runs_dir / "demo")
    append_round(run, round_record(3, auc=0.93))
    update = client.get("/api/run/demo", params={"version": first["version"]}).json()
    assert update["version"] != first["version"] and _rounds_rows(update["html"])[0] == "3"
    assert "0.9300" in update["html"]
    runs = client.get("/api/runs").json()
    assert "3/5" in runs["html"]
    (runs_dir / "demo" / "model_card.md").write_text("# model card\n")  # written after the summary
    os.utime(runs_dir / "demo", ns=(1, 1))  # a coarse-mtime file system: the listing still changes
    links = client.get("/api/run/demo", params={"version": update["version"]}).json()
    assert '<a href="/file/demo?path=model_card.md">model card</a>' in links["html"]


def test_tail_reads_only_appended_bytes_and_waits_for_a_whole_line(tmp_path: Path) -> None:
    path = tmp_path / "rounds.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n')
    tail = JsonlTail(path)
    assert [r["round"] for r in tail.refresh()] == [0, 1]
    first = tail.rows[0]
    with path.open("a") as handle:
        handle.write('{"round": 2, "glo')  # the writer is half way through a line
    assert tail.refresh() == [] and tail.offset == len('{"round": 0}\n{"round": 1}\n')
    with path.open("a") as handle:
        handle.write('bal": {}}\nnot json\n')
    assert tail.refresh() == [{"round": 2, "global": {}}] and tail.skipped == 1
    assert tail.rows[0] is first  # earlier rows were not parsed again
    path.write_text('{"round": 0}\n')  # a resumed run rewrote the file shorter
    assert [r["round"] for r in tail.refresh()] == [0] and len(tail.rows) == 1


def test_half_written_rounds_file_never_breaks_a_page(runs_dir: Path) -> None:
    client = _client(runs_dir)
    with (runs_dir / "demo" / ROUNDS_FILE).open("a") as handle:
        handle.write('{"round": 3, "global": {"auc": 0.9')
    for url in ("/", "/run/demo", "/api/run/demo", "/api/runs"):
        assert client.get(url).status_code == 200, url
    assert _rounds_rows(client.get("/run/demo").text) == ["2", "1", "0"]
    with (runs_dir / "demo" / ROUNDS_FILE).open("a") as handle:
        handle.write("5}}\n")
    assert _rounds_rows(client.get("/run/demo").text)[0] == "3"


def test_files_outside_the_run_are_never_served(runs_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("PATIENT-SECRET")
    run = runs_dir / "demo"
    (run / "plots").mkdir()
    os.symlink(secret, run / "plots" / "leak.txt")  # a link inside the run that points out of it
    os.symlink(tmp_path, run / "up")
    client = _client(runs_dir)
    attempts = ["../../secret.txt", "../secret.txt", str(secret), "plots/leak.txt", "up/secret.txt",
                "plots/../../../secret.txt", "..\\..\\secret.txt", "checkpoints/../../../secret.txt", ""]
    for attempt in attempts:
        response = client.get("/file/demo", params={"path": attempt})
        assert response.status_code == 404, attempt
        assert "PATIENT-SECRET" not in response.text
    for raw in ("/file/demo?path=%2e%2e%2f%2e%2e%2fsecret.txt", "/file/demo?path=..%2F..%2Fsecret.txt",
                "/file/demo?path=%252e%252e%252fsecret.txt", "/file/..%2F..%2Fsecret.txt?path=x",
                "/file/%2e%2e/%2e%2e/secret.txt?path=secret.txt", "/run/..%2F..%2F", "/static/..%2Fapp.py",
                "/sweep/..%2F..%2F"):
        response = client.get(raw)
        assert response.status_code == 404, raw
        assert "PATIENT-SECRET" not in response.text
    (run / "checkpoints" / "round-0001.pt").write_bytes(b"weights")
    assert client.get("/file/demo", params={"path": "checkpoints/round-0001.pt"}).status_code == 404
    assert client.get("/file/demo", params={"path": "config.yaml"}).status_code == 200


def test_token_is_checked_on_every_request(runs_dir: Path) -> None:
    client = _client(runs_dir, token="s3cret-token")
    for url in ("/", "/api/runs", "/run/demo", "/api/run/demo", "/file/demo?path=config.yaml",
                "/static/dashboard.js", "/nope"):
        response = client.get(url)
        assert response.status_code == 401, url
        assert "token" in response.text and response.headers["x-frame-options"] == "DENY"
    assert client.get("/", headers={"X-Medfed-Token": "wrong"}).status_code == 401
    assert client.get("/", headers={"X-Medfed-Token": "s3cret-token"}).status_code == 200
    assert client.get("/run/demo", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    entry = client.get("/run/demo?token=s3cret-token&x=1", follow_redirects=False)
    assert entry.status_code == 303 and entry.headers["location"] == "/run/demo?x=1"
    cookie = entry.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.cookies.get(TOKEN_COOKIE) == "s3cret-token"
    assert client.get("/api/run/demo").status_code == 200  # the cookie now carries it
    assert client.post("/", headers={"X-Medfed-Token": "s3cret-token"}).status_code == 405


def test_static_files_and_unknown_routes(runs_dir: Path) -> None:
    client = _client(runs_dir)
    script = client.get("/static/dashboard.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert script.text == (REPO / "dashboard" / "static" / "dashboard.js").read_text()
    assert client.get("/static/dashboard.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/other.js").status_code == 404
    assert client.get("/run/missing").status_code == 404
    assert client.get("/api/run/missing").status_code == 404
    assert client.get("/sweep/missing").status_code == 404
    assert client.get("/file/missing?path=config.yaml").status_code == 404
    assert client.put("/run/demo").status_code == 405


def test_sweep_page_comparison_plot_and_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweeps" / "budget"
    write_run(sweep / "runs", name="fedavg-eps8-seed0", rounds=1, planned=1)
    (sweep / "comparison.csv").write_text("scenario,strategy,epsilon,seeds,global_auc_mean,global_auc_std\n"
                                          "clean,fedavg,8,1,0.81234,0.0\n")
    (sweep / "plots").mkdir()
    (sweep / "plots" / "privacy_utility.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    client = _client(tmp_path / "sweeps")
    home = client.get("/").text
    assert '<a href="/sweep/budget">budget</a> (1 runs)' in home
    assert '<a href="/run/budget/runs/fedavg-eps8-seed0">' in home
    page = client.get("/sweep/budget").text
    assert "<th>global_auc_mean</th>" in page
    assert "<td>clean</td><td>fedavg</td><td>8</td><td>1</td><td>0.812</td>" in page
    assert 'src="/file/budget?path=plots/privacy_utility.png"' in page
    plot = client.get("/file/budget", params={"path": "plots/privacy_utility.png"})
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert client.get("/run/budget/runs/fedavg-eps8-seed0").status_code == 200


def _site_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    ledger = PrivacyLedger.open(state / "north")
    ledger.commit("run-a", epsilon=2.5, delta=1e-5, server_round=3)
    ledger.commit("run-b", epsilon=0.5, delta=1e-5, server_round=1)
    audit = AuditLog(state / "north")
    audit.append({"site": "north", "run_name": "run-a", "event": "train", "round": 1, "epsilon_after": 2.5,
                  "lifetime_epsilon_after": 2.5, "requested": {"run_config": {"data.data_dir": "/secret"}}})
    audit.append({"site": "north", "run_name": "run-b", "event": "train", "round": 1, "refused":
                  "noise-too-low: noise multiplier 0.1 is below the policy's 0.8"})
    audit.append({"site": "north", "run_name": "run-b", "event": "error", "round": 2, "error": "ValueError: bad"})
    return state


def test_site_dashboard_budget_runs_refusals_and_errors(tmp_path: Path) -> None:
    state = _site_state(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text("lifetime_epsilon: 10.0\nlifetime_delta: 1.0e-4\n")
    client = TestClient(create_site_app(state, budget=load_budget(policy)))
    page = client.get("/").text
    assert "Site north" in page and "Lifetime ε <b>3.0000</b> of 10.0000 (30% of the policy" in page
    assert "δ 2e-05 of 0.0001" in page and 'data-chart="lifetime-north"' in page and "policy budget" in page
    assert "<td>run-a</td><td>2.5000</td><td>–</td><td>1e-05</td><td>yes</td><td>1</td><td>1</td><td>0</td>" in page
    assert "<b>noise-too-low</b>" in page and "<b>ValueError</b>: bad" in page
    assert "/secret" not in page  # the requested config stays in the audit log
    assert "nothing is asked of the coordinator" in page
    version = client.get("/api/site").json()["version"]
    AuditLog(state / "north").append({"site": "north", "run_name": "run-c", "event": "train", "round": 1,
                                      "refused": "max-rounds: 50"})
    with (state / "north" / "audit.jsonl").open("a") as handle:
        handle.write('{"site": "north", "run_na')  # torn last line
    update = client.get("/api/site", params={"version": version}).json()
    assert "<b>max-rounds</b>" in update["html"] and "3 refusal(s)/error(s)" in update["html"]
    assert client.get("/static/dashboard.js").status_code == 200
    no_policy = TestClient(create_site_app(state / "north")).get("/").text
    assert "no policy given" in no_policy and "Lifetime ε <b>3.0000</b>" in no_policy


def test_site_dashboard_token(tmp_path: Path) -> None:
    client = TestClient(create_site_app(_site_state(tmp_path), token="t0k"))
    assert client.get("/").status_code == 401 and client.get("/api/site").status_code == 401
    assert client.get("/", headers={"X-Medfed-Token": "t0k"}).status_code == 200


def test_cli_binds_locally_without_token_and_elsewhere_with_one(runs_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import dashboard.cli
    from simulations.cli import app

    served = []
    monkeypatch.setattr(dashboard.cli, "_serve", lambda app, **kw: served.append(kw))
    runner = CliRunner()
    assert runner.invoke(app, ["dashboard", str(runs_dir)]).exit_code == 0
    assert served[-1] == {"host": "127.0.0.1", "port": 8050, "token": None}
    result = runner.invoke(app, ["dashboard", str(runs_dir), "--host", "0.0.0.0", "--port", "9000"])
    assert result.exit_code == 0 and served[-1]["token"] and served[-1]["token"] in result.output
    assert "every request must carry this access token" in result.output
    missing = runner.invoke(app, ["dashboard", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such folder" in missing.output
    state = _site_state(tmp_path)
    assert runner.invoke(app, ["site", "dashboard", str(state)]).exit_code == 0 and served[-1]["port"] == 8051
    (tmp_path / "bad.yaml").write_text("lifetime_epsilon: -1\n")
    bad = runner.invoke(app, ["site", "dashboard", str(state), "--policy", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 2 and "lifetime_epsilon" in bad.output
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_the_cli_loads_without_fastapi_or_uvicorn() -> None:
    probe = "import simulations.cli, sys; print([m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_several_roots_are_told_apart_by_their_names(tmp_path: Path) -> None:
    write_run(tmp_path / "coordinator-a", rounds=1)
    write_run(tmp_path / "coordinator-b", rounds=2)
    client = TestClient(create_app([tmp_path / "coordinator-a", tmp_path / "coordinator-b"]))
    home = client.get("/").text
    assert '<a href="/run/coordinator-a/demo">' in home and '<a href="/run/coordinator-b/demo">' in home
    assert _rounds_rows(client.get("/run/coordinator-b/demo").text) == ["2", "1", "0"]
