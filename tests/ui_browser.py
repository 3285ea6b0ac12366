"""A real ``mlflow server`` and a real browser on it: for the tests, and for docs/mlflow.md's pictures.

The server serves a tracking database on 127.0.0.1. The browser is Debian's Chromium driven by
Playwright (``.ci/run`` installs both). It reaches the server as ``kd.localhost``, which Chromium
resolves to 127.0.0.1: on a page served from ``localhost``/``127.0.0.1`` the UI opens its MLflow
Assistant panel over a third of the window on first load, and a screenshot should show the charts.

``python tests/ui_browser.py mlflow.db .ci/readme`` takes docs/mlflow.md's pictures of the newest
training runs in a database (the default run's, in this repository's ``mlflow.db``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HOST = "kd.localhost"
# Chromium on a machine with no network: no calls home, no GPU, root without a sandbox.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1500, "height": 900}


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    if chromium() is None:
        return "needs Debian's chromium (.ci/run installs it)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "needs playwright (pip install -e '.[dev]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(db: Path, workdir: Path, timeout_s: float = 90) -> Iterator[str]:
    """``mlflow server`` on ``db``; yields the address the REST API answers on (127.0.0.1).

    The UI is allowed on ``http://kd.localhost:<port>`` too (see the module docstring)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log_path = workdir / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{Path(db).resolve()}",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--allowed-hosts", f"127.0.0.1:{port},{HOST}:{port}",
        "--cors-allowed-origins", f"http://{HOST}:{port}",
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        # Its own session: the server starts worker processes, and they all go down together.
        # cwd: the server's default artifact folder lands there.
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=10).close()
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"mlflow server did not answer:\n{log_path.read_text()}"
                        ) from None
                    time.sleep(0.5)
            yield base
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def ui_base(api_base: str) -> str:
    """The UI's address for the browser: the server's port, on ``kd.localhost``."""
    return api_base.replace("127.0.0.1", HOST)


@contextlib.contextmanager
def page() -> Iterator[object]:
    """A Playwright page in headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


def chart_legend(pg, url: str, expect: list[str], timeout_ms: float = 60_000) -> list[str]:
    """Open a metric page; wait until its chart's legend shows every entry of ``expect``; return
    the legend's entries (one per drawn curve: ``<run name> (<metric>)``)."""
    pg.goto(url)
    for text in expect:
        pg.get_by_text(text, exact=True).wait_for(timeout=timeout_ms)
    # The legend sits under the plot in the chart's card: spans next to a line swatch.
    legend = pg.locator("div:has(> svg > path) > span")
    return [t.strip() for t in legend.all_text_contents()]


def curves_drawn(pg) -> float:
    """How many curves the page's plotly chart drew: it draws each run's line twice (the raw
    points, and the smoothed line over them), so half its line traces."""
    return pg.locator("g.scatterlayer g.trace path.js-line").count() / 2


def expand_parents(pg, url: str, parents: list[str], timeout_ms: float = 60_000) -> None:
    """Open a runs page and expand the parent run rows named ``parents``."""
    pg.goto(url)
    for name in parents:
        cell = pg.locator('[role="gridcell"]', has=pg.get_by_text(name, exact=True))
        cell.wait_for(timeout=timeout_ms)
        # The run-name cell's only button is the expander of a parent run.
        cell.locator('button[data-component-id*="runnamecellrenderer"]').click()
    pg.wait_for_timeout(1000)


def readme_pictures(db: Path, out: Path) -> list[Path]:
    """docs/mlflow.md's pictures of the newest training runs in ``db``: the arms' ``loss/logit`` and
    per-layer gradient norms, each overlaid on the UI's metric page."""
    import mlflow

    from kd.core import tracking
    from kd.report import mlflow_ui

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(db).resolve()}")
    exp_id = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    arms = mlflow_ui.newest_train_runs(client, exp_id)
    ids = [arms[a].info.run_id for a in sorted(arms)]
    names = [arms[a].info.run_name for a in sorted(arms)]
    written = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        base = ui_base(stack.enter_context(server(db, tmp)))
        pg = stack.enter_context(page())
        for keys, name in (
            (["loss/logit"], "mlflow-loss-logit.png"),
            (mlflow_ui.grad_norm_keys(client, ids[0]), "mlflow-grad-norms.png"),
        ):
            url = mlflow_ui.metric_url(base, exp_id, ids, keys)
            chart_legend(pg, url, [f"{n} ({keys[0]})" for n in names])
            pg.wait_for_timeout(1000)
            written.append(out / name)
            pg.screenshot(path=written[-1], clip={"x": 0, "y": 0, "width": 1500, "height": 480})
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for path in readme_pictures(Path(sys.argv[1]), Path(sys.argv[2])):
        print(path)
