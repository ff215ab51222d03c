"""The dashboard in a real headless Chromium (Debian's), driven by Playwright.

The browser is ``/usr/bin/chromium`` from Debian's ``chromium`` package, never
one downloaded by ``playwright install``; ``scripts/bootstrap test`` installs it
when it is missing. Without it these tests fail (they do not skip).

Besides the checks, a screenshot of a busy dashboard is written to
``artifacts/dashboard.png`` (gitignored); with ``STACKDUCK_UPDATE_SCREENSHOT=1``
it is also copied to ``docs/dashboard.png`` (the README's picture), so a test
run leaves the work tree clean.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import shutil
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import trio

from stackduck_trio import Client, JobInfo, Worker
from stackduck_trio.testing import ServerProcess

from .test_metrics import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = pathlib.Path("/usr/bin/chromium")
ROOT = pathlib.Path(__file__).parents[2]
HOW_TO_INSTALL = (
    "install Debian's package as root: apt-get update && "
    "apt-get install -y --no-install-recommends chromium (scripts/bootstrap test does it)"
)
#: Playwright's timeout for one expectation or action (ms)
WAIT_MS = 6000
#: an SVG path with a few points at least
DRAWN = re.compile(r"M[\d.]+ [\d.]+ (L[\d.]+ [\d.]+ ){3,}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"the dashboard browser test needs headless Chromium at {CHROMIUM}: {HOW_TO_INSTALL}",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the playwright package is missing: scripts/bootstrap test installs the test extras",
            pytrace=False,
        )
    # Tests of the Redis tier run trio-asyncio, whose event loop policy stays
    # installed for the process: Playwright's sync API needs asyncio's own loop.
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), timeout=20_000)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        asyncio.set_event_loop_policy(policy)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # e.g. a CSP violation (a refused request's own console line is no page error)
    page.on(
        "console",
        lambda msg: (
            errors.append(msg.text)
            if msg.type == "error" and "Failed to load resource" not in msg.text
            else None
        ),
    )
    try:
        yield page
    finally:
        context.close()
    assert errors == [], errors


def start_server(tmp_path: pathlib.Path, *args: str) -> tuple[ServerProcess, str]:
    port = free_port()
    server = ServerProcess(
        tmp_path / "data",
        "--http-addr",
        f"127.0.0.1:{port}",
        "--heartbeat-interval",
        "0.5",
        "--grace-period",
        "1",
        *args,
    )
    server.start()
    return server, f"http://127.0.0.1:{port}/"


def client_call(address: str, fn: Any, token: str | None = None) -> Any:
    """Run ``await fn(client)`` with a fresh Python client."""

    async def main() -> Any:
        async with Client.connect(address, token=token) as client:
            return await fn(client)

    return trio.run(main)


async def make_dead(client: Client, job_type: str, error: str) -> str:
    """A job with no retries, failed by a (hand-driven) worker: a dead letter."""
    job_id = await client.enqueue(job_type, {"report": "q3", "pages": 12}, max_retries=0)
    job = await client.dequeue(job_type, worker_id="reports-1")
    assert job is not None and job.id == job_id
    assert await client.fail(job.id, job.lease_id, error) == "failed"
    return job_id


class Activity:
    """A producer and a worker in a thread of their own: the charts get lines."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.done = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def __enter__(self) -> Activity:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        self.thread.join(15)

    async def _main(self) -> None:
        async def thumbnail(job: JobInfo) -> None:
            n = json.loads(job.payload)["n"]
            await trio.sleep(0.005 + (n % 5) * 0.01)
            if n % 16 == 4:
                raise RuntimeError(f"image {n}: unsupported format")

        async def email(job: JobInfo) -> None:
            await trio.sleep(0.002)

        worker = Worker(
            self.address,
            {"thumbnail": thumbnail, "email_send": email},
            concurrency=4,
            worker_id="worker-a",
            grace_period=1,
        )
        async with Client.connect(self.address) as client, trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            n = 0
            while not self.done.is_set():
                await client.enqueue_many(
                    [
                        *({"job_type": "thumbnail", "payload": {"n": n + i}, "max_retries": 0}
                          for i in range(6)),
                        *({"job_type": "email_send", "payload": {"to": f"u{n + i}@example.com"}}
                          for i in range(3)),
                    ]
                )  # fmt: skip
                if n % 30 == 0:
                    await client.enqueue("invoice_pdf", {"n": n}, priority=1 + n % 3)
                n += 6
                await trio.sleep(0.1)
            worker.stop()


