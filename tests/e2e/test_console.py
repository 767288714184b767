"""The web console of a running gateway, in a real headless Chromium, and its /metrics and /healthz."""

from __future__ import annotations

import html
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException

import pytest

import smtpgw
from smtpgw.console.auth import LoginThrottle, hash_password, verify_password
from smtpgw.console.server import MAX_THREADS
from smtpgw.spam.database import SpamDatabase, site_file
from smtpgw.spool.store import Store
from tests.e2e.test_antivirus_gateway import CLEAN, infected_message
from tests.support.net import SMTPGW, free_port, wait_until
from tests.support.webdriver import Browser, browser  # noqa: F401 - the fixture

PASSWORD = "console-secret-1"
READER_PASSWORD = "reader-secret-1"
HASHES = {PASSWORD: hash_password(PASSWORD, 100_000), READER_PASSWORD: hash_password(READER_PASSWORD, 100_000)}
FROM, TO = "a@b.test", "x@example.test"

# Prometheus text exposition format 0.0.4: comment lines and samples (name, labels, value, timestamp).
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+|NaN|Inf)"
SAMPLE = re.compile(rf"({_NAME})(\{{(?:{_LABEL}(?:,{_LABEL})*,?)?\}})? ({_VALUE})(?: -?\d+)?")
HELP = re.compile(rf"# HELP ({_NAME}) (?:[^\\\n]|\\[\\n])*")
TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")


def parse_metrics(text: str) -> dict[str, float]:
    """Samples by ``name{labels}``; AssertionError for any line outside the grammar, a sample
    before its family's TYPE, or a family typed twice."""
    assert text.endswith("\n"), "the exposition ends with a line feed"
    typed: dict[str, str] = {}
    samples: dict[str, float] = {}
    for number, line in enumerate(text[:-1].split("\n"), 1):
        if line.startswith("# TYPE"):
            match = TYPE.fullmatch(line)
            assert match and match.group(1) not in typed, f"line {number}: bad or repeated TYPE: {line!r}"
            typed[match.group(1)] = match.group(2)
        elif line.startswith("# HELP"):
            assert HELP.fullmatch(line), f"line {number}: bad HELP: {line!r}"
        elif line.startswith("#") or not line:
            continue
        else:
            match = SAMPLE.fullmatch(line)
            assert match, f"line {number}: not a sample: {line!r}"
            family = re.sub(r"_(bucket|sum|count)$", "", match.group(1))
            assert match.group(1) in typed or typed.get(family) == "histogram", \
                f"line {number}: {match.group(1)} has no TYPE before it"
            key = match.group(1) + (match.group(2) or "")
            assert key not in samples, f"line {number}: {key} twice"
            samples[key] = float(match.group(3))
    for family in (name for name, kind in typed.items() if kind == "histogram"):
        buckets = [(float(key.split('le="')[1].rstrip('"}')), value) for key, value in samples.items()
                   if key.startswith(family + "_bucket{")]
        assert buckets and buckets[-1][0] == float("inf") and buckets == sorted(buckets), family
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), f"{family}: buckets not cumulative"
        assert buckets[-1][1] == samples[family + "_count"] and family + "_sum" in samples
    return samples


@pytest.fixture
def console_gateway(make_gateway, sink, clamd):
    port = free_port()
    gw = make_gateway(sink.port, extra={
        "smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
        "smtpgw.policy": [("Check", "true"), ("NotifyAdmin", "none"), ("NotifyRecipient", "none")],
        "smtpgw.console": [("ListenOn", f"127.0.0.1:{port}"), ("AdminUser", "admin"),
                           ("AdminPasswordHash", HASHES[PASSWORD]),
                           ("ReadOnlyUsers", f"reader:{HASHES[READER_PASSWORD]}")],
    })
    gw.console, gw.clamd_address = f"http://127.0.0.1:{port}", clamd.unix_address
    return gw


