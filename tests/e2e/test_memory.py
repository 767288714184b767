"""Long-run stability: after a load, the main process holds no more than before it (issue: memory
grew by about 5.5 KB with every message). Measured with the gateway's own ``.c_memory`` report."""

from __future__ import annotations

import smtplib
import subprocess

from tests.support.components import require
from tests.support.net import free_port, wait_until

MESSAGES = 2000
WARMUP = 100
# Objects the main process may hold after the load beyond what it held before: a cached outgoing
# connection, a session closing, caches already full. The leak this guards against kept about 27
# objects per message (54,000 for this load).
OBJECT_TOLERANCE = 1500
PER_MESSAGE_REGISTRIES = ("sessions", "sessions_per_ip", "scanner_waiting", "scanner_envelopes", "scanner_inflight",
                          "scanner_scanning", "scanner_held_mail", "scanner_retries", "sender_schedule",
                          "sender_envelopes", "sender_inflight", "sender_concluding")


def send_load(source: str, port: int, count: int) -> None:
    subprocess.run([source, "-s", "20", "-m", str(count), "-l", "2048", "-f", "load@src.test", "-t", "rcpt@example.test",
                    f"127.0.0.1:{port}"], check=True, timeout=300, stdout=subprocess.DEVNULL)


def test_after_a_load_the_main_process_holds_what_it_held_before(make_gateway, sink):
    source = require("smtp-source", "postfix")
    gw = make_gateway(sink.port, extra={
        "smtpgw.limits": [("IncomingSessions", "256"), ("MaximalIncomingSessionsPerIP", "256")],
        "smtpgw.options": [("LogLevel", "info")],
    })
    send_load(source, gw.port, WARMUP)  # modules imported, spare files made, caches filled
    sink.wait_for(WARMUP, 60)
    wait_until(lambda: not gw.queued(), 30, "the warm-up to leave the queue")
    before = gw.memory_report()

    send_load(source, gw.port, MESSAGES)
    sink.wait_for(WARMUP + MESSAGES, 240)
    wait_until(lambda: not gw.queued(), 30, "the load to leave the queue")
    after = gw.memory_report()

    assert after["gc_objects"] <= before["gc_objects"] + OBJECT_TOLERANCE, (before["gc_by_type"], after["gc_by_type"])
    assert {name: after["registries"][name] for name in PER_MESSAGE_REGISTRIES} == dict.fromkeys(PER_MESSAGE_REGISTRIES, 0)
    assert after["registries"]["loop_timers"] <= before["registries"]["loop_timers"] + 5
    # the empty queue files made ahead of need are open descriptors too; their number is bounded
    # but varies with the load just ended (Committer.SPARES)
    assert busy_fds(after) <= busy_fds(before) + 5


def busy_fds(report: dict) -> int:
    return report["open_fds"] - report["registries"]["queue_spare_files"]


def test_unreachable_hops_remembered_are_bounded(make_gateway):
    closed = [free_port(), free_port()]
    gw = make_gateway(None, replace={"smtpgw.forward": [
        ("ForwardRoute", f"*@one.test [127.0.0.1:{closed[0]}]"), ("ForwardRoute", f"*@two.test [127.0.0.1:{closed[1]}]")]},
        extra={"smtpgw.resolve": [("UnreachableCacheSize", "1")]})
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("a@example.test", ["x@one.test"], b"Subject: one\r\n\r\nhi\r\n")
        client.sendmail("a@example.test", ["x@two.test"], b"Subject: two\r\n\r\nhi\r\n")
    gw.wait_log(r"status=deferred", 30, count=2)
    assert gw.memory_report()["registries"]["sender_unreachable"] == 1


def test_a_deferred_message_waits_on_disk_not_in_memory(make_gateway, sink):
    sink.replies["RCPT"] = ["451 4.3.0 try again later"]
    gw = make_gateway(sink.port)
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("a@example.test", ["x@example.test"], b"Subject: later\r\n\r\nhi\r\n")
    gw.wait_log(r"status=deferred", 30)
    wait_until(lambda: gw.queued("QUE"), 10, "the record back in QUE")
    registries = gw.memory_report()["registries"]
    assert (registries["sender_schedule"], registries["sender_envelopes"]) == (1, 0)


def test_the_gateway_s_processes_run_without_site_packages_and_workers_without_openssl(make_gateway, sink, clamd):
    """The main process (the launcher runs itself again), its incoming process and its scanner workers
    are ``python3 -S -s`` (smtpgw.child_command): no site packages imported into any of them; a scanner
    worker, which speaks no TLS, maps no libcrypto (it hashes with the interpreter's own SHA code)."""
    gw = make_gateway(sink.port, extra={
        "smtpgw.limits": [("IncomingProcesses", "2")],
        "smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
        "smtpgw.policy": [("Check", "true"), ("NotifyAdmin", "none"), ("NotifyRecipient", "none")],
    })
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
        client.sendmail("a@src.test", ["rcpt@example.test"], b"Subject: scanned\r\n\r\nbody\r\n")
    sink.wait_for(1, 60)
    with open(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    roles = {}
    for pid in [gw.proc.pid] + children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        assert b"-S" in args and b"-s" in args, args
        roles[pid] = b"smtpgw.scan.job" in args
    workers = [pid for pid, worker in roles.items() if worker]
    assert workers and len(children) > len(workers)  # the workers and the incoming process
    for pid in workers:
        with open(f"/proc/{pid}/maps") as f:
            assert "libcrypto" not in f.read()
