"""smtpgw.conf: the configuration grammar as one schema table, loading and checking.

Owns: reading smtpgw.conf (kmg-spec §3) into a ``Config`` whose sections are
attributes named after the part after ``smtpgw.`` (``cfg.limits``, ...; ``[path]``
is ``cfg.base``, ``[locale]`` is ``cfg.locale``, ``[updater.X]`` is
``cfg.updater_X``) and whose parameters keep the reference's names; every
problem found, collected as ``FILE:LINE: message``; group selection.
Must never: stop at the first problem, start anything, or write any file.

Syntax: ``[section]`` headers; ``Key=value`` lines (blanks around ``=`` and
the value are ignored; keys and section names are case-insensitive);
whole-line ``#`` and ``;`` comments; a text value may be put in double quotes
to keep outer spaces (``SpamSubjectPrefix="[SPAM] "``). Table parameters are
repeated on several lines; on one line they also take comma-separated items,
or ``file:<path>`` naming a list file (one item per line, ``#`` comments and
blank lines skipped). ``file:`` is refused in [path], [locale], [updater.*]
and for single-valued keys. Relative paths, ``file:`` ones included, are
relative to the folder of the configuration file. An empty value means "not
set" (the default applies). Booleans: true/false, yes/no, y/n, 1/0.

Groups: ``[smtpgw.group:NAME]`` takes Senders and Recipients (address masks;
an omitted one matches every address, the null sender ``<>`` included) and any
[smtpgw.policy] key; omitted keys are inherited from [smtpgw.policy] (a list
set in a group replaces the policy's list). ``Config.group_for(sender,
recipient, client)`` returns the first group in file order whose masks match both, or
the policy itself (named "policy"). The envelope sender is the client's word: a
group's Senders (unless it admits every sender) is believed only for mail whose
client address falls in the group's ``GroupSendersTrusted`` IP masks (a policy key,
so [smtpgw.policy] sets the default; loopback unless set); from anywhere else
such a group is not chosen.

Our choices where the reference is silent are documented in smtpgw.conf.sample.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pickle
import pwd
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from smtpgw import PACKAGE_DIR
from smtpgw.rules import access, routing
from smtpgw.rules.masks import client_address, match_any, parse_ip_mask
from smtpgw.spool.durable import write_durably

if TYPE_CHECKING:
    from smtpgw.update import signing

# console/auth (hashlib, hmac), update/signing (Ed25519) and urllib.parse are imported by the
# checks that use them, as a file is read: not by a process that only loads a snapshot
# (load_snapshot: the delivery process; unpickling imports a PublicKey's module when one is set).

__all__ = ["SCHEMA", "Config", "ConfigError", "Group", "Param", "Section", "check_config", "load_config"]

MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_LINE = 65536
MAX_TEXT = 4096
MAX_PROBLEMS = 1000
STATUSES = ("disinfected", "infected", "suspicious", "protected", "error", "filtered")
# NotifyAdmin / NotifyRecipient also take the spam verdicts whose ActionSpam / ActionProbableSpam
# stopped the message (block, quarantine); Blacklisted counts as spam. Our extension (kmg-spec §10).
SPAM_NOTICES = ("spam", "probable_spam")
GROUP_PREFIX = "smtpgw.group:"
CONSOLE_PORT = 8025  # [smtpgw.console] ListenOn without a port
ANY_ADDRESS = "*"  # what an omitted Senders / Recipients matches (the reference's *@*)
# whose word on the envelope sender a group's Senders= believes by default: this host only,
# as Postfix's mynetworks_style=host
TRUSTED_BY_DEFAULT = ["127.0.0.0/8", "::1"]


class ConfigError(ValueError):
    """The configuration cannot be used; ``problems`` are ``FILE:LINE: message`` lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --- value kinds: (text, param, where, folder) -> value, ValueError says why not ---------

Parse = Callable[[str, "Param", str, str], Any]


@dataclass(frozen=True)
class Kind:
    name: str
    parse: Parse
    splits: bool = False  # several comma-separated items on one line


_BOOLS = {"true": True, "yes": True, "y": True, "1": True,
          "false": False, "no": False, "n": False, "0": False}


def _bool(text: str, param: Param, where: str, folder: str) -> bool:
    if text.lower() not in _BOOLS:
        raise ValueError(f"'{text}' is not a boolean (true/false, yes/no, y/n, 1/0)")
    return _BOOLS[text.lower()]


def _number(text: str, param: Param, where: str, folder: str) -> int | float:
    pattern, convert = (r"\d{1,9}(\.\d{1,9})?", float) if param.kind is FLOAT else (r"\d{1,12}", int)
    if not re.fullmatch(pattern, text):
        raise ValueError(f"'{text}' is not a {'number' if convert is float else 'whole number'}")
    value = convert(text)
    low, high = (float(bound) for bound in param.range.split()[0].split("-"))
    if not low <= value <= high:
        raise ValueError(f"{text} is out of range {param.range}")
    return value


def _choice(text: str, param: Param, where: str, folder: str) -> str:
    choices = param.range.split("|")
    if text.lower() not in choices:
        raise ValueError(f"'{text}' is not one of {', '.join(choices)}")
    return text.lower()


