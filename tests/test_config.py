"""smtpgw.conf loading: the sample and the minimal contract config, every error class
with its exact FILE:LINE message, file: includes, groups and check_config."""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smtpgw.config import SCHEMA, ConfigError, check_config, load_config
from tests.support.tls import make_certificate

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "smtpgw.conf.sample"
MINIMAL = ROOT / "tests" / "data" / "config" / "minimal.conf"


def write(folder: Path, text: str, name: str = "smtpgw.conf") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def minimal_with(folder: Path, extra: str, name: str = "smtpgw.conf") -> Path:
    """The minimal config with ``extra`` lines appended (line 21 onwards)."""
    return write(folder, MINIMAL.read_text() + extra, name)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def test_sample_loads_and_documents_every_parameter() -> None:
    config = load_config(SAMPLE)
    assert config.network.ListenOn == [("127.0.0.1", 2525)]
    assert [route.destination for route in config.forward.ForwardRoute] == [("host", "127.0.0.1", 2526)]
    assert config.path.QueuePath == str(ROOT / "var" / "queue")
    assert config.policy.QuarantinePath == str(ROOT / "var" / "quarantine")
    assert config.options.LogFile == str(ROOT / "var" / "log" / "smtpgw.log")
    assert config.ave.ClamdAddress == ["unix:/var/run/clamav/clamd.ctl"]
    assert config.antispam.SpamSubjectPrefix == "[SPAM] "
    assert config.policy.Check is True
    text = SAMPLE.read_text()
    undocumented = [p.key for p in SCHEMA if not re.search(rf"^#?{p.key}=", text, re.M)]
    assert undocumented == []


def test_sample_matches_the_schema_defaults() -> None:
    """Every parameter the sample sets to a default value really is that default."""
    sample = load_config(SAMPLE)
    defaults = load_config(MINIMAL)
    for section in ("limits", "timeouts", "resolve", "ave", "updater_options", "updater_report"):
        for key, value in vars(getattr(defaults, section)).items():
            if not key.startswith("_"):
                assert getattr(getattr(sample, section), key) == value, (section, key)
    for key in ("ActionDisinfected", "ActionProtected", "BlockMessage", "NotifyAdmin", "NotifySender",
                "SaveInQB", "AddXHeaders", "ActionSpam", "ActionProbableSpam"):
        assert getattr(sample.policy, key) == getattr(defaults.policy, key), key


def test_minimal_contract_config_and_defaults() -> None:
    config = load_config(MINIMAL)
    folder = str(MINIMAL.parent)
    assert config.source == str(MINIMAL) and config.folder == folder
    assert config.network.Hostname == "gw.example.test"
    assert config.network.ProtectedDomains == ["example.test"]
    assert config.network.TLSCertificateFile is None
    assert config.path.ControlPath == os.path.join(folder, "var", "control")
    assert config.options.StatFilename == os.path.join(folder, "var", "control", "stats")
    assert config.options.LogFile is None and config.options.LogLevel == "info"
    assert config.limits.MaximalIncomingMessageSize == 10240
    assert config.limits.MaximalJunkCommands == 100 and config.limits.MaximalIncomingErrors == 20
    assert config.timeouts.MinimalBackoffTime == 1800
    assert config.resolve.IONetworkTimeout == 5 and config.resolve.Nameserver == []
    assert config.ave.MaximalArchiveDepth == 8 and config.ave.MaximalExpandedSize == 102400
    assert config.antispam.SpamDetection == "standard"
    assert config.base.BasesPath == str(ROOT / "smtpgw" / "bases")
    assert config.locale.DateFormat == "%Y-%m-%d"
    assert config.updater_report.ReportLevel == 3
    policy = config.policy
    assert policy.name == "policy"
    assert (policy.ActionDisinfected, policy.ActionInfected, policy.ActionProtected) == ("cure", "remove", "pass")
    assert policy.BlockMessage == {"infected", "suspicious", "protected", "error"}
    assert policy.NotifyRecipient == {"disinfected", "infected", "suspicious", "protected", "error"}
    assert policy.NotifySender == frozenset()
    assert policy.IncludeByName == [] and policy.AddXHeaders is True
    assert config.groups == [] and config.group_for("a@x.test", "b@example.test", "127.0.0.1") is policy
    assert config.network.where("Hostname") == f"{MINIMAL}:3"
    assert config.limits.where("IncomingSessions") is None
    rule = config.access.RelayRule[1]
    assert (rule.text, rule.where) == ("allow from any to *@example.test", f"{MINIMAL}:8")


