"""The web console's HTML: one layout, the pages, the stylesheet, the Prometheus text.

Owns: turning the data the console gathered into markup (every value escaped
with ``html.escape``; forms carry the session's CSRF token), the small
stylesheet (the only asset: no script, no external file), the safe preview of a
stored message (its header fields and its text/plain parts as text), and the
``/metrics`` exposition (Prometheus text format 0.0.4).

Must never: put an unescaped value into a page, emit a script or an inline
style (the Content-Security-Policy forbids both), or render a message's HTML.
"""

from __future__ import annotations

import email.policy
import html
import re
import time
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, Iterable, Sequence

from smtpgw.console.traffic import HISTOGRAMS
from smtpgw.spool.store import STATUSES, Item, format_size

PREVIEW_BYTES = 64 * 1024  # characters of text shown from a stored message
NAV = (("/", "Status"), ("/queue", "Queue"), ("/store?name=quarantine", "Quarantine"), ("/store?name=backup", "Backup"),
       ("/log", "Log"), ("/stats", "Statistics"), ("/config", "Configuration"), ("/updates", "Updates"))

STYLESHEET = """
body { font: 14px/1.4 sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #234; color: #fff; padding: .5em 1em; display: flex; gap: 1em; align-items: center; }
header a { color: #fff; text-decoration: none; } header a:hover { text-decoration: underline; }
header form { margin-left: auto; }
main { padding: 1em; }
table { border-collapse: collapse; margin: .5em 0 1em; background: #fff; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #eef; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
form.inline { display: inline; }
.on { color: #070; font-weight: bold; } .off { color: #a00; font-weight: bold; }
.notice { background: #ffd; border: 1px solid #cc8; padding: .3em .6em; }
pre { background: #fff; border: 1px solid #ccc; padding: .5em; white-space: pre-wrap; word-break: break-all; }
input, select, button { font: inherit; }
svg.chart { background: #fff; border: 1px solid #ccc; }
svg.chart polyline { fill: none; stroke-width: 1.5; }
.s0 { stroke: #36c; color: #36c; } .s1 { stroke: #393; color: #393; } .s2 { stroke: #999; color: #777; }
.s3 { stroke: #c90; color: #c90; } .s4 { stroke: #c33; color: #c33; }
span.key { font-weight: bold; }
"""


class Markup(str):
    """Text that is already HTML (made by this module), put into a page as is; what is added to
    it is escaped unless it is Markup too."""

    def __add__(self, other: str) -> "Markup":
        return Markup(str.__add__(self, esc(other)))


def esc(value: object) -> str:
    return value if isinstance(value, Markup) else html.escape(str(value), quote=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[int] = ()) -> Markup:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers) if any(headers) else ""
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{esc(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return Markup(f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>")


def button(action: str, fields: dict[str, str], label: str, csrf: str) -> Markup:
    hidden = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in {**fields, "csrf": csrf}.items())
    return Markup(f'<form class="inline" method="post" action="{esc(action)}">{hidden}'
                  f'<button type="submit">{esc(label)}</button></form>')


def layout(title: str, body: str, user: str = "", role: str = "", csrf: str = "", refresh: int = 0) -> str:
    nav = ""
    if user:
        links = "".join(f'<a href="{esc(href)}">{esc(text)}</a>' for href, text in NAV)
        nav = (f'<strong>smtpgw</strong>{links}<form method="post" action="/logout">'
               f'<input type="hidden" name="csrf" value="{esc(csrf)}"><span>{esc(user)} ({esc(role)})</span> '
               f'<button type="submit">Log out</button></form>')
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}<title>{esc(title)} - smtpgw</title>'
            f'<link rel="stylesheet" href="/style.css"></head><body><header>{nav or "<strong>smtpgw</strong>"}</header>'
            f"<main><h1>{esc(title)}</h1>{body}</main></body></html>")


def notice(text: str) -> Markup:
    return Markup(f'<p class="notice">{esc(text)}</p>') if text else Markup("")


def error_page(status: int, reason: str) -> str:
    return layout(f"Error {status}", f"<p>{esc(reason)}</p><p><a href=\"/\">Back</a></p>")


def login_page(message: str = "") -> str:
    form = Markup('<form method="post" action="/login"><p><label>User <input name="user" autocomplete="username" required>'
            '</label></p><p><label>Password <input name="password" type="password" autocomplete="current-password" '
            'required></label></p><p><button type="submit">Log in</button></p></form>')
    return layout("Log in", notice(message) + form)


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))