def _text(text: str, param: Param, where: str, folder: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if len(text) > MAX_TEXT or any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise ValueError(f"value longer than {MAX_TEXT} characters or with control characters")
    return text


def _path(text: str, param: Param, where: str, folder: str) -> str:
    return os.path.normpath(os.path.join(folder, _text(text, param, where, folder)))


def _address(text: str, param: Param, where: str, folder: str) -> str:
    local, at, domain = text.rpartition("@")
    if not at or not re.fullmatch(r"[^\s@<>()\[\],;:\\\"]{1,64}", local) or not (
        routing.is_hostname(domain) or re.fullmatch(r"\[[0-9A-Fa-f:.Iv]+\]", domain)
    ):
        raise ValueError(f"'{text}' is not a mail address (local@domain)")
    return text


def _hostname(text: str, param: Param, where: str, folder: str) -> str:
    if not routing.is_hostname(text):
        raise ValueError(f"'{text}' is not a host or domain name")
    return text.rstrip(".")


def _statuses(accepted: tuple[str, ...]) -> Parse:
    """A status list taking ``accepted`` words, ``all`` (every one of them) or ``none``."""
    def parse(text: str, param: Param, where: str, folder: str) -> frozenset[str]:
        words = [word.lower() for word in re.split(r"[,\s]+", text) if word]
        if words in (["all"], ["none"]):
            return frozenset(accepted) if words == ["all"] else frozenset()
        unknown = [word for word in words if word not in accepted]
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not a status ({', '.join(accepted)}, or all, none)")
        return frozenset(words)
    return parse


def _host_port(text: str, default_port: int | None, names: bool) -> tuple[str, int]:
    """``ip:port`` or ``[ipv6]:port`` (and ``name:port`` when ``names``); the port may be
    omitted when there is a ``default_port``."""
    if text.startswith("["):
        inside, closed, after = text[1:].partition("]")
        if not closed or (after and not after.startswith(":")):
            raise ValueError(f"'{text}' is not [address]:port")
        host, port_text = inside[5:] if inside[:5].lower() == "ipv6:" else inside, after[1:] or None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or ":" in host:
            host, port_text = text, None
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not names or not routing.is_hostname(host):
            kinds = "an IP address or host name" if names else "an IP address"
            raise ValueError(f"'{host}' is not {kinds} (IPv6 goes in brackets: [::1]:port)") from None
    if port_text is not None:
        return host, routing.parse_port(port_text)
    if default_port is None:
        raise ValueError(f"'{text}' needs a port (ip:port or [ipv6]:port)")
    return host, default_port


def _joined(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen(text: str, param: Param, where: str, folder: str) -> tuple[str, int]:
    return _host_port(text, None, names=False)


def _console_listen(text: str, param: Param, where: str, folder: str) -> tuple[str, int]:
    return _host_port(text, CONSOLE_PORT, names=False)


def _user_name(text: str, param: Param, where: str, folder: str) -> str:
    from smtpgw.console import auth as console_auth

    if not console_auth.USER_NAME.fullmatch(text):
        raise ValueError(f"'{text[:40]}' is not a user name (letters, digits, _ . @ -)")
    return text


def _password_hash(text: str, param: Param, where: str, folder: str) -> str:
    from smtpgw.console import auth as console_auth

    problem = console_auth.hash_problem(text)
    if problem:
        raise ValueError(problem)
    return text


def _user_entry(text: str, param: Param, where: str, folder: str) -> tuple[str, str]:
    from smtpgw.console import auth as console_auth

    return console_auth.parse_user_entry(text)


def _nameserver(text: str, param: Param, where: str, folder: str) -> tuple[str, int]:
    return _host_port(text, 53, names=False)


def _clamd(text: str, param: Param, where: str, folder: str) -> str:
    if text[:5].lower() == "unix:":
        return "unix:" + _path(text[5:], param, where, folder)
    return _joined(*_host_port(text, None, names=True))


def _stats_target(text: str, param: Param, where: str, folder: str) -> str:
    if re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}", text):
        return _joined(*_host_port(text, None, names=True))
    return _path(text, param, where, folder)


def _url_or_path(text: str, param: Param, where: str, folder: str) -> str:
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        import urllib.parse

        urllib.parse.urlsplit(text)  # its ValueError (an unclosed [IPv6] host, ...) is this line's problem
        return _text(text, param, where, folder)
    return _path(text, param, where, folder)


def _public_key(text: str, param: Param, where: str, folder: str) -> signing.PublicKey:
    """``ed25519:<base64> [NAME]``, or the path of a ``.pub`` file holding one."""
    from smtpgw.update import signing

    try:
        if text.startswith(signing.PUBLIC_PREFIX):
            return signing.parse_public_key(text)
        return signing.read_public_key(_path(text, param, where, folder))
    except signing.SignatureError as exc:
        raise ValueError(str(exc)) from None


def _account(lookup: Callable[[str], object], what: str) -> Parse:
    def parse(text: str, param: Param, where: str, folder: str) -> str:
        try:
            lookup(text)
        except KeyError:
            raise ValueError(f"no such {what} '{text}'") from None
        return text
    return parse


def _domain_mask(text: str, param: Param, where: str, folder: str) -> str:
    if "@" in text:
        raise ValueError(f"'{text}' is an address; {param.key} takes domains (masks allowed)")
    if not re.fullmatch(r"[A-Za-z0-9*?][A-Za-z0-9*?.-]{0,252}", text):
        raise ValueError(f"'{text}' is not a domain mask")
    return text.rstrip(".").lower()


def _address_mask(text: str, param: Param, where: str, folder: str) -> str:
    return access.recipient_mask(text)


def _name_mask(text: str, param: Param, where: str, folder: str) -> str:
    if param.key.endswith("Mime") and "/" not in text and text.strip("*"):
        raise ValueError(f"'{text}' is not a MIME type mask (type/subtype, e.g. application/*)")
    return _text(text, param, where, folder)


def _ip_mask(text: str, param: Param, where: str, folder: str) -> str:
    return parse_ip_mask(text).text


def _relay_rule(text: str, param: Param, where: str, folder: str) -> access.RelayRule:
    return access.parse_relay_rule(text, where, folder)


def _condition_rule(text: str, param: Param, where: str, folder: str) -> access.ConditionRule:
    return access.parse_condition_rule(param.key, text, where, folder)


def _route(text: str, param: Param, where: str, folder: str) -> routing.Route:
    return routing.parse_route(text, where)


BOOL, INT, FLOAT = Kind("bool", _bool), Kind("int", _number), Kind("float", _number)
CHOICE = Kind("choice", _choice)
LEVEL = Kind("level", lambda text, param, where, folder: int(_choice(text, param, where, folder)))
TEXT, PATH = Kind("text", _text), Kind("path", _path)
ADDRESS, HOST = Kind("address", _address), Kind("hostname", _hostname)
STATUS_LIST = Kind("statuses", _statuses(STATUSES))
NOTICE_LIST = Kind("statuses", _statuses(STATUSES + SPAM_NOTICES))
LISTEN = Kind("ip:port", _listen, splits=True)
NAMESERVER = Kind("ip[:port]", _nameserver, splits=True)
CLAMD = Kind("unix:path|host:port", _clamd, splits=True)
TARGET, URL = Kind("path|host:port", _stats_target), Kind("url|path", _url_or_path)
USER, GROUP = Kind("user", _account(pwd.getpwnam, "user")), Kind("group", _account(grp.getgrnam, "group"))
DOMAINS, ZONES = Kind("domain masks", _domain_mask, True), Kind("zones", _hostname, True)
ADDRESSES = Kind("address masks", _address_mask, splits=True)
NAMES, IPS = Kind("name masks", _name_mask, splits=True), Kind("ip masks", _ip_mask, splits=True)
RELAY, CONDITION = Kind("relay rule", _relay_rule), Kind("condition rule", _condition_rule)
ROUTE = Kind("route", _route)
PUBLIC_KEY = Kind("ed25519:key|path", _public_key)
CONSOLE_LISTEN, USER_NAME = Kind("ip[:port]", _console_listen), Kind("user name", _user_name)
PASSWORD_HASH, ACCOUNT = Kind("password hash", _password_hash), Kind("name:hash", _user_entry)


# --- the schema ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One parameter: ``range`` is ``low-high [unit]`` for numbers, ``a|b|c`` for choices;
    ``flags``: r = repeatable (a list), q = required, f = takes ``file:`` lists."""

    section: str
    key: str
    kind: Kind
    range: str = ""
    default: Any = None
    flags: str = ""

    @property
    def repeatable(self) -> bool:
        return "r" in self.flags

    @property
    def required(self) -> bool:
        return "q" in self.flags

    @property
    def allows_file(self) -> bool:
        return "f" in self.flags


P = Param
_BLOCKED = frozenset({"infected", "suspicious", "protected", "error"})
_NOTIFIED = frozenset({"disinfected", *_BLOCKED})
_ANY_OBJECT = "pass|remove|placeholder"
_SPAM_ACTION = "pass|tag|quarantine|block"
_PERIOD = "60-259200 s"
_LIFETIME = "0-3650 days"  # store lifetimes; 0 keeps items for ever

SCHEMA: tuple[Param, ...] = (
    # section            key                                 kind         range               default   flags
    P("path", "BasesPath", PATH, "", os.path.join(PACKAGE_DIR, "bases")),
    P("path", "TemplatesPath", PATH, "", os.path.join(PACKAGE_DIR, "templates")),
    P("path", "LicensePath", PATH),  # accepted from reference configs; unused
    P("locale", "DateFormat", TEXT, "", "%Y-%m-%d"),
    P("locale", "TimeFormat", TEXT, "", "%H:%M:%S"),
    P("smtpgw.network", "ListenOn", LISTEN, "", [("0.0.0.0", 25)], "rf"),
    P("smtpgw.network", "Hostname", HOST, "", None, "q"),
    P("smtpgw.network", "Postmaster", ADDRESS, "", None, "q"),
    P("smtpgw.network", "ProtectedDomains", DOMAINS, "", [], "rqf"),
    P("smtpgw.network", "TLSCertificateFile", PATH),
    P("smtpgw.network", "TLSKeyFile", PATH),
    P("smtpgw.network", "RequireTLS", BOOL, "", False),
    P("smtpgw.network", "BareNewline", CHOICE, "reject|normalize", "normalize"),
    P("smtpgw.access", "ConnectRule", CONDITION, "", [], "rf"),
    P("smtpgw.access", "HeloRule", CONDITION, "", [], "rf"),
    P("smtpgw.access", "MailfromRule", CONDITION, "", [], "rf"),
    P("smtpgw.access", "RelayRule", RELAY, "", [], "rf"),
    P("smtpgw.access", "DNSBlackList", ZONES, "", [], "rf"),
    P("smtpgw.forward", "ForwardRoute", ROUTE, "", [], "rf"),
    P("smtpgw.limits", "AntiviralSessions", INT, "10-1024", 10),
    P("smtpgw.limits", "MaximalScanAttempts", INT, "1-100", 3),
    P("smtpgw.limits", "IncomingSessions", INT, "1-1024", 100),
    P("smtpgw.limits", "IncomingProcesses", INT, "0-24", 0),  # 0: half the cores, at least 1 (app/incoming.py)
    P("smtpgw.limits", "DeliveryProcess", BOOL, "", True),  # the Sender in a process of its own (app/delivery.py)
    P("smtpgw.limits", "OutgoingSessions", INT, "1-1024", 20),
    P("smtpgw.limits", "MaximalIncomingHops", INT, "1-100", 20),
    P("smtpgw.limits", "MaximalIncomingMessageSize", INT, "64-204800 KB", 10240),
    P("smtpgw.limits", "MaximalIncomingMessagesPerSession", INT, "1-1024", 100),
    P("smtpgw.limits", "MaximalIncomingRcptsPerMessage", INT, "1-1024", 100),
    P("smtpgw.limits", "MaximalIncomingSessionSize", INT, "64-2048000 KB", 10240),
    P("smtpgw.limits", "MaximalIncomingSessionsPerIP", INT, "1-1024", 4),
    P("smtpgw.limits", "MaximalOutgoingSessionsPerHost", INT, "1-1024", 4),
    P("smtpgw.limits", "MinimalQueueFreeSpaceSize", INT, "0-1000000 MB", 0),
    P("smtpgw.limits", "MaximalJunkCommands", INT, "1-1000", 100),
    P("smtpgw.limits", "MaximalIncomingErrors", INT, "1-1000", 20),
    P("smtpgw.limits", "MaximalEnvelopesInMemory", INT, "0-1000000", 20000),
    P("smtpgw.limits", "InFlowDelay", INT, "0-10 s", 1),
    P("smtpgw.timeouts", "MaximalBackoffTime", INT, "60-64800 s", 21600),
    P("smtpgw.timeouts", "MinimalBackoffTime", INT, "64-64800 s", 1800),
    P("smtpgw.timeouts", "MaximalQueueLifetime", INT, "1-14 days", 5),
    P("smtpgw.timeouts", "ReadTimeout", INT, "1-1200 s", 120),
    P("smtpgw.timeouts", "WriteTimeout", INT, "1-1200 s", 120),
    P("smtpgw.timeouts", "ReceivingCommandTimeout", INT, "1-1200 s", 300),
    P("smtpgw.timeouts", "ReceivingDataInitiationTimeout", INT, "1-2400 s", 600),
    P("smtpgw.timeouts", "ReceivingDataTerminationTimeout", INT, "1-7200 s", 300),
    P("smtpgw.timeouts", "SendingInitialTimeout", INT, "1-1200 s", 300),
    P("smtpgw.timeouts", "SendingHelloTimeout", INT, "1-1200 s", 300),
    P("smtpgw.timeouts", "SendingMailTimeout", INT, "1-1200 s", 300),
    P("smtpgw.timeouts", "SendingRcptTimeout", INT, "1-1200 s", 300),
    P("smtpgw.timeouts", "SendingDataInitiationTimeout", INT, "1-2400 s", 600),
    P("smtpgw.timeouts", "SendingDataTerminationTimeout", INT, "1-7200 s", 300),
    P("smtpgw.timeouts", "SendingQuitTimeout", INT, "1-1200 s", 300),
    P("smtpgw.timeouts", "IncomingProcessTimeout", INT, "3-3600 s", 60),
    P("smtpgw.timeouts", "DeliveryProcessTimeout", INT, "3-3600 s", 60),
    P("smtpgw.resolve", "InternalRecursionEnabled", BOOL, "", False),
    P("smtpgw.resolve", "InternalRecursionsLimit", INT, "1-100", 32),
    P("smtpgw.resolve", "IONetworkTimeout", INT, "1-1200 s", 5),
    P("smtpgw.resolve", "MXCacheRefreshPeriod", INT, _PERIOD, 43200),
    P("smtpgw.resolve", "UnreachableCacheRefreshPeriod", INT, _PERIOD, 43200),
    P("smtpgw.resolve", "UnresolvedCacheRefreshPeriod", INT, _PERIOD, 43200),
    P("smtpgw.resolve", "IPCacheRefreshPeriod", INT, _PERIOD, 43200),
    P("smtpgw.resolve", "UnresolvedTTL", INT, "0-3600 s", 600),
    P("smtpgw.resolve", "UnreachableTTL", INT, "0-3600 s", 600),
    P("smtpgw.resolve", "Nameserver", NAMESERVER, "", [], "rf"),
    P("smtpgw.resolve", "DNSAttempts", INT, "1-10", 2),
    P("smtpgw.resolve", "DNSCacheSize", INT, "0-1000000", 10000),
    P("smtpgw.resolve", "UnreachableCacheSize", INT, "0-1000000", 10000),
    P("smtpgw.options", "StatFilename", PATH),  # None here; <ControlPath>/stats after loading
    P("smtpgw.options", "StatSaveInterval", INT, "1-3600 s", 60),
    P("smtpgw.options", "AVStatistics", TARGET),
    P("smtpgw.options", "ICheckerDBFilename", PATH),
    P("smtpgw.options", "StrictStandards", BOOL, "", False),
    P("smtpgw.options", "User", USER),
    P("smtpgw.options", "Group", GROUP),
    P("smtpgw.options", "PidFile", PATH),
    P("smtpgw.options", "LogFile", PATH),
    P("smtpgw.options", "LogLevel", CHOICE, "error|warning|info|debug", "info"),
    P("smtpgw.options", "ControlPollInterval", INT, "1-60 s", 2),
    P("smtpgw.path", "IncomingArchivePath", PATH),
    P("smtpgw.path", "OutgoingArchivePath", PATH),
    P("smtpgw.path", "IncomingArchiveLifetime", INT, _LIFETIME, 0),
    P("smtpgw.path", "OutgoingArchiveLifetime", INT, _LIFETIME, 0),
    P("smtpgw.path", "QueuePath", PATH, "", None, "q"),
    P("smtpgw.path", "ControlPath", PATH, "", None, "q"),
    P("smtpgw.ave", "Cure", BOOL, "", False),
    P("smtpgw.ave", "ScanArchives", BOOL, "", True),
    P("smtpgw.ave", "ScanMailBases", BOOL, "", True),
    P("smtpgw.ave", "ScanTimeout", INT, "0-3600 s", 120),
    P("smtpgw.ave", "UseIChecker", BOOL, "", False),
    P("smtpgw.ave", "ICheckerCacheSize", INT, "1-10000000", 100000),
    P("smtpgw.ave", "ClamdAddress", CLAMD, "", ["unix:/var/run/clamav/clamd.ctl"], "rf"),
    P("smtpgw.ave", "MaximalArchiveDepth", INT, "1-64", 8),
    P("smtpgw.ave", "MaximalArchiveMembers", INT, "1-100000", 1000),
    P("smtpgw.ave", "MaximalExpandedSize", INT, "1024-4194304 KB", 102400),
    P("smtpgw.ave", "MaximalCompressionRatio", INT, "1-100000", 100),
    P("smtpgw.ave", "MaximalMessageObjects", INT, "10-100000", 5000),
    P("smtpgw.ave", "MaximalDecodedSize", INT, "1024-4194304 KB", 204800),
    P("smtpgw.ave", "MaximalClamdScans", INT, "1-100000", 1000),
    P("smtpgw.antispam", "Check", BOOL, "", True),
    P("smtpgw.antispam", "SpamDetection", CHOICE, "soft|standard|hard", "standard"),
    P("smtpgw.antispam", "SpamSubjectPrefix", TEXT, "", "[SPAM] "),
    P("smtpgw.antispam", "ProbableSpamSubjectPrefix", TEXT, "", "[Probable Spam] "),
    P("smtpgw.antispam", "WhiteListSenders", ADDRESSES, "", [], "rf"),
    P("smtpgw.antispam", "BlackListSenders", ADDRESSES, "", [], "rf"),
    P("smtpgw.antispam", "WhiteListRecipients", ADDRESSES, "", [], "rf"),
    P("smtpgw.antispam", "BlackListRecipients", ADDRESSES, "", [], "rf"),
    P("smtpgw.antispam", "WhiteListIPs", IPS, "", [], "rf"),
    P("smtpgw.antispam", "BlackListIPs", IPS, "", [], "rf"),
    P("smtpgw.antispam", "DNSBlackListWeight", FLOAT, "0-1", 0.5),
    P("smtpgw.antispam", "DKIMVerify", BOOL, "", True),
    P("smtpgw.antispam", "DKIMLookupTimeout", INT, "1-60 s", 5),
    P("smtpgw.antispam", "LearnOnRelease", BOOL, "", False),
    P("smtpgw.antispam", "AutoLearn", BOOL, "", False),
    P("smtpgw.antispam", "AutoLearnSpamScore", FLOAT, "0.99-1", 0.997),
    P("smtpgw.antispam", "AutoLearnHamScore", FLOAT, "0-0.35", 0.002),
    P("smtpgw.antispam", "AutoLearnMaximalSize", INT, "1-10240 KB", 256),
    P("smtpgw.antispam", "AutoLearnRate", INT, "0-100000", 100),
    P("smtpgw.policy", "Check", BOOL, "", True),
    P("smtpgw.policy", "AdminNotifyAddress", ADDRESS, "", None, "q"),
    P("smtpgw.policy", "NotifyFromAddress", ADDRESS, "", None, "q"),
    P("smtpgw.policy", "BackupPath", PATH, "", None, "q"),
    P("smtpgw.policy", "QuarantinePath", PATH, "", None, "q"),
    P("smtpgw.policy", "SpamQuarantinePath", PATH),  # None: spam goes to QuarantinePath
    P("smtpgw.policy", "TemplatesPath", PATH),  # None: [path] TemplatesPath
    P("smtpgw.policy", "QuarantineLifetime", INT, _LIFETIME, 0),
    P("smtpgw.policy", "BackupLifetime", INT, _LIFETIME, 0),
    P("smtpgw.policy", "IncludeByName", NAMES, "", [], "rf"),
    P("smtpgw.policy", "ExcludeByName", NAMES, "", [], "rf"),
    P("smtpgw.policy", "IncludeByMime", NAMES, "", [], "rf"),
    P("smtpgw.policy", "ExcludeByMime", NAMES, "", [], "rf"),
    P("smtpgw.policy", "ActionDisinfected", CHOICE, "cure|" + _ANY_OBJECT, "cure"),
    P("smtpgw.policy", "ActionInfected", CHOICE, _ANY_OBJECT, "remove"),
    P("smtpgw.policy", "ActionSuspicious", CHOICE, _ANY_OBJECT, "remove"),
    P("smtpgw.policy", "ActionProtected", CHOICE, _ANY_OBJECT, "pass"),
    P("smtpgw.policy", "ActionError", CHOICE, _ANY_OBJECT, "remove"),
    P("smtpgw.policy", "ActionFiltered", CHOICE, _ANY_OBJECT, "remove"),
    P("smtpgw.policy", "BlockMessage", STATUS_LIST, "", _BLOCKED),
    P("smtpgw.policy", "NotifyAdmin", NOTICE_LIST, "", _NOTIFIED),
    P("smtpgw.policy", "NotifyRecipient", NOTICE_LIST, "", _NOTIFIED),
    P("smtpgw.policy", "NotifySender", STATUS_LIST, "", frozenset()),
    P("smtpgw.policy", "SaveInQB", STATUS_LIST, "", _BLOCKED),
    P("smtpgw.policy", "AddXHeaders", BOOL, "", True),
    P("smtpgw.policy", "AddDisclaimer", BOOL, "", False),
    P("smtpgw.policy", "ActionSpam", CHOICE, _SPAM_ACTION, "tag"),
    P("smtpgw.policy", "ActionProbableSpam", CHOICE, _SPAM_ACTION, "tag"),
    P("smtpgw.policy", "GroupSendersTrusted", IPS, "", TRUSTED_BY_DEFAULT, "rf"),
    P("smtpgw.group", "Senders", ADDRESSES, "", [ANY_ADDRESS], "rf"),
    P("smtpgw.group", "Recipients", ADDRESSES, "", [ANY_ADDRESS], "rf"),
    P("smtpgw.console", "ListenOn", CONSOLE_LISTEN),  # None: no console
    P("smtpgw.console", "TLSCertificateFile", PATH),
    P("smtpgw.console", "TLSKeyFile", PATH),
    P("smtpgw.console", "AdminUser", USER_NAME, "", "admin"),
    P("smtpgw.console", "AdminPasswordHash", PASSWORD_HASH),
    P("smtpgw.console", "ReadOnlyUsers", ACCOUNT, "", [], "r"),
    P("smtpgw.console", "MetricsAllowFrom", IPS, "", ["127.0.0.0/8", "::1"], "rf"),
    P("smtpgw.quota", "MaximalProtectedRecipients", INT, "0-1000000", 0),  # 0: not counted
    P("smtpgw.quota", "MaximalDailyTraffic", INT, "0-10000000 MB", 0),  # 0: no limit
    P("smtpgw.quota", "WarningThreshold", INT, "0-99 %", 80),  # 0: only the notice at 100 %
    P("smtpgw.quota", "QuotaAction", CHOICE, "notify|defer", "notify"),
    P("smtpgw.digest", "Schedule", INT, "0-720 hours", 0),  # 0: no scheduled quarantine digest
    P("updater.path", "UploadPatchPath", PATH),
    P("updater.path", "BackUpPath", PATH),
    P("updater.path", "ClamdDatabasePath", PATH),
    P("updater.path", "PidFile", PATH),
    P("updater.options", "KeepSilent", BOOL, "", False),
    P("updater.options", "UseUpdateServerUrl", BOOL, "", False),
    P("updater.options", "UseUpdateServerUrlOnly", BOOL, "", False),
    P("updater.options", "UpdateServerUrl", URL),
    P("updater.options", "PostUpdateCmd", TEXT),
    P("updater.options", "ConnectTimeout", INT, "1-600 s", 30),
    P("updater.options", "ProxyAddress", TEXT),
    P("updater.options", "UseProxy", BOOL, "", False),
    P("updater.options", "PassiveFtp", BOOL, "", True),
    P("updater.options", "RegionSettings", TEXT),
    P("updater.options", "PublicKey", PUBLIC_KEY, "", [], "r"),  # none: the shipped key (smtpgw.signing)
    P("updater.options", "AllowUnsigned", BOOL, "", False),
    P("updater.report", "Append", BOOL, "", False),
    P("updater.report", "ReportFileName", PATH),
    P("updater.report", "ReportLevel", LEVEL, "0|1|2|3|4|9", 3),
)

SECTIONS: dict[str, list[Param]] = {}
for _param in SCHEMA:
    SECTIONS.setdefault(_param.section, []).append(_param)
# The [smtpgw.antispam] keys a group may set too; omitted, they are inherited from [smtpgw.antispam].
GROUP_ANTISPAM_KEYS = ("SpamDetection", "SpamSubjectPrefix", "ProbableSpamSubjectPrefix", "WhiteListSenders",
                       "BlackListSenders", "WhiteListRecipients", "BlackListRecipients", "WhiteListIPs",
                       "BlackListIPs")
GROUP_INHERITED = SECTIONS["smtpgw.policy"] + [p for p in SECTIONS["smtpgw.antispam"] if p.key in GROUP_ANTISPAM_KEYS]
# A group takes Senders, Recipients and every inherited key, none of them required.
GROUP_PARAMS = SECTIONS.pop("smtpgw.group") + [
    P("smtpgw.group", param.key, param.kind, param.range, param.default, param.flags.replace("q", ""))
    for param in GROUP_INHERITED
]


def attribute_name(section: str) -> str:
    """``smtpgw.limits`` -> ``limits``, ``path`` -> ``base``, ``updater.report`` -> ``updater_report``."""
    if section == "path":
        return "base"
    return section.removeprefix("smtpgw.").replace(".", "_")


# --- the loaded configuration --------------------------------------------------------------

class Section:
    """One section's parameters as attributes; ``where(key)`` tells where each was set."""

    def __init__(self, title: str, values: dict[str, Any], wheres: dict[str, str]) -> None:
        self.__dict__.update(values)
        self._title = title
        self._wheres = wheres

    def where(self, key: str) -> str | None:
        """``FILE:LINE`` of the line that set ``key``, or None when it has its default."""
        return self._wheres.get(key)

    def __getattr__(self, name: str) -> Any:
        # Reached only for a name that is not a parameter of this section.
        raise AttributeError(f"[{self.__dict__.get('_title')}] has no parameter {name!r}")

    def __repr__(self) -> str:
        values = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return f"<[{self._title}] {values}>"


class Group(Section):
    """[smtpgw.policy] (named "policy") or a [smtpgw.group:NAME] with every policy key."""

    name: str
    Senders: list[str]
    Recipients: list[str]

    def __init__(self, title: str, name: str, values: dict[str, Any], wheres: dict[str, str]):
        super().__init__(title, values, wheres)
        self.name = name

    def matches(self, sender: str, recipient: str, client: str | None) -> bool:
        """Both masks match; ``*`` (an omitted Senders/Recipients) also matches ``<>`` (empty).
        Senders that do not admit every sender match only mail from a ``GroupSendersTrusted``
        client: anyone else can write any sender, so for them the sender proves nothing."""
        if not _matches(self.Recipients, recipient):
            return False
        if _admits_everyone(self.Senders):
            return True
        return self.trusts(client) and match_any(self.Senders, sender)

    def trusts(self, client: str | None) -> bool:
        """``client`` (an address, or None / "" for mail that came from no client) is in
        GroupSendersTrusted."""
        address = client_address(client)
        return address is not None and any(parse_ip_mask(mask).matches(address) for mask in self.GroupSendersTrusted)


def _inherit(section: Section, source: Section, keys: Iterable[str]) -> None:
    """``section`` takes ``source``'s values of ``keys`` (a list as its own copy) and where they were set."""
    for key in keys:
        inherited = getattr(source, key)
        section.__dict__[key] = list(inherited) if isinstance(inherited, list) else inherited
        if source.where(key):
            section._wheres[key] = source.where(key) or ""


def _matches(masks: list[str], address: str) -> bool:
    return ANY_ADDRESS in masks or match_any(masks, address)


def _admits_everyone(masks: list[str]) -> bool:
    """``*`` or ``*@*`` (every sender but ``<>``): no sender a client could write is left out."""
    return any(mask.replace("*", "") in ("", "@") for mask in masks)


class Config:
    """A checked configuration; ``source`` is the file's absolute path, ``folder`` its folder."""

    base: Section
    locale: Section
    network: Section
    access: Section
    forward: Section
    limits: Section
    timeouts: Section
    resolve: Section
    options: Section
    path: Section
    ave: Section
    antispam: Section
    console: Section
    quota: Section
    digest: Section
    policy: Group
    updater_path: Section
    updater_options: Section
    updater_report: Section

    def __init__(self, source: str, sections: dict[str, Section], groups: list[Group]) -> None:
        self.source = source
        self.folder = os.path.dirname(source)
        self.__dict__.update(sections)
        self.groups = groups

    def group_for(self, sender: str, recipient: str, client: str | None) -> Group:
        """The first [smtpgw.group:NAME] matching (sender, recipient) for mail from the client
        address ``client`` (see ``Group.matches``), else the policy."""
        for group in self.groups:
            if group.matches(sender, recipient, client):
                return group
        return self.policy


# --- loading -------------------------------------------------------------------------------

@dataclass
class _Raw:
    """A section as written: its title, header line and (param, value, where) items."""

    title: str
    where: str
    items: list[tuple[Param, str, str]]


def _close_matches(word: str, candidates: Iterable[str]) -> list[str]:
    """The one candidate closest to a misspelt ``word`` (a "did you mean"), if any. difflib is
    imported here, on a configuration error only: every process loads this module."""
    import difflib

    return difflib.get_close_matches(word, candidates, n=1)


class _Loader:
    def __init__(self, path: str, text: bytes | None = None) -> None:
        self.text = text  # the file's content when it is not read from ``path`` (an edited copy)
        self.display = str(path)
        self.source = os.path.abspath(path)
        self.folder = os.path.dirname(self.source)
        self.problems: list[str] = []
        self.end = f"{self.display}:1"
        self.raw: dict[str, _Raw] = {}
        self.groups: list[_Raw] = []
        self.failed: set[str] = set()  # keys with a value that could not be used

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def lines(self) -> list[tuple[str, str]]:
        """(``FILE:LINE``, text) of each line that is not blank or a comment."""
        try:
            if self.text is not None:
                data = self.text[:MAX_CONFIG_BYTES + 1]
            else:
                with open(self.source, "rb") as handle:
                    data = handle.read(MAX_CONFIG_BYTES + 1)
        except OSError as error:
            raise ConfigError([f"{self.display}:1: cannot read configuration: {error.strerror}"]) from None
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError([f"{self.display}:1: larger than {MAX_CONFIG_BYTES} bytes"])
        result = []
        for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
            where = f"{self.display}:{number}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                self.problem(where, "not valid UTF-8")
                continue
            if len(line) > MAX_LINE:
                self.problem(where, f"line longer than {MAX_LINE} characters")
            elif line and line[0] not in "#;":
                result.append((where, line))
        last_line = data.count(b"\n") + (not data.endswith(b"\n"))
        self.end = f"{self.display}:{max(1, last_line)}"
        return result

    def parse(self) -> None:
        known = {title.lower(): title for title in SECTIONS}
        current: _Raw | None = None
        seen_header = False  # keys of an unknown section are skipped without more noise
        for where, line in self.lines():
            header = re.fullmatch(r"\[\s*([^\]]*?)\s*\]", line)
            if header:
                current, seen_header = self.open_section(header.group(1), where, known), True
                continue
            match = re.fullmatch(r"([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*)", line)
            if not match:
                self.problem(where, f"expected [section] or Key=value, got '{line[:80]}'")
            elif current is None:
                if not seen_header:
                    self.problem(where, f"{match.group(1)} is outside any [section]")
            else:
                self.add_item(current, match.group(1), match.group(2).strip(), where)

    def open_section(self, title: str, where: str, known: dict[str, str]) -> _Raw | None:
        if title.lower().startswith(GROUP_PREFIX):
            name = title[len(GROUP_PREFIX):]
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}", name):
                self.problem(where, f"'{name}' is not a group name (letters, digits, _ . @ + -)")
                return None
            for seen in self.groups:
                if seen.title.lower() == title.lower():
                    self.problem(where, f"duplicate section [{title}] (first at {seen.where})")
                    return None
            self.groups.append(_Raw(GROUP_PREFIX + name, where, []))
            return self.groups[-1]
        if title.lower() in known:
            canonical = known[title.lower()]
            return self.raw.setdefault(canonical, _Raw(canonical, where, []))
        if title.lower().startswith("smtpgw.group"):
            hint = GROUP_PREFIX + "NAME"
        else:
            close = _close_matches(title.lower(), known)
            hint = known[close[0]] if close else ""
        self.problem(where, f"unknown section [{title}]" + (f"; did you mean [{hint}]?" if hint else ""))
        return None

    def add_item(self, section: _Raw, key: str, value: str, where: str) -> None:
        params = GROUP_PARAMS if section.title.startswith(GROUP_PREFIX) else SECTIONS[section.title]
        by_key = {param.key.lower(): param for param in params}
        param = by_key.get(key.lower())
        if param is not None:
            section.items.append((param, value, where))
            return
        close = _close_matches(key.lower(), by_key)
        elsewhere = [p.section for p in SCHEMA if p.key.lower() == key.lower()]
        if close:
            hint = f"; did you mean '{by_key[close[0]].key}'?"
        elif elsewhere:
            hint = f"; it belongs in [{elsewhere[0]}]"
        else:
            hint = ""
        self.problem(where, f"unknown key '{key}' in [{section.title}]{hint}")

    def values(self, raw: _Raw | None, params: list[Param]) -> tuple[dict[str, Any], dict[str, str]]:
        """Converted values (defaults where unset) and where each set one was written."""
        values: dict[str, Any] = {}
        wheres: dict[str, str] = {}
        title = raw.title if raw else params[0].section
        for param in params:
            items = [(value, where) for p, value, where in (raw.items if raw else []) if p is param]
            default = param.default
            values[param.key] = list(default) if isinstance(default, list) else default
            if not items:
                if param.required:
                    self.problem(raw.where if raw else self.end,
                                 f"[{title}]: missing required key {param.key}")
                continue
            for _, where in items[1:] if not param.repeatable else []:
                self.problem(where, f"duplicate {param.key} in [{title}] (first set at {items[0][1]})")
            wheres[param.key] = items[0][1]
            before = len(self.problems)
            if param.repeatable:
                values[param.key] = [v for value, where in items for v in self.items(param, value, where)]
            elif items[0][0]:
                values[param.key] = self.convert(param, *items[0], default)
            if param.required and not any(value for value, _ in items):
                self.problem(items[0][1], f"{param.key}: empty value; [{title}] requires it")
            if len(self.problems) > before:
                self.failed.add(f"{title}/{param.key}")
        return values, wheres

    def convert(self, param: Param, value: str, where: str, fallback: Any) -> Any:
        if value[:5].lower() == "file:" and value[:7].lower() != "file://":
            if param.allows_file:
                reason = "must be the whole value, not an item of a comma list"
            elif param.section in ("path", "locale") or param.section.startswith("updater."):
                reason = f"lists are not allowed in [{param.section}]"
            else:
                reason = f"lists are not allowed for {param.key} (not a list)"
            self.problem(where, f"{param.key}: file: {reason}")
            return fallback
        try:
            return param.kind.parse(value, param, where, self.folder)
        except access.RuleError as error:
            self.problems.extend(error.problems)
        except ValueError as error:
            self.problem(where, f"{param.key}: {error}")
        return fallback

    def items(self, param: Param, value: str, where: str) -> list[Any]:
        """The items of one line of a table parameter (comma list, file: list or one item)."""
        def one(text: str, at: str) -> Any:
            return param.kind.parse(text, param, at, self.folder)
        if value[:5].lower() == "file:" and param.allows_file:
            try:
                return access.expand_list(value, self.folder, where, one)
            except access.RuleError as error:
                self.problems.extend(error.problems)
                return []
        texts = [text.strip() for text in value.split(",")] if param.kind.splits else [value]
        converted = [self.convert(param, text, where, None) for text in texts if text]
        return [item for item in converted if item is not None]

    def load(self) -> Config:
        self.parse()
        converted = {title: self.values(self.raw.get(title), params) for title, params in SECTIONS.items()}
        options, path = converted["smtpgw.options"][0], converted["smtpgw.path"][0]
        if options["StatFilename"] is None and path["ControlPath"]:
            options["StatFilename"] = os.path.join(path["ControlPath"], "stats")
        sections: dict[str, Section] = {}
        for title, (values, wheres) in converted.items():
            attribute = attribute_name(title)
            if title != "smtpgw.policy":
                sections[attribute] = Section(title, values, wheres)
        values, wheres = converted["smtpgw.policy"]
        values.update(Senders=[ANY_ADDRESS], Recipients=[ANY_ADDRESS])
        sections["policy"] = policy = Group("smtpgw.policy", "policy", values, wheres)
        antispam = sections["antispam"]
        _inherit(policy, antispam, GROUP_ANTISPAM_KEYS)
        groups = [self.group(raw, policy) for raw in self.groups]
        config = Config(self.source, sections, groups)
        self.cross_check(config)
        if self.problems:
            self.problems.sort(key=self.order)
            shown = self.problems[:MAX_PROBLEMS]
            if len(self.problems) > MAX_PROBLEMS:
                shown.append(f"{self.end}: {len(self.problems) - MAX_PROBLEMS} more problems not shown")
            raise ConfigError(shown)
        return config

    def order(self, problem: str) -> tuple[bool, str, int]:
        """Sort key: the configuration file's problems first, each file's by line."""
        match = re.match(r"(.*?):(\d+): ", problem)
        file, line = (match.group(1), int(match.group(2))) if match else (self.display, 0)
        return file != self.display, file, line

    def group(self, raw: _Raw, policy: Section) -> Group:
        values, wheres = self.values(raw, GROUP_PARAMS)
        keys = {param.key for param, _, _ in raw.items}
        if not keys & {"Senders", "Recipients"}:
            self.problem(raw.where, f"[{raw.title}]: set Senders or Recipients (or both)")
        group = Group(raw.title, raw.title[len(GROUP_PREFIX):], values, wheres)
        _inherit(group, policy, [param.key for param in GROUP_INHERITED if param.key not in keys])
        return group

    def at(self, section: Section, key: str) -> str:
        """Where to report a problem about ``key``: its line, its section's header, or the end."""
        raw = self.raw.get(section._title)
        return section.where(key) or (raw.where if raw else self.end)

    def cross_check(self, config: Config) -> None:
        resolve, timeouts, network = config.resolve, config.timeouts, config.network
        # kmg-spec §3.11: a retry must never meet a still-valid "unreachable" entry.
        if resolve.UnreachableTTL >= timeouts.MinimalBackoffTime:
            where = self.at(resolve, "UnreachableTTL") if resolve.where("UnreachableTTL") \
                else self.at(timeouts, "MinimalBackoffTime")
            self.problem(where, f"UnreachableTTL ({resolve.UnreachableTTL}) must be less than "
                                f"MinimalBackoffTime ({timeouts.MinimalBackoffTime})")
        if timeouts.MinimalBackoffTime > timeouts.MaximalBackoffTime:
            self.problem(self.at(timeouts, "MinimalBackoffTime"),
                         f"MinimalBackoffTime ({timeouts.MinimalBackoffTime}) must not exceed "
                         f"MaximalBackoffTime ({timeouts.MaximalBackoffTime})")
        if not network.ListenOn and "smtpgw.network/ListenOn" not in self.failed:
            self.problem(self.at(network, "ListenOn"), "ListenOn: no address to listen on")
        for index, address in enumerate(network.ListenOn):
            if address in network.ListenOn[:index]:
                self.problem(self.at(network, "ListenOn"), f"ListenOn: {_joined(*address)} given twice")
        self.check_tls(network)
        self.check_console(config)
        if resolve.InternalRecursionEnabled:
            self.problem(self.at(resolve, "InternalRecursionEnabled"),
                         "InternalRecursionEnabled=true is not supported: smtpgw asks the recursive resolvers "
                         "of Nameserver (or /etc/resolv.conf)")

    def check_console(self, config: Config) -> None:
        """[smtpgw.console]: a console listening needs the admin's password hash, a port of its own
        and a usable certificate when it has one."""
        console = config.console
        if console.ListenOn is None:
            return
        if not console.AdminPasswordHash:
            self.problem(self.at(console, "ListenOn"),
                         "ListenOn is set but AdminPasswordHash is not (make one with: smtpgw.py console passwd)")
        if tuple(console.ListenOn) in (tuple(a) for a in config.network.ListenOn):
            self.problem(self.at(console, "ListenOn"), f"ListenOn: {_joined(*console.ListenOn)} is an SMTP address too")
        names = [name for name, _ in console.ReadOnlyUsers]
        if console.AdminUser in names or len(set(names)) != len(names):
            self.problem(self.at(console, "ReadOnlyUsers"), "ReadOnlyUsers: a user name given twice or the AdminUser's")
        self.check_tls(console)

    def check_tls(self, network: Section) -> None:
        certificate, key = network.TLSCertificateFile, network.TLSKeyFile
        if (certificate is None) != (key is None):
            given, missing = ("TLSCertificateFile", "TLSKeyFile") if key is None \
                else ("TLSKeyFile", "TLSCertificateFile")
            self.problem(self.at(network, given), f"{given} is set but {missing} is not (set both or neither)")
            return
        if certificate is None:
            if getattr(network, "RequireTLS", False):
                self.problem(self.at(network, "RequireTLS"), "RequireTLS needs TLSCertificateFile and TLSKeyFile")
            return
        unreadable = [name for name, path in (("TLSCertificateFile", certificate), ("TLSKeyFile", key))
                      if not os.access(path, os.R_OK)]
        for name in unreadable:
            self.problem(self.at(network, name), f"{name}: cannot read {getattr(network, name)}")
        if not unreadable:
            import ssl  # here, not at the top: a scanner worker, which never speaks TLS, saves ~5 MiB

            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certificate, key)
            except (ssl.SSLError, OSError) as error:
                self.problem(self.at(network, "TLSCertificateFile"),
                             f"TLSCertificateFile/TLSKeyFile: not a usable certificate and key ({error})")


