"""The web page (/ui/) in a real headless Chromium (Debian's chromium and chromium-driver, driven by selenium)
against a real local cluster whose API speaks TLS on TCP.

One browser for the module. Screenshots go to $CM_UI_SCREENSHOTS when it is set (`CM_UI_SCREENSHOTS=docs`
makes the README's docs/ui-*.png), else to the test's tmp_path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import test_multiuser
from test_api import free_port
from test_multiuser import ask, in_child_as, submit_as

users = test_multiuser.users
PATH_ENV = ["PATH=/usr/bin:/bin"]


def _chromium() -> tuple[str, str]:
    """(chromium, chromedriver), installed with apt-get when missing (as the other system packages are)."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    if os.geteuid() != 0:
        pytest.skip("needs root to install chromium and chromium-driver with apt-get")
    if shutil.which("apt-get") is None:
        pytest.skip("no chromium here, and no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:  # the package lists may be missing or stale
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=1200)
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip(f"chromium cannot be installed with apt-get: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return found  # type: ignore[return-value]


@pytest.fixture(scope="module")
def browser():
    chrome, driver = _chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test requirement: run `make setup`")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--ignore-certificate-errors", "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)  # the head's certificate is self-signed: the browser is told to take it
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are logged there
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_page_load_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def shots(tmp_path) -> Path:
    where = Path(os.environ.get("CM_UI_SCREENSHOTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def until(predicate, timeout: float = 60, what: str = "") -> None:
    """Wait for predicate() (a page that is being replaced meanwhile counts as not yet)."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except WebDriverException:
            pass
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def by_id(browser, name: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, name)


def css(browser, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def log_in(browser, base: str, token: str) -> None:
    browser.delete_all_cookies()
    browser.get(f"{base}/ui/")
    assert browser.current_url == f"{base}/ui/login"
    by_id(browser, "token").send_keys(token)
    by_id(browser, "login").click()


def post(browser, path: str, body: str) -> int:
    """A form POST made by a script in the logged-in page: what a forged form would send. Its status."""
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: arguments[1], redirect: 'manual',"
        " headers: {'Content-Type': 'application/x-www-form-urlencoded'}}).then(r => done(r.status), e => done(-1));",
        path, body)


def socket_login(path: str, token: str) -> int:
    """Log in to the page on api.sock (as whoever runs this): the status of the login POST."""
    import http.client
    import re
    import socket
    from urllib.parse import urlencode

    def ask(method: str, target: str, body: str | None = None, cookie: str = "") -> tuple[int, str, str]:
        conn = http.client.HTTPConnection("localhost", timeout=30)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(path)
        headers = {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
        conn.request(method, target, body, headers)
        answer = conn.getresponse()
        return answer.status, answer.read().decode(), (answer.getheader("Set-Cookie") or "").split(";")[0]

    _, form, cookie = ask("GET", "/ui/login")
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', form)[1]
    return ask("POST", "/ui/login", urlencode({"login_csrf": login_csrf, "token": token}), cookie)[0]


def test_login_a_sync_from_the_page_to_100_percent_and_its_history(make_cluster, browser, shots):
    from selenium.common.exceptions import NoAlertPresentException

    port = free_port()
    cluster = make_cluster(api_port=port)
    base = f"https://127.0.0.1:{port}"
    src = cluster.data_dir / "gpu" / "proj"
    (src / "sub").mkdir(parents=True)
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(1 << 20))
    (src / "sub" / "deep").write_bytes(b"x" * 70000)
    size = 8 * (1 << 20) + 70000

    log_in(browser, base, "cm2_0.0.0.not-a-token")
    assert browser.current_url == f"{base}/ui/login" and "unknown, expired or revoked" in by_id(browser, "error").text
    assert browser.get_cookie("cm_session") is None
    browser.save_screenshot(str(shots / "ui-login.png"))

    token = cluster.cli("cmtoken").stdout.strip()
    log_in(browser, base, token)
    until(lambda: browser.current_url == f"{base}/ui/", 30, "the cluster page after logging in")
    assert by_id(browser, "user").text == "root"
    cookie = browser.get_cookie("cm_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict", cookie
    assert token not in cookie["value"] and cookie["value"] not in token
    assert {row.text.split()[0] for row in css(browser, "#partitions tbody tr")} == {"gpu", "cpu"}
    assert len(css(browser, "#nodes tbody tr")) == 4

    name = "<script>alert(1)</script>"
    browser.get(f"{base}/ui/submit")
    for field, value in (("src", "gpu:/proj"), ("dst", "cpu:/copy"), ("name", name)):
        by_id(browser, field).send_keys(value)
    by_id(browser, "cwd").clear()
    by_id(browser, "cwd").send_keys(str(cluster.home))
    by_id(browser, "submit").click()
    until(lambda: "/ui/jobs/" in browser.current_url, 30, "the job's page after submitting")
    job_id = int(browser.current_url.rsplit("/", 1)[1])
    until(lambda: by_id(browser, "progress").get_property("value") == 100, 90, "the progress bar at 100%")
    until(lambda: by_id(browser, "state").text == "COMPLETED" and css(browser, "#report tbody tr td code"), 30,
          "the final page, with its report")
    assert by_id(browser, "job-name").text == name  # shown as text, not run
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    view = cluster.job(job_id)
    assert view["state"] == "COMPLETED" and view["transfer"]["bytes_done"] == size, view
    assert (cluster.data_dir / "cpu" / "copy" / "sub" / "deep").read_bytes() == b"x" * 70000
    assert {r.text.split()[0] for r in css(browser, "#report tbody tr")} == {"created"}

    browser.get(f"{base}/ui/jobs?type=sync")
    assert by_id(browser, f"job-{job_id}").find_element("css selector", "td.name").text == name

    browser.get(f"{base}/ui/history")
    today = time.strftime("%Y-%m-%d")
    bars = css(browser, f'#chart-bytes g.bar[data-day="{today}"]')
    assert [b.get_attribute("data-bytes") for b in bars] == [str(size)]
    assert float(bars[0].find_element("css selector", "rect").get_attribute("height")) > 0
    assert css(browser, "#pairs tbody tr")[0].text.startswith("gpu → cpu 1 ")
    browser.save_screenshot(str(shots / "ui-history.png"))

    # a slower sync: the page follows it while it runs (bar, rate, chart), the cluster page shows its rate
    slow = cluster.submit("cmsync", "--bwlimit", "1M", "gpu:/proj", "cpu:/slow", cwd=str(cluster.home))
    browser.get(f"{base}/ui/jobs/{slow}")
    seen = set()

    def moving() -> bool:
        seen.add(by_id(browser, "progress").get_property("value"))
        drawn = css(browser, "#chart canvas") and int(by_id(browser, "chart").get_attribute("data-points") or 0) >= 3
        return bool(drawn) and any(0 < v < 100 for v in seen)

    until(moving, 60, f"the bar moving and the chart drawn while the sync runs (bar values seen: {seen})")
    browser.save_screenshot(str(shots / "ui-job.png"))
    browser.get(f"{base}/ui/")
    until(lambda: css(browser, "#rates tbody tr")[0].text.startswith("gpu → cpu 1 "), 30, "the running sync's rate")
    browser.save_screenshot(str(shots / "ui-cluster.png"))
    browser.get(f"{base}/ui/jobs/{slow}")
    until(lambda: by_id(browser, "state").text == "COMPLETED" and by_id(browser, "progress").get_property("value") == 100,
          90, "the slow sync's page at 100%")
    refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not refused, refused


def test_a_user_cancels_her_job_from_the_page_and_cannot_touch_anothers(make_cluster, browser, users, shots):
    port = free_port()
    cluster = make_cluster(api_port=port)
    base = f"https://127.0.0.1:{port}"
    alice, bob = users["alice"], users["bob"]
    dirs = {}
    for who in (alice, bob):
        dirs[who.pw_name] = cluster.home / who.pw_name
        dirs[who.pw_name].mkdir()
        os.chown(dirs[who.pw_name], who.pw_uid, who.pw_gid)
    theirs = submit_as(cluster, bob, kind="command", argv=["sleep", "120"], cwd=str(dirs[bob.pw_name]), env=PATH_ENV)
    mine = submit_as(cluster, alice, kind="command", argv=["sleep", "120"], cwd=str(dirs[alice.pw_name]), env=PATH_ENV)
    waiting = submit_as(cluster, bob, kind="command", argv=["true"], cwd=str(dirs[bob.pw_name]), env=PATH_ENV,
                        hold=True, labels={"workflow": "nightly"})
    for job_id in (theirs, mine):
        cluster.wait_state(job_id, "RUNNING")
    ok, data = ask(cluster, alice, "token")
    assert ok, data

    log_in(browser, base, data["token"])
    until(lambda: browser.current_url == f"{base}/ui/", 30, "the cluster page after logging in")
    assert by_id(browser, "user").text == alice.pw_name
    assert not css(browser, "form[action='/ui/nodes/drain']")  # no drain button for a user
    browser.get(f"{base}/ui/jobs")
    assert not by_id(browser, f"job-{theirs}").find_elements("css selector", "button.cancel")
    assert by_id(browser, f"job-{mine}").find_elements("css selector", "button.cancel")
    assert by_id(browser, f"job-{waiting}").find_element("css selector", "td.reason").text == "Held"
    browser.get(f"{base}/ui/jobs?label=workflow%3Dnightly")
    assert [row.get_attribute("id") for row in css(browser, "#jobs tbody tr")] == [f"job-{waiting}"]
    browser.get(f"{base}/ui/jobs")
    browser.save_screenshot(str(shots / "ui-jobs.png"))
    browser.get(f"{base}/ui/jobs/{theirs}")
    assert not css(browser, "#cancel")
    csrf = css(browser, "input[name=csrf]")[0].get_attribute("value")

    assert post(browser, f"/ui/jobs/{theirs}/cancel", f"csrf={csrf}") == 403  # the head's own rule refuses
    assert post(browser, f"/ui/jobs/{mine}/cancel", "") == 403  # no CSRF token
    assert post(browser, f"/ui/jobs/{mine}/cancel", "csrf=" + "A" * len(csrf)) == 403  # a wrong one
    assert post(browser, "/ui/nodes/drain", f"csrf={csrf}&node=computenode-1&action=drain") == 403  # operators only
    assert cluster.job(theirs)["state"] == cluster.job(mine)["state"] == "RUNNING"

    browser.get(f"{base}/ui/jobs/{mine}")
    by_id(browser, "cancel").click()
    cluster.wait_state(mine, "CANCELLED", timeout=30)
    assert cluster.job(theirs)["state"] == "RUNNING"
    browser.get(f"{base}/ui/jobs/{mine}")
    assert by_id(browser, "state").text == "CANCELLED" and not css(browser, "#cancel")

    # on api.sock the page is the connecting user's: bob cannot log in there with alice's token; root may
    sock = str(cluster.run_dir / "api.sock")
    assert in_child_as(bob, lambda: socket_login(sock, data["token"])) == 403
    assert in_child_as(alice, lambda: socket_login(sock, data["token"])) == 303
    assert socket_login(sock, data["token"]) == 303