def status_page(snap: dict[str, Any], depth: dict[str, int], spam: dict[str, str], clamd: list[tuple[str, bool, str]],
                version: str, admin: bool, csrf: str) -> Markup:
    rows = []
    for label, key, command in (("Receiver", "receiving", "recv"), ("Sender", "sending", "send"),
                                ("Anti-virus", "scanning", "avir")):
        on = snap[key]
        state = Markup(f'<span class="{"on" if on else "off"}">{"on" if on else "off"}</span>')
        action = button("/control", {"command": f".c_{command}_{'off' if on else 'on'}"},
                        "Switch off" if on else "Switch on", csrf) if admin else ""
        rows.append((label, state, action))
    parts = [table(("Stage", "State", ""), rows)]
    if admin:
        parts.append(Markup("<p>") + button("/control", {"command": ".c_db_reload"}, "Reload databases", csrf)
                     + button("/control", {"command": ".c_stats"}, "Write statistics file", csrf) + Markup("</p>"))
    parts.append(Markup("<h2>Queue</h2>"))
    parts.append(table(("State", "Messages"), [(state, count) for state, count in depth.items()], numeric=(1,)))
    parts.append(Markup("<h2>Gateway</h2>"))
    parts.append(table(("", ""), [
        ("Version", version), ("Started", _when(snap["started"])),
        ("Uptime", _duration(int(time.time() - snap["started"]))),
        ("Spam database", f"{spam['version']} ({spam['date']})"),
    ]))
    parts.append(Markup("<h2>clamd</h2>"))
    parts.append(table(("Server", "State", "Version or problem"), [
        (address, Markup(f'<span class="{"on" if up else "off"}">{"answers" if up else "down"}</span>'), text)
        for address, up, text in clamd]))
    return Markup("".join(parts))


def queue_page(rows: list[tuple[str, Any]], filters: dict[str, str], states: Sequence[str], admin: bool,
               csrf: str, truncated: bool) -> Markup:
    options = "".join(f'<option value="{esc(s)}"{" selected" if filters["state"] == s else ""}>{esc(s or "any")}</option>'
                      for s in ("", *states))
    form = (f'<form method="get" action="/queue"><label>State <select name="state">{options}</select></label> '
            f'<label>Sender <input name="sender" value="{esc(filters["sender"])}"></label> '
            f'<label>Recipient <input name="recipient" value="{esc(filters["recipient"])}"></label> '
            f'<button type="submit">Filter</button></form>')
    body = []
    for state, env in rows:
        actions = Markup("")
        if admin:
            actions = (button("/queue", {"op": "send", "id": env.id}, "Send now", csrf)
                       + button("/queue", {"op": "remove", "id": env.id}, "Remove", csrf))
        rcpts = " ".join(f"<{r.addr}>" for r in env.pending()) or "-"
        body.append((env.id, state, format_size(env.size), _when(env.received_at), env.client_ip or "-",
                     f"<{env.sender}>", rcpts, actions))
    more = Markup(f"<p>Only the first {len(rows)} are shown.</p>") if truncated else Markup("")
    return Markup(form + table(("Queue ID", "State", "Size", "Received", "Client", "Sender", "Recipients", ""), body)
                  + f"<p>{len(rows)} message(s)</p>" + more)


def store_page(name: str, names: Sequence[str], items: list[Item], filters: dict[str, str], admin: bool,
               csrf: str) -> Markup:
    stores = " ".join(f'<a href="/store?name={esc(n)}">{esc(n)}</a>' for n in names)
    options = "".join(f'<option value="{esc(s)}"{" selected" if filters["status"] == s else ""}>{esc(s or "any")}</option>'
                      for s in ("", *STATUSES))
    form = (f'<p>Stores: {stores}</p><form method="get" action="/store"><input type="hidden" name="name" '
            f'value="{esc(name)}"><label>Status <select name="status">{options}</select></label> '
            f'<label>Sender <input name="sender" value="{esc(filters["sender"])}"></label> '
            f'<label>Recipient <input name="recipient" value="{esc(filters["recipient"])}"></label> '
            f'<label>Date (YYYY-MM-DD) <input name="date" value="{esc(filters["date"])}"></label> '
            f'<button type="submit">Search</button></form>')
    rows = []
    for item in items:
        link = Markup(f'<a href="/store/item?name={esc(name)}&amp;id={esc(item.id)}">{esc(item.id)}</a>')
        rows.append((link, item.status, format_size(item.size), _when(item.time), f"<{item.sender}>",
                     ", ".join(item.recipients), item.reason, _store_actions(name, item, admin, csrf)))
    return Markup(form + table(("Item", "Status", "Size", "Arrived", "Sender", "Recipients", "Reason", ""), rows)
                  + f"<p>{len(items)} item(s)</p>")


SPAM_STATUSES = ("SPM", "PSP")  # items that may be learned as spam or ham


