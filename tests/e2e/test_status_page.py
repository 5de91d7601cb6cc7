"""The status page at `/`, rendered by headless Chromium (Debian's `chromium`).

`.ci/run` installs Chromium; run by hand, this test installs it too when it can
(root with apt-get) and is skipped, loudly, only when it truly cannot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import read_records, wait_until
from .httphelp import api_config, api_url, call

pytestmark = pytest.mark.slow

HOLD = Path(__file__).with_name("hold.py")
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
    daemon.wait_status(1, "failed")
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
    assert ">1/1 nap<" in running  # the current step (of how many)
    failure = page.split('class="failure" data-id="1"', 1)[1].split("</tr>", 1)[0]
    assert "&lt;b&gt;bold&lt;/b&gt;&amp;amp;" in failure  # shown as text, escaped
    assert "<b>bold</b>" not in page
    assert shot.exists()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank image


def waiting_config(tmp_path: Path) -> str:
    hold = f'"{sys.executable}", "{HOLD}", "{tmp_path}/release-{{name}}"'
    fail = f'"{sys.executable}", "-c", "import sys; sys.exit(\'no space left on <dev>\')"'
    return f"""
[database]
path = "state/dispatcher.db"

[daemon]
poll_interval = "100ms"
shutdown_grace = "0s"

[gate]
global = 2

[runners.py]
type = "exec"
concurrency = 1

[runners.noop]
type = "noop"

[tasks.quick]
steps = [{{ name = "q", runner = "noop", args = ["{{n}}"] }}]

[tasks.held]
steps = [{{ name = "hold", runner = "py", args = [{hold}] }}]

[tasks.fails]
steps = [{{ name = "boom", runner = "py", args = [{fail}] }}]

[api]
listen = "127.0.0.1:0"
"""


def section(page: str, name: str) -> str:
    return page.split(f'<section id="{name}">', 1)[1].split("</section>", 1)[0]


def row(page: str, kind: str, dispatch_id: int) -> str:
    return page.split(f'class="{kind}" data-id="{dispatch_id}"', 1)[1].split("</tr>", 1)[0]


def attributes(page: str, kind: str, name: str) -> list[str]:
    return re.findall(rf'<g class="{kind}"[^>]* data-{name}="([^"]*)"', page)


@pytest.mark.timeout(1200)  # the first run may install Chromium
def test_status_page_shows_waiting_queued_failure_output_and_the_last_hour(
    tmp_path: Path, make_daemon: Any, chromium: str
) -> None:
    daemon = make_daemon(waiting_config(tmp_path))
    daemon.start()
    url = api_url(daemon)
    for n in range(5):
        call("POST", f"{url}/v1/dispatches", {"task": "quick", "params": {"n": str(n)}})
    call("POST", f"{url}/v1/dispatches", {"task": "fails", "params": {}})
    wait_until(lambda: call("GET", f"{url}/v1/dispatches/6").json()["status"] == "failed")
    for name in ("a", "b", "c"):  # 7 runs, 8 waits for runner:py, 9 stays queued (global 2)
        call("POST", f"{url}/v1/dispatches", {"task": "held", "params": {"name": name}})
    wait_until(lambda: call("GET", f"{url}/v1/dispatches/8").json()["waiting_for"] == "runner:py")

    page = run_chromium(chromium, tmp_path, "--dump-dom", f"{url}/").stdout
    failure_page = run_chromium(chromium, tmp_path, "--dump-dom", f"{url}/dispatches/6").stdout
    SHOTS.mkdir(parents=True, exist_ok=True)
    for path, name in (("/", "status-page-waiting.png"), ("/dispatches/6", "dispatch-page.png")):
        shot = SHOTS / name
        shot.unlink(missing_ok=True)
        run_chromium(
            chromium,
            tmp_path,
            f"--screenshot={shot.resolve()}",
            "--window-size=1200,1400",
            f"{url}{path}",
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("a", "b", "c"):
        (tmp_path / f"release-{name}").touch()
    assert daemon.stop() == 0

    # in flight: never more than the gate; the one without a runner place says so
    assert 'data-gate="global" data-held="2" data-capacity="2"' in page
    assert 'data-gate="runner:py" data-held="1" data-capacity="1"' in page
    assert 'data-status="in flight">in flight: <b class="num">2</b>' in page
    assert "#1" in row(page, "running", 7) and 'class="waiting"' not in row(page, "running", 7)
    waiting = row(page, "running", 8)
    assert 'data-waiting-for="runner:py"' in waiting
    assert '<span class="waiting">waiting</span> for runner:py' in waiting
    # global's "waiting" is the queue, labelled so; the queued list shows 9
    assert '<span data-waiting="1">1 queued</span>' in section(page, "gates")
    assert 'href="dispatches/9"' in row(page, "queued", 9)
    # a failure shows its stderr, escaped
    assert "no space left on &lt;dev&gt;" in row(page, "failure", 6)
    # the last hour: 5 succeeded and 1 failed, p50 <= p95 where dispatches started
    assert sum(map(int, attributes(page, "minute", "succeeded"))) == 5
    assert sum(map(int, attributes(page, "minute", "failed"))) == 1
    assert len(attributes(page, "minute", "minute")) == 60
    p50s = list(map(float, attributes(page, "latency", "p50")))
    p95s = list(map(float, attributes(page, "latency", "p95")))
    assert p50s and all(low <= high for low, high in zip(p50s, p95s, strict=True))
    assert "<svg" in section(page, "activity") and "<script" not in page
    # the dispatch page: the attempt with its output
    attempt = failure_page.split('class="attempt" data-status="failed"', 1)[1].split("</tr>")[0]
    assert "no space left on &lt;dev&gt;" in attempt and "exited with status 1" in attempt
