"""The status page at `/`, rendered by headless Chromium (Debian's `chromium`).

`.ci/run` installs Chromium; run by hand, this test installs it too when it can
(root with apt-get) and is skipped, loudly, only when it truly cannot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import read_records, wait_until
from .httphelp import api_config, api_url, call

pytestmark = pytest.mark.slow

SHOTS = Path(os.environ.get("DISPATCHER_SCREENSHOTS", "var/screenshots"))
HOSTILE = "/nonexistent/<b>bold</b>&amp;"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _install_chromium() -> str | None:
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium"],
        ):
            subprocess.run(command, env=env, capture_output=True, timeout=900, check=False)
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium() -> str:
    found = shutil.which("chromium") or _install_chromium()
    if found is None:
        pytest.skip("SKIPPED LOUDLY: Debian's chromium is not installed and could not be installed")
    return found


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
    return subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(1200)  # the first run may install Chromium
def test_status_page_shows_gates_running_dispatch_and_failures(
    tmp_path: Path, make_daemon: Any, chromium: str
) -> None:
    daemon = make_daemon(api_config(tmp_path, global_=3, runner_cap=2))
    daemon.start()
    url = api_url(daemon)
    call("POST", f"{url}/v1/dispatches", {"task": "fails", "params": {"prog": HOSTILE}})
    wait_until(lambda: daemon.cli_json("show", "1")["status"] == "failed")
    call("POST", f"{url}/v1/dispatches", {"task": "one", "params": {"n": "long", "secs": "60"}})
    starts = lambda: [r for r in read_records(tmp_path / "steps.log") if r.kind == "start"]  # noqa: E731
    wait_until(lambda: len(starts()) == 1)

    dom = run_chromium(chromium, tmp_path, "--dump-dom", f"{url}/")
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / "status-page.png"
    shot.unlink(missing_ok=True)
    run_chromium(
        chromium, tmp_path, f"--screenshot={shot.resolve()}", "--window-size=1200,900", f"{url}/"
    )
    assert daemon.stop() == 0

    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert 'data-gate="global" data-held="1" data-capacity="3"' in page
    assert 'data-gate="runner:py" data-held="1" data-capacity="2"' in page
    running = page.split('class="running" data-id="2"', 1)[1].split("</tr>", 1)[0]
    assert ">one<" in running
    assert ">nap<" in running  # the current step
    failure = page.split('class="failure" data-id="1"', 1)[1].split("</tr>", 1)[0]
    assert "&lt;b&gt;bold&lt;/b&gt;&amp;amp;" in failure  # shown as text, escaped
    assert "<b>bold</b>" not in page
    assert shot.exists()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank image
