"""The status page in a real browser: Debian's headless Chromium driven by Selenium, against
a server started as the README starts it. Records pushed by a client show up on the page
without a reload; screenshots (laptop and phone) are saved for a person to look at
(``MZ_SCREENSHOTS=<folder>`` keeps them there too)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mzconnector
from tests.conftest import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: The flags every headless run here starts Chromium with (no sandbox: CI runs as root).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are missing: .ci/run installs them")
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402 - only where the browser exists
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def http_server(start_server: Callable[..., ServerProcess]) -> tuple[ServerProcess, str]:
    server = start_server("--http-port", "0")
    assert server.proc.stdout is not None
    line = server.proc.stdout.readline()
    assert line.startswith("mzserver: status page and probes on http://"), line
    return server, line.split()[-1]


def text(driver: webdriver.Chrome, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def rows(driver: webdriver.Chrome, table: str) -> list[list[str]]:
    """A table's cells as shown, read in one go: the page rebuilds its tables each second."""
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]),"
            " (tr) => Array.from(tr.cells, (td) => td.innerText))",
            f"#{table} tbody tr",
        )
    )


def until(driver: webdriver.Chrome, condition: Callable[[], bool], what: str) -> None:
    """Wait (at most 15 s) until the page shows what ``condition`` checks."""
    WebDriverWait(driver, 15, poll_frequency=0.1).until(lambda _: condition(), what)


def keep(screenshot: Path) -> None:
    folder = os.environ.get("MZ_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(folder) / screenshot.name)


def test_the_page_updates_itself_as_records_arrive(
    browser: webdriver.Chrome, http_server: tuple[ServerProcess, str], tmp_path: Path
) -> None:
    server, url = http_server
    browser.get(url)
    until(browser, lambda: text(browser, "workflow") == "echo", "the workflow's name")
    until(browser, lambda: text(browser, "readiness") == "ready", "the server is ready")
    assert text(browser, "total-in") == "0"
    assert rows(browser, "clients") == [["no client is connected"]]
    browser.execute_script("window.mzSamePage = 'no reload'")

    with mzconnector.connect(server.host, server.port, name="browser-test", timeout=10) as conn:
        records = [conn.udrs.Subscriber(msisdn=f"4670{i:05}", balance=i) for i in range(2500)]
        conn.submit_many(records)
        conn.flush()
        received = [conn.receive(timeout=10) for _ in records]
        assert received == records

        until(browser, lambda: text(browser, "total-in") == "2,500", "2,500 records in")
        until(browser, lambda: text(browser, "total-out") == "2,500", "2,500 records out")
        until(browser, lambda: text(browser, "clients-open") == "1", "one client")
        [client] = rows(browser, "clients")
        assert client[1:3] == ["browser-test", client[2]]
        assert client[2].startswith("127.0.0.1:")
        assert client[5:] == ["2,500", "2,500"]
        routes = {row[0]: row for row in rows(browser, "routes")}
        assert routes["in"][1] == "echo"
        assert routes["in"][3] == "2,500"

        def mims() -> dict[str, str]:
            return {row[0]: row[1] for row in rows(browser, "mim")}

        until(browser, lambda: mims()["Last Balance"] == "2,499", "an assigned MIM")
        assert mims()["Workflow Name"] == "echo"
        # Still the same page: the numbers changed without a reload.
        assert browser.execute_script("return window.mzSamePage") == "no reload"

        browser.set_window_size(1280, 1500)  # a laptop, tall enough for the whole page
        laptop = tmp_path / "status-page-laptop.png"
        assert browser.save_screenshot(str(laptop))
        keep(laptop)

        browser.set_window_size(390, 844)  # a phone
        until(browser, lambda: browser.execute_script("return window.innerWidth") < 600, "narrow")
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0  # wide tables scroll in their own boxes, the page does not
        phone = tmp_path / "status-page-phone.png"
        browser.save_screenshot(str(phone))
        keep(phone)

    until(browser, lambda: text(browser, "clients-open") == "0", "the client has left")
    assert rows(browser, "clients") == [["no client is connected"]]
    assert browser.execute_script("return window.mzSamePage") == "no reload"
