"""medfed's live dashboard: read-only web pages over run directories and a site's state.

* :mod:`dashboard.records` follows a run directory as it is written (only appended
  bytes are read; a half-written last line waits for the next look);
* :mod:`dashboard.site_state` reads a hospital's ledger and audit log;
* :mod:`dashboard.svg` draws the charts server-side; :mod:`dashboard.pages` the HTML;
* :mod:`dashboard.app` holds the FastAPI apps, :mod:`dashboard.security` the token and
  the path checks, :mod:`dashboard.cli` the ``medfed dashboard`` and
  ``medfed site dashboard`` commands (FastAPI and uvicorn load only when they run).

The dashboard imports downward only (``federation``, ``server.run_dir``, the site's
ledger and audit readers); nothing in ``client/`` or ``server/`` imports it.
"""