def _store_actions(name: str, item: Item, admin: bool, csrf: str) -> Markup:
    if not admin:
        return Markup("")
    fields = {"name": name, "id": item.id}
    learn = Markup("")
    if item.status in SPAM_STATUSES:
        learn = (button("/store", {**fields, "op": "learn-spam"}, "Learn as spam", csrf)
                 + button("/store", {**fields, "op": "learn-ham"}, "Learn as ham", csrf))
    return (button("/store", {**fields, "op": "release"}, "Release", csrf)
            + button("/store", {**fields, "op": "release-without-check"}, "Release without check", csrf)
            + button("/store", {**fields, "op": "delete"}, "Delete", csrf) + learn)


def item_page(name: str, item: Item, raw: bytes, admin: bool, csrf: str) -> Markup:
    """An item's facts, its header section as it is stored (text) and the preview of its text."""
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    about = table(("", ""), [("Status", f"{item.status} ({STATUSES.get(item.status, '')})"), ("Reason", item.reason),
                             ("Sender", f"<{item.sender}>"), ("Recipients", ", ".join(item.recipients)),
                             ("Subject", decoded_subject(message)), ("Queue ID", item.queue_id),
                             ("Size", format_size(item.size))])
    text = f"<h2>Header</h2><pre>{esc(head)}</pre><h2>Text (preview)</h2><pre>{esc(text_preview(message))}</pre>"
    return about + _store_actions(name, item, admin, csrf) + Markup(text)


def decoded_subject(message: EmailMessage) -> str:
    """The Subject with its RFC 2047 encoded words decoded (as text: it is escaped like any value)."""
    try:
        return str(message.get("Subject", ""))
    except Exception:  # an undecodable field is shown as stored, in the header section
        return ""


def text_preview(message: EmailMessage) -> str:
    """The text/plain parts as text; any other part is named, never shown (no HTML is rendered)."""
    out: list[str] = []
    size = 0
    for part in message.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        if kind != "text/plain" or part.get_filename():
            out.append(f"[{kind} part{' ' + part.get_filename() if part.get_filename() else ''} not shown]")
            continue
        try:
            payload = part.get_payload(decode=True) or b""
            text = payload.decode(part.get_content_charset() or "utf-8", "replace")
        except (LookupError, ValueError):
            text = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
        out.append(text[: PREVIEW_BYTES - size])
        size += len(out[-1])
        if size >= PREVIEW_BYTES:
            out.append("[preview truncated]")
            break
    return "\n".join(out)


def log_page(lines: list[str], filters: dict[str, str], follow: bool) -> Markup:
    levels = "".join(f'<option value="{v}"{" selected" if filters["level"] == v else ""}>{t}</option>'
                     for v, t in (("", "any"), ("E", "error"), ("W", "warning"), ("I", "info"), ("D", "debug")))
    form = (f'<form method="get" action="/log"><label>Queue ID <input name="qid" value="{esc(filters["qid"])}"></label> '
            f'<label>Event <input name="event" value="{esc(filters["event"])}"></label> '
            f'<label>Level <select name="level">{levels}</select></label> '
            f'<label><input type="checkbox" name="follow" value="1"{" checked" if follow else ""}> follow</label> '
            f'<button type="submit">Show</button></form>')
    return Markup(form + f"<pre>{esc(chr(10).join(lines))}</pre><p>{len(lines)} line(s)</p>")


CHART_WIDTH, CHART_HEIGHT = 720, 160


def chart(title: str, series: dict[str, list[int]]) -> Markup:
    """One inline SVG line chart of every series (drawn here, no script), and a table of their totals."""
    points = max((len(v) for v in series.values()), default=0)
    top = max((max(v) for v in series.values() if v), default=0) or 1
    step = CHART_WIDTH / max(1, points - 1)
    lines = []
    for index, (name, values) in enumerate(series.items()):
        coords = " ".join(f"{i * step:.1f},{CHART_HEIGHT - v * CHART_HEIGHT / top:.1f}" for i, v in enumerate(values))
        lines.append(f'<polyline class="s{index}" points="{coords}"><title>{esc(name)}</title></polyline>')
    svg = (f'<svg class="chart" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
           f'role="img" aria-label="{esc(title)}">{"".join(lines)}</svg>')
    legend = table(("Series", "Total", "Peak"),
                   [(Markup(f'<span class="key s{i}">{esc(name)}</span>'), sum(v), max(v, default=0))
                    for i, (name, v) in enumerate(series.items())], numeric=(1, 2))
    return Markup(f"<h2>{esc(title)}</h2>{svg}") + legend