def http(url: str, form: dict[str, str] | None = None, cookie: str = "",
         origin: str | None = None) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of one request, redirects not followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return None

    data = urllib.parse.urlencode(form).encode() if form is not None else None
    headers = {"Cookie": cookie} if cookie else {}
    if origin is not None:
        headers["Origin"] = origin
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=20) as answer:
            return answer.status, answer.read().decode(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def log_in(b: Browser, base: str, user: str, password: str) -> str:
    b.get(base + "/login")
    b.type("input[name=user]", user)
    b.type("input[name=password]", password)
    b.click("button[type=submit]")
    return b.text()


def send(port: int, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.sendmail(FROM, [TO], data)


def test_an_admin_steers_the_gateway_from_a_browser(console_gateway, sink, browser: Browser, tmp_path):
    gw, base, b = console_gateway, console_gateway.console, browser
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> None:
        assert len(b.screenshot(str(shots / f"{name}.png"))) > 1000

    b.get(base + "/queue")
    assert b.url.endswith("/login")  # no session: the login page
    shot("login")
    assert "Status" in log_in(b, base, "admin", PASSWORD)
    assert re.search(r"Sender\s+on", b.text())
    assert re.search(rf"{re.escape(gw.clamd_address)}\s+answers\s+\d", b.text())  # clamd's health and version
    shot("status")

    # sender off: a message sent over SMTP waits in the queue, and the statistics count it
    b.click("form[action='/control'] input[value='.c_send_off'] ~ button")
    assert re.search(r"Sender\s+off", b.text())
    send(gw.port, CLEAN)
    b.wait_text(base + "/queue", rf" QUE .*<{FROM}> <{TO}>")
    shot("queue")
    stats = b.wait_text(base + "/stats", "mta_received_messages 1")
    shot("stats")
    assert "mta_received_messages 1" in stats
    assert re.search(r"received 1 1\n", stats) and len(b.find_all("svg.chart polyline")) == 10
    assert "Top recipient domains (received) since start\nCount\nexample.test 1" in stats
    b.get(base + "/")
    b.click("form[action='/control'] input[value='.c_send_on'] ~ button")
    assert sink.wait_for(1)[0].recipients == [TO]

    # an EICAR message is quarantined; a checked release is quarantined again, only one released
    # without check reaches the sink
    send(gw.port, infected_message())
    page = b.wait_text(base + "/store?name=quarantine", r"1 item\(s\)")
    assert "INF" in page
    b.click("td a[href^='/store/item']")
    item = b.text()
    assert "Header" in item and f"<{FROM}>" in item and "application/zip part a.zip not shown" in item
    shot("quarantine-item")
    b.click("input[value=release] ~ button")
    b.wait_text(base + "/store?name=quarantine", r"2 item\(s\)")
    assert len(sink.messages) == 1
    b.get(base + "/store?name=quarantine")
    b.click("tr:nth-of-type(2) input[value=release-without-check] ~ button")
    assert "without check" in b.text()
    shot("quarantine")
    assert sink.wait_for(2)[1].recipients == [TO]
    released = gw.wait_log(r"RELEASED, .*check=no")[0]

    # the receiver switched off in the browser: an SMTP client gets 421
    b.get(base + "/")
    b.click("form[action='/control'] input[value='.c_recv_off'] ~ button")
    assert re.search(r"Receiver\s+off", b.text())
    with smtplib.SMTP() as client:
        code, _ = client.connect("127.0.0.1", gw.port)
    assert code == 421

    # a POST without the CSRF token is refused, even with the session cookie
    cookie = f"smtpgw_session={b.cookie('smtpgw_session')}"
    status, body, _ = http(base + "/control", {"command": ".c_recv_on"}, cookie)
    assert status == 403 and "CSRF" in body
    assert re.search(r"Receiver\s+off", b.wait_text(base + "/", "Receiver"))
    b.click("form[action='/control'] input[value='.c_recv_on'] ~ button")
    assert re.search(r"Receiver\s+on", b.text())

    # the log page filters by queue ID, event and level; every action is in the audit log
    gw.wait_log(r"console: user=admin, .*action=store-release-without-check, item=quarantine/")
    log_page = b.wait_text(base + "/log?event=console%3A", "action=control")
    shot("log")
    assert "action=login" in log_page and "item=.c_send_off" in log_page and "RELEASED" not in log_page
    qid = re.search(r"\] (\S+): RELEASED", released).group(1)
    lines = b.wait_text(f"{base}/log?qid={qid}", "DELIVERED").split("\n")
    shown = [line for line in lines if line.startswith("[")]
    assert len(shown) >= 2 and all(f"] {qid}: " in line for line in shown)
    b.get(f"{base}/log?level=D")  # the test gateway logs at debug level
    shown = [line for line in b.text().split("\n") if line.startswith("[")]
    assert shown and all(re.match(r"\[[^\]]* D\]", line) for line in shown)

    # /metrics: every counter and the queue depth, equal to the traffic sent
    wait_until(lambda: "smtpgw_mta_sent_messages 2\n" in http(base + "/metrics")[1], 20, "both deliveries counted")
    status, text, headers = http(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    metrics = parse_metrics(text)
    assert metrics["smtpgw_mta_received_messages"] == 2
    assert metrics["smtpgw_mta_sent_messages"] == len(sink.messages) == 2
    assert metrics["smtpgw_queue_messages{state=\"QUE\"}"] == 0
    assert metrics["smtpgw_receiving"] == 1
    assert metrics["smtpgw_commit_seconds_count"] == 2  # the two messages received over SMTP
    assert metrics["smtpgw_delivery_seconds_count"] == 2  # the clean one and the one released unchecked
    assert metrics["smtpgw_scan_seconds_count"] == 1  # the clean one: blocked ones are not queued for delivery
    assert 0 < metrics["smtpgw_commit_seconds_sum"] < 10
    assert metrics["smtpgw_dns_queries_total"] >= metrics["smtpgw_dns_cache_hits_total"] >= 0
    assert metrics[f'smtpgw_clamd_up{{address="{gw.clamd_address}"}}'] == 1
    assert http(base + "/healthz")[:2] == (200, "ok\n")

    # wrong passwords lock the client out: then even the right one is refused
    b.click("header button")
    for _ in range(5):
        assert "Wrong user name or password" in log_in(b, base, "admin", "not-the-password")
    assert "locked out" in log_in(b, base, "admin", PASSWORD)
    shot("locked-out")
    for png in shots.iterdir():
        assert png.stat().st_size > 1000


def test_console_answers_carry_the_security_headers_and_a_reader_cannot_act(console_gateway):
    base = console_gateway.console
    status, body, headers = http(base + "/login", {"user": "reader", "password": READER_PASSWORD})
    assert status == 303
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = cookie.split(";")[0]
    status, page, headers = http(base + "/", cookie=session)
    assert status == 200 and "Switch off" not in page  # no buttons for a reader
    assert headers["X-Frame-Options"] == "DENY" and "script-src" not in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"] and "<script" not in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    status, body, _ = http(base + "/control", {"command": ".c_recv_off", "csrf": csrf}, session)
    assert status == 403 and "may look, not act" in body
    # parameters never reach the file system unchecked
    assert http(base + "/store/item?name=quarantine&id=../../smtpgw.conf", cookie=session)[0] == 400
    assert http(base + "/store?name=/etc", cookie=session)[0] == 404
    assert http(base + "/queue?state=../x", cookie=session)[0] == 400
    console_gateway.wait_log(r"console: user=reader, .*action=control, item=.c_recv_off, result=refused: read-only")
    status, page, _ = http(base + "/config", cookie=session)
    assert status == 200 and "AdminPasswordHash=pbkdf2_sha256$100000$(hidden)" in page and "<textarea" not in page
    assert HASHES[READER_PASSWORD].split("$")[3] not in page


def admin_session(base: str) -> tuple[str, str]:
    """(cookie, CSRF token) of a fresh admin login."""
    session = http(base + "/login", {"user": "admin", "password": PASSWORD})[2]["Set-Cookie"].split(";")[0]
    page = http(base + "/", cookie=session)[1]
    return session, re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def queued(base: str, session: str) -> list[str]:
    """The queue IDs the console's queue page lists in QUE."""
    return re.findall(r"<tr><td>(\S+)</td><td>QUE</td>", http(base + "/queue?state=QUE", cookie=session)[1])


def test_a_deferred_message_is_sent_now_and_another_removed_from_the_console(make_gateway, sink):
    port = free_port()
    gw = make_gateway(sink.port, extra={"smtpgw.console": [
        ("ListenOn", f"127.0.0.1:{port}"), ("AdminPasswordHash", HASHES[PASSWORD])]})
    base = f"http://127.0.0.1:{port}"
    session, csrf = admin_session(base)
    sink.replies["RCPT"] = ["451 4.3.0 try again later", "250 2.1.5 ok"]
    send(gw.port, CLEAN)
    deferred = gw.wait_log(r"DELIVERED, .*status=deferred")[0]
    qid = re.search(r"\] (\S+): DELIVERED", deferred).group(1)
    wait_until(lambda: queued(base, session) == [qid], 20, "the deferred message listed in QUE")
    status, _, headers = http(base + "/queue", {"op": "send", "id": qid, "csrf": csrf}, session)
    assert status == 303 and f"{qid}%3A%20scheduled%20ahead" in headers["Location"]
    assert sink.wait_for(1)[0].recipients == [TO]  # at once, not after MinimalBackoffTime
    gw.wait_log(rf"console: user=admin, .*action=queue-send, item={qid}, result=done")

    http(base + "/control", {"command": ".c_send_off", "csrf": csrf}, session)
    send(gw.port, CLEAN)
    other = wait_until(lambda: queued(base, session), 20, "the second message listed in QUE")[0]
    assert "a queue ID is needed" in urllib.parse.unquote(
        http(base + "/queue", {"op": "remove", "id": "../msg", "csrf": csrf}, session)[2]["Location"])
    http(base + "/queue", {"op": "remove", "id": other, "csrf": csrf}, session)
    gw.wait_log(rf"{other}: REMOVED, state=QUE, by=admin")
    assert "0 message(s)" in http(base + "/queue", cookie=session)[1] and not gw.queued()


def test_the_configuration_is_checked_and_reloaded_from_the_console(console_gateway):
    gw, base = console_gateway, console_gateway.console
    session, csrf = admin_session(base)
    page = http(base + "/config", cookie=session)[1]
    text = html.unescape(re.search(r"<textarea[^>]*>(.*)</textarea>", page, re.S).group(1))
    assert text == open(gw.config).read()
    broken = text.replace("LogLevel=debug", "LogLevel=loud")
    line = broken.split("\n").index("LogLevel=loud") + 1
    status, page, _ = http(base + "/config/check", {"csrf": csrf, "text": broken}, session)
    assert status == 200 and f"{gw.config}:{line}: LogLevel: " in page and "1 problem(s)" in page
    status, page, _ = http(base + "/config/check", {"csrf": csrf, "text": text}, session)
    assert "Config OK" in page
    assert http(base + "/config/check", {"text": text}, session)[0] == 403  # no CSRF token
    status, page, _ = http(base + "/config/check", {"csrf": csrf, "text": text}, session, origin="http://evil.test")
    assert status == 403 and "Config OK" not in page  # another site's page cannot post, token or not
    assert http(base + "/login", {"user": "admin", "password": PASSWORD}, origin="http://evil.test")[0] == 403
    with open(gw.config, "w") as f:
        f.write(broken)
    status, _, headers = http(base + "/config/reload", {"csrf": csrf}, session)
    assert status == 303 and "reload%20refused" in headers["Location"]
    gw.wait_log(r"reload refused: .*LogLevel")
    with open(gw.config, "w") as f:
        f.write(text.replace("LogLevel=debug", "LogLevel=info"))
    assert "configuration%20reloaded" in http(base + "/config/reload", {"csrf": csrf}, session)[2]["Location"]
    gw.wait_log(r"console: user=admin, .*action=config-reload, item=-, result=configuration reloaded")


HOSTILE = (b"From: <script>alert(1)</script>@x.test\r\nSubject: =?utf-8?q?=3Cimg_src=3Dx_onerror=3Dalert(2)=3E?=\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\nplain <b>words</b>\r\n--b\r\nContent-Type: text/html\r\n\r\n"
           b"<iframe src=//evil.test></iframe><p>html words</p>\r\n--b--\r\n")


def test_a_stored_message_is_previewed_as_escaped_text_never_as_html(console_gateway, browser: Browser):
    gw, base = console_gateway, console_gateway.console
    item = Store(os.path.join(gw.folder, "var", "quarantine")).put(
        "tzgHOSTILE01", HOSTILE, {"sender": "<x>@x.test", "recipients": [{"addr": TO}]}, "SPM", "<b>reason</b>")
    status, _, headers = http(base + "/login", {"user": "admin", "password": PASSWORD})
    session = headers["Set-Cookie"].split(";")[0]
    status, page, _ = http(f"{base}/store/item?name=quarantine&id={item}", cookie=session)
    assert status == 200
    for raw in ("<script", "<img", "<iframe", "<b>"):
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "plain &lt;b&gt;words&lt;/b&gt;" in page and "[text/html part not shown]" in page
    assert "html words" not in page
    log_in(browser, base, "admin", PASSWORD)
    browser.get(f"{base}/store/item?name=quarantine&id={item}")
    assert "<script>alert(1)</script>@x.test" in browser.text()  # shown as text, not run
    assert not browser.find_all("main iframe, main img, main script")
    browser.click("input[value=delete] ~ button")
    assert f"{item} deleted" in browser.text() and "0 item(s)" in browser.text()
    assert not os.listdir(os.path.join(gw.folder, "var", "quarantine"))
    gw.wait_log(rf"console: user=admin, .*action=store-delete, item=quarantine/{item}, result={item} deleted")


def test_over_https_the_session_cookie_is_secure_and_plain_http_is_not_served(make_gateway, sink, tls_files):
    cert, key = tls_files
    port = free_port()
    make_gateway(sink.port, extra={"smtpgw.console": [
        ("ListenOn", f"127.0.0.1:{port}"), ("AdminPasswordHash", HASHES[PASSWORD]),
        ("TLSCertificateFile", cert), ("TLSKeyFile", key)]})
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False
    request = urllib.request.Request(f"https://127.0.0.1:{port}/login",
                                     urllib.parse.urlencode({"user": "admin", "password": PASSWORD}).encode())

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return None

    opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=context))
    with pytest.raises(urllib.error.HTTPError) as answer:
        opener.open(request, timeout=20)
    assert answer.value.code == 303
    cookie = answer.value.headers["Set-Cookie"]
    assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    with pytest.raises((urllib.error.URLError, ConnectionError, HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=20)


def test_the_traffic_history_survives_a_restart(console_gateway, sink):
    gw, base = console_gateway, console_gateway.console
    send(gw.port, CLEAN)
    wait_until(lambda: "smtpgw_mta_sent_messages 1\n" in http(base + "/metrics")[1], 20, "the delivery counted")
    assert gw.stop() == 0
    gw.start()
    wait_until(lambda: http(base + "/login")[0] == 200, 10, "the console")
    session = http(base + "/login", {"user": "admin", "password": PASSWORD})[2]["Set-Cookie"].split(";")[0]
    page = http(base + "/stats", cookie=session)[1]
    assert "<td>mta_received_messages</td><td class=num>1</td>" in page  # counters are kept too (StatFilename)
    for series in ("received", "delivered"):  # the charts keep the last 24 hours and 30 days
        assert page.count(f'<span class="key s{1 if series == "delivered" else 0}">{series}</span></td>'
                          f"<td class=num>1</td>") == 2


def spam_head(bases: str) -> dict[bytes, bytes]:
    """The first fields of the spam database (version, date, ham, spam)."""
    with open(os.path.join(bases, "spam", "spam.db"), "rb") as f:
        return dict(line.split(b"\t", 1) for line in f.read(4096).split(b"\n")[1:5])


def spam_counts(bases: str) -> tuple[int, int]:
    head = spam_head(bases)
    return int(head[b"ham"]), int(head[b"spam"])


def site_counts(bases: str) -> tuple[int, int]:
    """(ham, spam) learned at the site: the site layer beside the bases folder."""
    path = site_file(bases)
    if not os.path.exists(path):
        return 0, 0
    site = SpamDatabase.load(path)
    return site.bayes.nham, site.bayes.nspam


def shipped_version(bases: str) -> str:
    return spam_head(bases)[b"version"].decode()


def test_a_quarantined_spam_is_learned_from_the_browser(make_gateway, sink, browser: Browser, tmp_path):
    bases = tmp_path / "bases"
    shutil.copytree(os.path.join(os.path.dirname(smtpgw.__file__), "bases"), bases)
    port = free_port()
    gw = make_gateway(sink.port, extra={
        "path": [("BasesPath", str(bases))],
        "smtpgw.console": [("ListenOn", f"127.0.0.1:{port}"), ("AdminPasswordHash", HASHES[PASSWORD])]})
    base = f"http://127.0.0.1:{port}"
    item = Store(os.path.join(gw.folder, "var", "quarantine")).put(
        "tzgSPAM00001", b"Subject: cheap pills\r\n\r\nbuy cheap pills now\r\n",
        {"sender": FROM, "recipients": [{"addr": TO}]}, "SPM", "spam")
    shipped = spam_counts(str(bases))
    log_in(browser, base, "admin", PASSWORD)
    browser.get(f"{base}/store/item?name=quarantine&id={item}")
    browser.click("input[value=learn-spam] ~ button")
    assert f"{item} learned as spam (1 message(s))" in browser.text()
    assert site_counts(str(bases)) == (0, 1)
    gw.wait_log(rf"console: user=admin, .*action=store-learn-spam, item=quarantine/{item}")
    browser.get(f"{base}/store/item?name=quarantine&id={item}")
    browser.click("input[value=learn-ham] ~ button")
    assert site_counts(str(bases)) == (1, 1)
    assert spam_counts(str(bases)) == shipped  # the shipped database is only read


def test_a_spam_released_from_the_console_is_learned_as_ham_first(make_gateway, sink, tmp_path):
    """LearnOnRelease=yes: the console's release follows the rule of ``store release``
    (``spool.ops.learns_on_release``): a quarantined spam is learned as ham, nothing else is."""
    bases = tmp_path / "bases"
    shutil.copytree(os.path.join(os.path.dirname(smtpgw.__file__), "bases"), bases)
    port = free_port()
    gw = make_gateway(sink.port, extra={
        "path": [("BasesPath", str(bases))], "smtpgw.antispam": [("LearnOnRelease", "yes")],
        "smtpgw.console": [("ListenOn", f"127.0.0.1:{port}"), ("AdminPasswordHash", HASHES[PASSWORD])]})
    base = f"http://127.0.0.1:{port}"
    store = Store(os.path.join(gw.folder, "var", "quarantine"))
    envelope = {"sender": FROM, "recipients": [{"addr": TO}]}
    spam = store.put("tzgSPAM00001", b"Subject: cheap pills\r\n\r\nbuy cheap pills now\r\n", envelope, "SPM", "spam")
    filtered = store.put("tzgFILT00001", b"Subject: report\r\n\r\nthe report\r\n", envelope, "FLT", "filtered")
    session, csrf = admin_session(base)
    status, _, headers = http(base + "/store", {"op": "release-without-check", "id": spam, "name": "quarantine",
                                                "csrf": csrf}, session)
    assert status == 303 and f"{spam} released as " in urllib.parse.unquote(headers["Location"])
    assert urllib.parse.unquote(headers["Location"]).endswith("without check, learned as ham")
    assert site_counts(str(bases)) == (1, 0)
    http(base + "/store", {"op": "release-without-check", "id": filtered, "name": "quarantine", "csrf": csrf}, session)
    assert [m.recipients for m in sink.wait_for(2)] == [[TO], [TO]]
    assert site_counts(str(bases)) == (1, 0)  # a filtered item is not a spam: not learned
    gw.wait_log(rf"console: user=admin, .*action=store-release-without-check, item=quarantine/{filtered}")


def test_keepup2date_runs_from_the_console_and_its_report_is_shown(make_gateway, sink, browser: Browser, tmp_path):
    from tests.test_updater import key_pair, make_set

    bases = tmp_path / "bases"
    shutil.copytree(os.path.join(os.path.dirname(smtpgw.__file__), "bases"), bases)
    update_set = make_set(str(tmp_path), "2031.01.01-1")
    port = free_port()
    gw = make_gateway(sink.port, extra={
        "path": [("BasesPath", str(bases))],
        "updater.path": [("BackUpPath", str(tmp_path / "bases.backup")), ("UploadPatchPath", str(tmp_path / "up"))],
        "updater.options": [("UpdateServerUrl", update_set), ("PublicKey", key_pair(str(tmp_path)) + ".pub")],
        "updater.report": [("ReportFileName", str(tmp_path / "keepup2date.log"))],
        "smtpgw.console": [("ListenOn", f"127.0.0.1:{port}"), ("AdminPasswordHash", HASHES[PASSWORD])]})
    base = f"http://127.0.0.1:{port}"
    log_in(browser, base, "admin", PASSWORD)
    browser.get(base + "/updates")
    assert shipped_version(str(bases)) in browser.text() and "No run from the console" in browser.text()
    browser.click("form[action='/updates/run'] button")
    assert "keepup2date started" in browser.text()
    page = browser.wait_text(base + "/updates", r"exit code \d+", timeout=60)
    assert "exit code 1 (updated)" in page and "2031.01.01-1" in page
    assert "Report file" in page
    gw.wait_log("databases reloaded")  # the post-update action: .c_db_reload
    gw.wait_log(r"console: user=admin, .*action=keepup2date, item=-, result=keepup2date started")
    browser.screenshot(str(tmp_path / "updates.png"))
    assert os.path.getsize(tmp_path / "updates.png") > 1000


def test_idle_browsers_never_hold_up_smtp_and_the_console_stays_bounded(console_gateway, sink):
    gw, base = console_gateway, console_gateway.console
    port = int(base.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_THREADS)]
    try:
        with pytest.raises((ConnectionError, HTTPException, urllib.error.URLError)):  # one more is closed at once
            urllib.request.urlopen(base + "/login", timeout=5)
        send(gw.port, CLEAN)  # SMTP goes on meanwhile
        assert sink.wait_for(1)[0].recipients == [TO]
    finally:
        for conn in idle:
            conn.close()
    def serving() -> bool:
        try:
            return http(base + "/login")[0] == 200
        except (ConnectionError, HTTPException):  # a slot not yet given back by a closed idle one
            return False
    wait_until(serving, 10, "the console serving again")


def test_a_console_port_in_use_stops_the_start_with_its_reason(make_gateway, sink):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = make_gateway(sink.port, start=False, extra={"smtpgw.console": [
            ("ListenOn", f"127.0.0.1:{port}"), ("AdminPasswordHash", HASHES[PASSWORD])]})
        result = subprocess.run([sys.executable, SMTPGW, "-c", gw.config, "-n"], cwd=gw.folder,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 30
    assert f"console: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_metrics_are_refused_outside_metrics_allow_from(make_gateway, sink):
    port = free_port()
    gw = make_gateway(sink.port, extra={"smtpgw.console": [
        ("ListenOn", f"127.0.0.1:{port}"), ("AdminPasswordHash", HASHES[PASSWORD]), ("MetricsAllowFrom", "10.0.0.0/8")]})
    assert http(f"http://127.0.0.1:{port}/metrics")[0] == 403
    assert http(f"http://127.0.0.1:{port}/healthz")[0] == 403
    gw.control(".c_recv_off")
    gw.wait_log("receiving off")


def test_console_configuration_errors_name_file_and_line(tmp_path):
    conf = tmp_path / "smtpgw.conf"
    conf.write_text("[smtpgw.network]\nListenOn=127.0.0.1:2525\nHostname=gw.example.test\nPostmaster=p@example.test\n"
                    "ProtectedDomains=example.test\n[smtpgw.path]\nQueuePath=q\nControlPath=c\n[smtpgw.policy]\n"
                    "AdminNotifyAddress=a@example.test\nNotifyFromAddress=n@example.test\nBackupPath=b\nQuarantinePath=q2\n"
                    "[smtpgw.console]\nListenOn=127.0.0.1\nReadOnlyUsers=bob:secret\n")
    result = subprocess.run([sys.executable, SMTPGW, "-c", str(conf), "-k"], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{conf}:15: ListenOn is set but AdminPasswordHash is not" in result.stdout
    assert f"{conf}:16: ReadOnlyUsers: bob: not a pbkdf2_sha256$ITERATIONS$SALT$HASH value" in result.stdout


def test_console_passwd_prints_a_hash_that_verifies():
    result = subprocess.run([sys.executable, SMTPGW, "console", "passwd"], input="a good password\n",
                            capture_output=True, text=True)
    assert result.returncode == 0
    value = result.stdout.strip()
    assert value.startswith("pbkdf2_sha256$") and verify_password("a good password", value)
    assert not verify_password("another password", value)
    short = subprocess.run([sys.executable, SMTPGW, "console", "passwd"], input="short\n", capture_output=True, text=True)
    assert short.returncode == 1 and not short.stdout


def test_login_throttle_locks_out_after_repeated_failures_and_forgets_on_success():
    throttle = LoginThrottle(failures=3, window=60, lock_out=60)
    assert not throttle.failed("ip:1", "user:a") and not throttle.failed("ip:1", "user:a")
    throttle.succeeded("ip:1", "user:a")
    assert not throttle.failed("ip:1", "user:a") and not throttle.locked("ip:1")
    throttle.failed("ip:1", "user:b")
    assert throttle.failed("ip:1", "user:c")  # the third from this address locks it
    assert throttle.locked("ip:1") and not throttle.locked("user:c")