def save_snapshot(path: str, cfg: "Config") -> None:
    """The configuration this process accepted, for the processes it starts (scanner workers,
    incoming processes): they read it rather than smtpgw.conf, so that one started after a HUP
    the gateway refused never sees the refused edit (kmg-spec §3.1: a bad configuration at reload
    keeps the old one). Written durably, replaced whole."""
    write_durably(path, pickle.dumps(cfg))


def load_snapshot(path: str) -> "Config":
    """A configuration ``save_snapshot`` wrote; OSError, pickle.UnpicklingError or EOFError when
    it cannot be read."""
    with open(path, "rb") as f:
        cfg: Config = pickle.load(f)
    return cfg


def load_config(path: str | os.PathLike[str], text: bytes | None = None) -> Config:
    """Load and check ``path`` (or ``text`` as if it were that file's content: relative paths and
    ``file:`` lists are taken from its folder); raises ConfigError listing every problem found."""
    return _Loader(os.fspath(path), text).load()


def check_config(path: str | os.PathLike[str], out: TextIO | None = None) -> int:
    """``smtpgw -k``: print ``Config OK !`` (kmg-spec §4.2) and return 0, or print each problem and return 1."""
    out = out or sys.stdout
    try:
        load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=out)
        return 1
    print("Config OK !", file=out)
    return 0