def stats_page(snap: dict[str, Any], by_minute: dict[str, list[int]], by_hour: dict[str, list[int]]) -> Markup:
    tops = Markup("")
    for title, rows in snap["top"].items():
        tops += Markup(f"<h2>Top {esc(title)} since start</h2>") + table(("", "Count"), rows, numeric=(1,))
    return (chart("Last 24 hours, per minute", by_minute) + chart("Last 30 days, per hour", by_hour) + tops
            + Markup("<h2>Counters</h2>") + table(("Counter", "Value"), sorted(snap["counters"].items()), numeric=(1,)))


_HASH_VALUE = re.compile(r"(pbkdf2_sha256\$\d+\$)\S+")


def config_page(path: str, text: str, admin: bool, csrf: str, problems: list[str] | None = None) -> Markup:
    """The configuration file; for the admin an editable copy to check (-k) and the reload button.
    A read-only user sees the password hashes hidden."""
    if not admin:
        hidden = _HASH_VALUE.sub(r"\1(hidden)", text)
        return Markup(f"<p>{esc(path)}</p><pre>{esc(hidden)}</pre>")
    result = Markup("")
    if problems is not None:
        result = notice("Config OK" if not problems else f"{len(problems)} problem(s):")
        result += Markup("<pre>" + esc("\n".join(problems)) + "</pre>") if problems else Markup("")
    check = (f'<form method="post" action="/config/check"><input type="hidden" name="csrf" value="{esc(csrf)}">'
             f'<p><textarea name="text" rows="30" cols="110" spellcheck="false">{esc(text)}</textarea></p>'
             f'<p><button type="submit">Check (-k)</button></p></form>')
    return (result + Markup(f"<p>{esc(path)}: edit a copy below and check it; the file itself is changed on the "
                            f"server only. </p>") + button("/config/reload", {}, "Reload the configuration file", csrf)
            + Markup(check))


def updates_page(run: Any, report: str, source: str, spam: dict[str, str], admin: bool, csrf: str) -> Markup:
    """The installed spam database, the update source, the last run from here and the report file."""
    facts = table(("", ""), [("Spam database", f"{spam['version']} ({spam['date']})"),
                             ("UpdateServerUrl", source or "(not set)")])
    action = button("/updates/run", {}, "Run keepup2date now", csrf) if admin else Markup("")
    last = Markup("<p>No run from the console since the gateway started.</p>")
    if run is not None:
        last = Markup(f"<h2>Last run from the console</h2><p>Started {esc(_when(run.started))}: "
                      f"<strong>{esc(run.outcome)}</strong></p><pre>{esc(run.output)}</pre>")
    report_part = Markup(f"<h2>Report file</h2><pre>{esc(report)}</pre>") if report else Markup("")
    return facts + action + last + report_part


def metric_kind(name: str) -> str:
    return "gauge" if name.endswith(("_current", "_maximum")) else "counter"


def _label(value: str) -> str:
    """A label value in the exposition format: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(snap: dict[str, Any], depth: dict[str, int], clamd: list[tuple[str, bool, str]], version: str) -> str:
    """Prometheus text exposition format 0.0.4: every counter, the switches, queue depth per state."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, int | float]]) -> None:
        lines.extend((f"# HELP smtpgw_{name} {help_text}", f"# TYPE smtpgw_{name} {kind}"))
        lines.extend(f"smtpgw_{name}{labels} {value if isinstance(value, int) else repr(float(value))}"
                     for labels, value in samples)

    counters = dict(snap["counters"], mta_stored_messages_current=sum(depth.values()))
    for name, value in sorted(counters.items()):
        metric(name, metric_kind(name), f"statistics counter {name} (kmg-spec 7.2)", [("", value)])
    metric("queue_messages", "gauge", "messages in the queue per state",
           [(f'{{state="{state}"}}', count) for state, count in depth.items()])
    for key in ("receiving", "sending", "scanning"):
        metric(key, "gauge", f"1 when {key} is switched on", [("", 1 if snap[key] else 0)])
    for name, histogram in snap["latency"].items():
        samples = [(f'_bucket{{le="{bound}"}}', count) for bound, count in histogram.cumulative()]
        samples += [("_sum", histogram.total), ("_count", sum(histogram.counts))]
        metric(f"{name}_seconds", "histogram", HISTOGRAMS[name], samples)
    for name, value in sorted(snap["dns"].items()):
        metric(f"dns_{name}_total", "counter", f"DNS resolver: {name.replace('_', ' ')} (since start or reload)",
               [("", value)])
    metric("clamd_up", "gauge", "1 when the clamd server answers",
           [(f'{{address="{_label(address)}"}}', 1 if up else 0) for address, up, _ in clamd])
    metric("uptime_seconds", "gauge", "seconds since the gateway started", [("", int(time.time() - snap["started"]))])
    metric("build_info", "gauge", "the running version", [(f'{{version="{version}"}}', 1)])
    return "\n".join(lines) + "\n"