def test_check_config_prints_ok_or_problems(tmp_path: Path) -> None:
    out = io.StringIO()
    assert check_config(MINIMAL, out) == 0
    assert out.getvalue() == "Config OK !\n"
    bad = minimal_with(tmp_path, "[smtpgw.limits]\nIncomingSessions=0\nOutgoingSessions=x\n")
    out = io.StringIO()
    assert check_config(bad, out) == 1
    assert out.getvalue().splitlines() == [
        f"{bad}:22: IncomingSessions: 0 is out of range 1-1024",
        f"{bad}:23: OutgoingSessions: 'x' is not a whole number",
    ]


def test_check_config_from_a_shell(tmp_path: Path) -> None:
    good = minimal_with(tmp_path, "[smtpgw.policy]\n")  # a section may be opened again
    code = f"import sys; from smtpgw.config import check_config; sys.exit(check_config({str(good)!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "Config OK !\n"
    missing = write(tmp_path, "[smtpgw.network]\nHostname=gw.example.test\n", "broken.conf")
    run = subprocess.run([sys.executable, "-c", code.replace(str(good), str(missing))], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert f"{missing}:1: [smtpgw.network]: missing required key Postmaster" in run.stdout.splitlines()


# Each case: lines appended to the minimal config (starting at line 21), then the
# exact problems expected; "{f}" stands for the file's path.
ERRORS = {
    "unknown key, did you mean": (
        "[smtpgw.limits]\nIncommingSessions=5\n",
        ["{f}:22: unknown key 'IncommingSessions' in [smtpgw.limits]; did you mean 'IncomingSessions'?"]),
    "key of another section": (
        "[smtpgw.limits]\nReadTimeout=5\n",
        ["{f}:22: unknown key 'ReadTimeout' in [smtpgw.limits]; it belongs in [smtpgw.timeouts]"]),
    "unknown section": (
        "[smtpgw.timeout]\nReadTimeout=5\n",
        ["{f}:21: unknown section [smtpgw.timeout]; did you mean [smtpgw.timeouts]?"]),
    "misspelt group header": (
        "[smtpgw.group sales]\n",
        ["{f}:21: unknown section [smtpgw.group sales]; did you mean [smtpgw.group:NAME]?"]),
    "bad boolean": (
        "[smtpgw.ave]\nCure=maybe\n",
        ["{f}:22: Cure: 'maybe' is not a boolean (true/false, yes/no, y/n, 1/0)"]),
    "out of range with unit": (
        "[smtpgw.limits]\nMaximalIncomingMessageSize=10\n",
        ["{f}:22: MaximalIncomingMessageSize: 10 is out of range 64-204800 KB"]),
    "float out of range": (
        "[smtpgw.antispam]\nDNSBlackListWeight=1.5\n",
        ["{f}:22: DNSBlackListWeight: 1.5 is out of range 0-1"]),
    "bad choice": (
        "[smtpgw.policy]\nActionInfected=cure\n",
        ["{f}:22: ActionInfected: 'cure' is not one of pass, remove, placeholder"]),
    "bad status list": (
        "[smtpgw.policy]\nBlockMessage=infected, clean\n",
        ["{f}:22: BlockMessage: 'clean' is not a status "
         "(disinfected, infected, suspicious, protected, error, filtered, or all, none)"]),
    "duplicate key": (
        "[smtpgw.network]\nHostname=other.example.test\n",
        ["{f}:22: duplicate Hostname in [smtpgw.network] (first set at {f}:3)"]),
    "bad rule syntax": (
        "[smtpgw.access]\nRelayRule=allow 10.0.0.0/8 to *\n",
        ["{f}:22: RelayRule: expected 'allow|deny from <ip>|<ip mask>|any|file:<path> to "
         "<recipient mask>|file:<path>', got 'allow 10.0.0.0/8 to *'"]),
    "bad rule verb": (
        "[smtpgw.access]\nRelayRule=permit from any to *\n",
        ["{f}:22: RelayRule: 'permit' is neither allow nor deny (RelayRule=permit from any to *)"]),
    "bad rule address": (
        "[smtpgw.access]\nRelayRule=allow from 10.0.0.256/8 to *\n",
        ["{f}:22: RelayRule: '10.0.0.256/8' is not an IP mask "
         "(x.x.x.x, x.x.x.x/n, x.x.x.x/x.x.x.x, an IPv6 address or network, or any)"]),
    "domain where an address mask is needed": (
        "[smtpgw.access]\nRelayRule=allow from any to example.test\n",
        ["{f}:22: RelayRule: 'example.test' has no '@'; did you mean '*@example.test'?"]),
    "condition of another rule kind": (
        "[smtpgw.access]\nHeloRule=deny from has_mx to *\n",
        ["{f}:22: HeloRule: 'has_mx' is not a HeloRule condition (has_ip, no_ip, same_ip, diff_ip, any)"]),
    "bad route": (
        "[smtpgw.forward]\nForwardRoute=*@x.test 127.0.0.1:2526\n",
        ["{f}:22: ForwardRoute: '127.0.0.1:2526' is not a domain; a host needs brackets: [127.0.0.1:2526]"]),
    "missing include file": (
        "[smtpgw.access]\nRelayRule=allow from file:lists/nets.list to *\n",
        ["{f}:22: cannot read include file {d}/lists/nets.list: No such file or directory"]),
    "file: where not allowed": (
        "[locale]\nDateFormat=file:formats.list\n",
        ["{f}:22: DateFormat: file: lists are not allowed in [locale]"]),
    "file: for a single value": (
        "[smtpgw.antispam]\nSpamSubjectPrefix=file:prefix.txt\n",
        ["{f}:22: SpamSubjectPrefix: file: lists are not allowed for SpamSubjectPrefix (not a list)"]),
    "file: inside a comma list": (
        "[smtpgw.access]\nDNSBlackList=bl.example.test, file:zones.list\n",
        ["{f}:22: DNSBlackList: file: must be the whole value, not an item of a comma list"]),
    "ListenOn without port": (
        "[smtpgw.network]\nListenOn=127.0.0.2\n",
        ["{f}:22: ListenOn: '127.0.0.2' needs a port (ip:port or [ipv6]:port)"]),
    "ListenOn with a name": (
        "[smtpgw.network]\nListenOn=localhost:25\n",
        ["{f}:22: ListenOn: 'localhost' is not an IP address (IPv6 goes in brackets: [::1]:port)"]),
    "ListenOn bare IPv6 with port": (
        "[smtpgw.network]\nListenOn=::1:25\n",
        ["{f}:22: ListenOn: '::1:25' needs a port (ip:port or [ipv6]:port)"]),
    "ListenOn bad port": (
        "[smtpgw.network]\nListenOn=[::1]:65536\n",
        ["{f}:22: ListenOn: '65536' is not a port (1-65535)"]),
    "ListenOn twice": (
        "[smtpgw.network]\nListenOn=127.0.0.1:2525\n",
        ["{f}:2: ListenOn: 127.0.0.1:2525 given twice"]),
    "TLS half-set": (
        "[smtpgw.network]\nTLSCertificateFile=gw.crt\n",
        ["{f}:22: TLSCertificateFile is set but TLSKeyFile is not (set both or neither)"]),
    "TLS files missing": (
        "[smtpgw.network]\nTLSCertificateFile=gw.crt\nTLSKeyFile=gw.key\n",
        ["{f}:22: TLSCertificateFile: cannot read {d}/gw.crt", "{f}:23: TLSKeyFile: cannot read {d}/gw.key"]),
    "UnreachableTTL not below MinimalBackoffTime": (
        "[smtpgw.resolve]\nUnreachableTTL=1800\n",
        ["{f}:22: UnreachableTTL (1800) must be less than MinimalBackoffTime (1800)"]),
    "backoff times crossed": (
        "[smtpgw.timeouts]\nMinimalBackoffTime=7200\nMaximalBackoffTime=3600\n",
        ["{f}:22: MinimalBackoffTime (7200) must not exceed MaximalBackoffTime (3600)"]),
    "group without masks": (
        "[smtpgw.group:sales]\nCheck=false\n",
        ["{f}:21: [smtpgw.group:sales]: set Senders or Recipients (or both)"]),
    "duplicate group": (
        "[smtpgw.group:a]\nSenders=*@a.test\n[smtpgw.group:A]\nSenders=*@b.test\n",
        ["{f}:23: duplicate section [smtpgw.group:A] (first at {f}:21)"]),
    "unknown user": (
        "[smtpgw.options]\nUser=no-such-user-smtpgw\n",
        ["{f}:22: User: no such user 'no-such-user-smtpgw'"]),
    "garbage line": (
        "just words\n",
        ["{f}:21: expected [section] or Key=value, got 'just words'"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_messages(tmp_path: Path, case: str) -> None:
    extra, expected = ERRORS[case]
    path = minimal_with(tmp_path, extra)
    assert problems_of(path) == [line.format(f=path, d=tmp_path) for line in expected]


def test_missing_required_keys_name_their_section(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing but\n[smtpgw.network]\nHostname=gw.example.test\n\n")
    problems = problems_of(path)
    assert problems == [
        f"{path}:2: [smtpgw.network]: missing required key Postmaster",
        f"{path}:2: [smtpgw.network]: missing required key ProtectedDomains",
        f"{path}:4: [smtpgw.path]: missing required key QueuePath",
        f"{path}:4: [smtpgw.path]: missing required key ControlPath",
        f"{path}:4: [smtpgw.policy]: missing required key AdminNotifyAddress",
        f"{path}:4: [smtpgw.policy]: missing required key NotifyFromAddress",
        f"{path}:4: [smtpgw.policy]: missing required key BackupPath",
        f"{path}:4: [smtpgw.policy]: missing required key QuarantinePath",
    ]


def test_empty_required_value(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.read_text().replace("Postmaster=postmaster@example.test", "Postmaster ="))
    assert problems_of(path) == [f"{path}:4: Postmaster: empty value; [smtpgw.network] requires it"]


def test_every_problem_is_collected(tmp_path: Path) -> None:
    path = write(tmp_path, "Orphan=1\n[smtpgw.network]\nListenOn=1.2.3.4\nHostname=-bad-\nPostmaster=x\n"
                           "ProtectedDomains=a@b\n[nowhere]\nKey=ignored\n")
    problems = problems_of(path)
    assert problems[:6] == [
        f"{path}:1: Orphan is outside any [section]",
        f"{path}:3: ListenOn: '1.2.3.4' needs a port (ip:port or [ipv6]:port)",
        f"{path}:4: Hostname: '-bad-' is not a host or domain name",
        f"{path}:5: Postmaster: 'x' is not a mail address (local@domain)",
        f"{path}:6: ProtectedDomains: 'a@b' is an address; ProtectedDomains takes domains (masks allowed)",
        f"{path}:7: unknown section [nowhere]",
    ]
    assert len(problems) == 6 + 6  # and the six required keys of [smtpgw.path] and [smtpgw.policy]


def test_unreadable_and_undecodable_files(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "absent.conf") == [
        f"{tmp_path / 'absent.conf'}:1: cannot read configuration: No such file or directory"]
    path = tmp_path / "latin1.conf"
    path.write_bytes(MINIMAL.read_bytes() + b"[smtpgw.antispam]\nSpamSubjectPrefix=\xe9t\xe9\n")
    assert problems_of(path) == [f"{path}:22: not valid UTF-8"]


def test_syntax_leniency(tmp_path: Path) -> None:
    text = MINIMAL.read_text().replace("Check=true", "check = Yes").replace("[smtpgw.policy]", "[SMTPGW.Policy]")
    path = write(tmp_path, "\ufeff; a comment\n" + text + "[smtpgw.antispam]\n  SpamSubjectPrefix = \"[spam] \"\n"
                 "WhiteListSenders=*@a.test, *@b.test\nWhiteListSenders=*@c.test\nCheck=N\n"
                 "[smtpgw.path]\nIncomingArchivePath=\n[locale]\nDateFormat=%d/%m/%y # kept\n")
    config = load_config(path)
    assert config.policy.Check is True
    assert config.antispam.SpamSubjectPrefix == "[spam] "
    assert config.antispam.WhiteListSenders == ["*@a.test", "*@b.test", "*@c.test"]
    assert config.antispam.Check is False
    assert config.path.IncomingArchivePath is None
    assert config.locale.DateFormat == "%d/%m/%y # kept"


def test_values_of_each_kind(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "[smtpgw.network]\nListenOn=[::1]:2525, [IPv6:::2]:25\n"
                        "[smtpgw.resolve]\nNameserver=127.0.0.1\nNameserver=[::1]:5353, 127.0.0.2:53\n"
                        "[smtpgw.ave]\nClamdAddress=unix:run/clamd.sock, [::1]:3310, localhost:3310\n"
                        "[smtpgw.options]\nAVStatistics=127.0.0.1:9000\nICheckerDBFilename=ichecker.db\n"
                        "[smtpgw.antispam]\nWhiteListIPs=192.0.2.0/255.255.255.0, ::1\n"
                        "[smtpgw.policy]\nNotifySender=all\nSaveInQB=none\nIncludeByMime=application/*\n"
                        "[updater.options]\nUpdateServerUrl=file:///srv/mirror\n"
                        "[updater.report]\nReportLevel=9\n")
    config = load_config(path)
    assert config.network.ListenOn == [("127.0.0.1", 2525), ("::1", 2525), ("::2", 25)]
    assert config.resolve.Nameserver == [("127.0.0.1", 53), ("::1", 5353), ("127.0.0.2", 53)]
    assert config.ave.ClamdAddress == [f"unix:{tmp_path}/run/clamd.sock", "[::1]:3310", "localhost:3310"]
    assert config.options.AVStatistics == "127.0.0.1:9000"
    assert config.options.ICheckerDBFilename == str(tmp_path / "ichecker.db")
    assert config.antispam.WhiteListIPs == ["192.0.2.0/255.255.255.0", "::1"]
    assert config.policy.NotifySender == {"disinfected", "infected", "suspicious", "protected", "error",
                                          "filtered"}
    assert config.policy.SaveInQB == frozenset()
    assert config.policy.IncludeByMime == ["application/*"]
    assert config.updater_options.UpdateServerUrl == "file:///srv/mirror"
    assert config.updater_report.ReportLevel == 9


def test_file_includes_relative_to_the_config_folder(tmp_path: Path) -> None:
    write(tmp_path, "# protected\nexample.test\n\n*.example.test\n", "etc/lists/domains.list")
    write(tmp_path, "10.1.0.0/16\n# lab\n2001:db8::/32\n", "etc/lists/nets.list")
    write(tmp_path, "*@example.test\npostmaster@*\n", "etc/lists/rcpts.list")
    write(tmp_path, "*@slow.test [127.0.0.1:2527]\n*@mx.test mx.test\n", "etc/lists/routes.list")
    text = MINIMAL.read_text().replace("ProtectedDomains=example.test", "ProtectedDomains=file:lists/domains.list")
    text = text.replace("ForwardRoute=* [127.0.0.1:2526]", "ForwardRoute=file:lists/routes.list\n"
                        "ForwardRoute=* [127.0.0.1:2526]")
    path = write(tmp_path, text + "[smtpgw.access]\nRelayRule=allow from file:lists/nets.list to "
                 "file:lists/rcpts.list\n", "etc/smtpgw.conf")
    config = load_config(path)
    lists = tmp_path / "etc" / "lists"
    assert config.network.ProtectedDomains == ["example.test", "*.example.test"]
    routes = config.forward.ForwardRoute
    assert [(r.mask, r.destination, r.where) for r in routes] == [
        ("*@slow.test", ("host", "127.0.0.1", 2527), f"{lists}/routes.list:1"),
        ("*@mx.test", ("mx", "mx.test"), f"{lists}/routes.list:2"),
        ("*", ("host", "127.0.0.1", 2526), f"{path}:12"),
    ]
    rule = config.access.RelayRule[-1]
    assert [source.text for source in rule.sources] == ["10.1.0.0/16", "2001:db8::/32"]
    assert rule.recipients == ("*@example.test", "postmaster@*")


def test_bad_include_entries_are_reported_at_their_own_lines(tmp_path: Path) -> None:
    write(tmp_path, "ok.test\nbad domain\n# fine\nx@y.test\n", "domains.list")
    write(tmp_path, "10.0.0.0/8\n10.0.0.0/255.0.255.0\n", "nets.list")
    text = MINIMAL.read_text().replace("ProtectedDomains=example.test", "ProtectedDomains=file:domains.list")
    path = write(tmp_path, text + "[smtpgw.access]\nRelayRule=deny from file:nets.list to *\n")
    assert problems_of(path) == [
        f"{tmp_path}/domains.list:2: 'bad domain' is not a domain mask",
        f"{tmp_path}/domains.list:4: 'x@y.test' is an address; ProtectedDomains takes domains (masks allowed)",
        f"{tmp_path}/nets.list:2: '10.0.0.0/255.0.255.0' is not an IP mask "
        "(x.x.x.x, x.x.x.x/n, x.x.x.x/x.x.x.x, an IPv6 address or network, or any)",
    ]


def test_groups_inherit_and_first_match_wins(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "[smtpgw.group:execs]\nRecipients=boss@example.test, cfo@example.test\n"
                        "ActionInfected=placeholder\nIncludeByName=\n"
                        "[smtpgw.group:partners]\nSenders=*@partner.test\nSenders=file:partners.list\n"
                        "Recipients=*@example.test\nCheck=no\n"
                        "[smtpgw.policy]\nIncludeByName=*.exe\nNotifyAdmin=infected\n")
    write(tmp_path, "*@ally.test\n", "partners.list")
    config = load_config(path)
    execs, partners = config.groups
    assert (execs.name, partners.name) == ("execs", "partners")
    assert execs.ActionInfected == "placeholder" and execs.IncludeByName == []
    assert execs.NotifyAdmin == {"infected"} and execs.where("NotifyAdmin") == f"{path}:32"
    assert execs.Senders == ["*"] and execs.Check is True
    assert execs.QuarantinePath == config.policy.QuarantinePath
    assert partners.Senders == ["*@partner.test", "*@ally.test"] and partners.Check is False
    assert config.policy.IncludeByName == ["*.exe"]
    local = "127.0.0.1"  # GroupSendersTrusted by default
    assert config.group_for("boss@partner.test", "boss@example.test", local) is execs  # file order
    assert config.group_for("", "CFO@Example.Test", local) is execs  # omitted Senders matches <>
    assert config.group_for("x@ally.test", "sales@example.test", local) is partners
    assert config.group_for("", "sales@example.test", local) is config.policy
    assert config.group_for("x@other.test", "sales@example.test", local) is config.policy


def test_a_groups_senders_are_believed_only_from_trusted_clients(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "[smtpgw.group:internal]\nSenders=*@example.test\nCheck=false\n"
                        "[smtpgw.group:anyone]\nSenders=*@*\nRecipients=postmaster@example.test\n"
                        "[smtpgw.group:partner]\nSenders=*@partner.test\nGroupSendersTrusted=198.51.100.0/24\n")
    config = load_config(path)
    internal, anyone, partner = config.groups
    assert internal.GroupSendersTrusted == ["127.0.0.0/8", "::1"]  # the default: this host only
    for client in ("127.0.0.1", "::1", "::ffff:127.0.0.2", "[127.0.0.1]"):
        assert config.group_for("ceo@example.test", "x@example.test", client) is internal, client
    for client in ("192.0.2.1", "198.51.100.7", "", None, "unix-socket"):  # the sender is the client's word
        assert config.group_for("ceo@example.test", "x@example.test", client) is config.policy, client
    assert config.group_for("a@b.test", "postmaster@example.test", "192.0.2.1") is anyone  # *@* admits anyone
    assert config.group_for("a@partner.test", "x@example.test", "198.51.100.7") is partner
    assert config.group_for("a@partner.test", "x@example.test", "127.0.0.1") is config.policy


def test_group_senders_trusted_is_inherited_from_the_policy(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "[smtpgw.policy]\nGroupSendersTrusted=10.0.0.0/8, any\n"
                        "[smtpgw.group:internal]\nSenders=*@example.test\n")
    config = load_config(path)
    assert config.groups[0].GroupSendersTrusted == ["10.0.0.0/8", "any"]
    assert config.group_for("ceo@example.test", "x@example.test", "203.0.113.9") is config.groups[0]
    bad = minimal_with(tmp_path, "[smtpgw.group:internal]\nSenders=*@example.test\nGroupSendersTrusted=10.0.0.0/33\n")
    assert problems_of(bad) == [f"{bad}:23: GroupSendersTrusted: '10.0.0.0/33' is not an IP mask "
                                "(x.x.x.x, x.x.x.x/n, x.x.x.x/x.x.x.x, an IPv6 address or network, or any)"]


def test_groups_set_or_inherit_the_anti_spam_keys(tmp_path: Path) -> None:
    path = minimal_with(tmp_path, "[smtpgw.antispam]\nSpamDetection=soft\nWhiteListSenders=*@partner.test\n"
                        "[smtpgw.policy]\nNotifyAdmin=infected, spam\nNotifyRecipient=all\n"
                        "[smtpgw.group:strict]\nRecipients=*@strict.test\nSpamDetection=hard\n"
                        "SpamSubjectPrefix=\"[junk] \"\nBlackListSenders=*@spammer.test\nNotifyAdmin=probable_spam\n"
                        "[smtpgw.group:plain]\nRecipients=*@plain.test\n")
    config = load_config(path)
    strict, plain = config.groups
    assert (config.policy.SpamDetection, strict.SpamDetection, plain.SpamDetection) == ("soft", "hard", "soft")
    assert strict.SpamSubjectPrefix == "[junk] " and plain.SpamSubjectPrefix == "[SPAM] "
    assert strict.WhiteListSenders == plain.WhiteListSenders == ["*@partner.test"] and plain.BlackListSenders == []
    assert strict.BlackListSenders == ["*@spammer.test"]
    assert strict.where("SpamDetection") == f"{path}:29" and plain.where("SpamDetection") == f"{path}:22"
    assert config.policy.NotifyAdmin == {"infected", "spam"} and strict.NotifyAdmin == {"probable_spam"}
    assert {"spam", "probable_spam", "infected"} <= plain.NotifyRecipient  # all: the spam words too
    for key in ("NotifySender", "BlockMessage", "SaveInQB"):  # a notice to a spam's sender is backscatter
        bad = minimal_with(tmp_path, f"[smtpgw.policy]\n{key}=spam\n")
        assert problems_of(bad) == [f"{bad}:22: {key}: 'spam' is not a status "
                                    "(disinfected, infected, suspicious, protected, error, filtered, or all, none)"]


def test_tls_pair_is_loaded(tmp_path: Path) -> None:
    certificate, key = make_certificate(str(tmp_path))
    path = minimal_with(tmp_path, f"[smtpgw.network]\nTLSCertificateFile={Path(certificate).name}\n"
                                  f"TLSKeyFile={key}\n")
    config = load_config(path)
    assert (config.network.TLSCertificateFile, config.network.TLSKeyFile) == (certificate, key)
    Path(key).write_text("not a key\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:22: TLSCertificateFile/TLSKeyFile: not a usable certificate and key")


def test_problem_list_is_capped(tmp_path: Path) -> None:
    write(tmp_path, "".join(f"bad domain {n}\n" for n in range(1500)), "many.list")
    text = MINIMAL.read_text().replace("ProtectedDomains=example.test", "ProtectedDomains=file:many.list")
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 1001
    assert problems[-1] == f"{tmp_path / 'smtpgw.conf'}:20: 500 more problems not shown"


def test_config_crosses_process_boundaries() -> None:
    config = load_config(SAMPLE)
    copy = pickle.loads(pickle.dumps(config))
    assert copy.network.where("Hostname") == config.network.where("Hostname")
    assert copy.group_for("a@x.test", "b@example.test", "127.0.0.1").name == "policy"
    assert copy.access.RelayRule == config.access.RelayRule
    with pytest.raises(AttributeError, match=r"\[smtpgw.limits\] has no parameter 'Nope'"):
        copy.limits.Nope  # noqa: B018


def test_mangled_configs_raise_only_config_error(tmp_path: Path) -> None:
    """Random damage to the sample: every outcome is a Config or a ConfigError."""
    rng = random.Random(2024)
    lines = SAMPLE.read_text().splitlines()
    noise = "[]=:,*?@./\\ \t#;\"'file:any0123456789xyz-_()$^+%\x00\x7f\u00e9"
    write(tmp_path, "a.test\n*@x.test\n10.0.0.0/8\n", "l.list")
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        mangled = list(lines)
        for _ in range(rng.randint(1, 5)):
            index = rng.randrange(len(mangled))
            key = mangled[index].lstrip("#").split("=")[0]
            junk = "".join(rng.choice(noise) for _ in range(rng.randint(0, 12)))
            mangled[index] = rng.choice([f"{key}={junk}", f"{key}=file:l.list", junk + mangled[index],
                                         mangled[index].lstrip("#"), ""])
        path = write(tmp_path, "\n".join(mangled))
        try:
            load_config(path)
            outcomes["ok"] += 1
        except ConfigError as error:
            assert error.problems and all(re.match(r".+:\d+: ", line) for line in error.problems)
            outcomes["error"] += 1
    assert outcomes["ok"] and outcomes["error"]