def test_dashboard_shows_depths_requeues_dead_jobs_and_takes_a_screenshot(
    page: Page, tmp_path: pathlib.Path
) -> None:
    from playwright.sync_api import expect

    server, url = start_server(tmp_path)
    with server:
        address = server.address
        page.goto(url)
        expect(page).to_have_title("Stackduck")
        expect(page.locator("#status")).to_contain_text("live")
        expect(page.locator("#auth-note")).to_contain_text("actions need no token")

        # a job enqueued with the Python client appears in the depth table
        client_call(address, lambda c: c.enqueue("invoice_pdf", {"n": 1}, priority=1))
        row = page.locator('#queues tr[data-type="invoice_pdf"]')
        expect(row.locator("td").nth(1)).to_have_text("1")  # P1

        # a dead job (no retries, failed by a worker) is listed; its error is text, not HTML
        hostile = '<img src=x onerror="document.title=1"> renderer crashed'
        dead_id = client_call(address, lambda c: make_dead(c, "report_build", hostile))
        dead_row = page.locator(f'#dead tr[data-job-id="{dead_id}"]')
        expect(dead_row.locator("td.err")).to_have_text(hostile)
        assert page.locator("#dead img").count() == 0

        # requeue it with its button: it leaves the dead list and is queued again
        dead_row.get_by_role("button", name="Requeue", exact=True).click()
        expect(page.locator("#message")).to_have_text("Requeued 1 job")
        expect(dead_row).to_have_count(0)
        job = client_call(address, lambda c: c.get(dead_id))
        assert job.status == "queued" and job.retry_count == 0

        # pause and resume a type with its buttons
        report = page.locator('#queues tr[data-type="report_build"]')
        report.get_by_role("button", name="Pause").click()
        expect(report.locator(".badge")).to_have_text("paused")
        stats = client_call(address, lambda c: c.stats())
        assert stats.of("report_build").paused
        report.get_by_role("button", name="Resume").click()
        expect(report.locator(".badge")).to_have_text("active")

        # look a job up by id
        page.fill("#lookup-id", dead_id)
        page.get_by_role("button", name="Look up").click()
        expect(page.locator("#lookup-result dl")).to_contain_text("report_build")
        expect(page.locator("#lookup-result pre")).to_contain_text('"pages":12')

        # a busy minute for the picture: a worker, throughput, failures, dead letters
        with Activity(address):
            expect(page.locator("#workers")).to_contain_text("worker-a")
            client_call(address, lambda c: c.pause("report_build"))
            time.sleep(6)
            expect(page.locator('#queues tr[data-type="thumbnail"]')).to_be_visible()
            expect(page.locator("#chart-throughput path.s-completed")).to_have_attribute("d", DRAWN)
            page.fill("#lookup-id", dead_id)
            page.get_by_role("button", name="Look up").click()
            page.wait_for_timeout(300)
            artifact = ROOT / "artifacts" / "dashboard.png"
            artifact.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(artifact), full_page=True)
        assert artifact.stat().st_size > 20_000
        if os.environ.get("STACKDUCK_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(artifact, ROOT / "docs" / "dashboard.png")


def test_dashboard_with_tokens_is_read_only_until_a_token_is_given(
    page: Page, tmp_path: pathlib.Path
) -> None:
    from playwright.sync_api import expect

    server, url = start_server(tmp_path, "--tokens", "s3cret")
    with server:
        client_call(server.address, lambda c: c.enqueue("guarded", {}), token="s3cret")
        page.goto(url)
        row = page.locator('#queues tr[data-type="guarded"]')
        pause = row.get_by_role("button", name="Pause")
        expect(pause).to_be_disabled()
        expect(page.locator("#auth-note")).to_contain_text("read-only")

        # a wrong token: the buttons enable, the server says no
        page.fill("#token", "wrong")
        page.get_by_role("button", name="Use token").click()
        expect(pause).to_be_enabled()
        pause.click()
        expect(page.locator("#message")).to_contain_text("invalid bearer token")

        page.get_by_role("button", name="Forget").click()
        expect(pause).to_be_disabled()
        page.fill("#token", "s3cret")
        page.get_by_role("button", name="Use token").click()
        expect(page.locator("#auth-note")).to_contain_text("token set")
        pause.click()
        expect(row.locator(".badge")).to_have_text("paused")
        # the token lives in this tab's sessionStorage only
        assert page.evaluate("sessionStorage.getItem('stackduck.token')") == "s3cret"
        assert page.evaluate("localStorage.length") == 0
