"""Signs of today's mail: phishing and malware tricks, and the marks of legitimate bulk mail.

Owns: the named checks that the rules database refers to as ``check NAME``
for mail of the 2020s (registered in ``signs.CHECKS``):

* link tricks — ``link_domain_mismatch`` (a link's text shows one domain, its
  href goes to another), ``url_shortener``, ``url_punycode`` (an IDNA label,
  RFC 5891 §4.4 "xn--"), ``url_lookalike`` (a host dressed as a known brand
  it does not belong to);
* credential theft — ``html_form`` (an HTML form in mail), ``credential_prompt``
  (a password field, or account-alarm words beside a link);
* sender disguise — ``brand_display_name`` / ``brand_subject`` (a brand named
  by a sender of an unrelated domain, also when spelt "C o i n b a s e" or
  with look-alike letters), ``display_name_address`` (the display name shows
  an address of another organisation), ``recipient_in_subject`` (the
  recipient's own address in the Subject, a mail merge of an address list),
  ``reply_to_freemail`` (replies go to a free
  mailbox of another domain than From), ``confusable_text`` (a display name or
  Subject written with letters of another script that look Latin, small
  capitals or mathematical letters, or letter-spaced words),
  ``invisible_in_words`` (zero-width, tag or variation-selector characters
  between the letters of a word in the Subject or display name);
* a phishing kit's mail merge — ``subject_random_token`` (a random mixed-case token in the
  Subject), ``display_name_number`` (a long number in the display name), ``coin_display_name`` (a
  coin or its foundation named by a domain that does not name it); rules only, never Bayes tokens;
* prize lures — ``brand_subject_lure`` (a brand and a gift or prize in the Subject from a domain
  not the brand's; a rule only, never a Bayes token);
* crypto lures — ``crypto_lure`` (airdrops, "claim your tokens", seed phrases,
  "connect your wallet", with a link);
* layout — ``image_only_link`` (a body of images or a few words, and a link);
* throw-away senders — ``token_path_links`` (links to a site's root whose path is one long random
  token), ``from_name_padding`` / ``subject_padding`` (a display name or Subject padded with runs of
  spaces), ``from_tenant_domain``
  (a cloud mail tenant's default domain, ``*.onmicrosoft.com``);
* attachments — ``risky_attachment`` (HTML, SVG, disk images, shortcuts,
  OneNote, macro-enabled Office documents);
* legitimate bulk mail — ``one_click_unsubscribe`` (List-Unsubscribe with an
  HTTPS URI and List-Unsubscribe-Post, RFC 8058 §3.1), ``consistent_sender``
  (the From domain also signs the mail — a DKIM signature verified by the
  gateway, ``_signed_by_from_domain`` — and owns its links
  or Message-ID), ``branded_sender`` (the display name names the organisation
  of the From domain, which signs the mail), ``unsubscribe_text`` (a plain unsubscribe or preferences line),
  ``compliant_bulk`` (both the one-click header and the visible opt-out, as
  the large mailbox providers require of bulk senders since 2024). These
  count only for a sender that does not also disguise itself (``_disguised``)
  nor sends from a throw-away top-level domain (``_unvouched``): phishing and
  today's bulk spam copy them.

Domains are compared by ``formalsigns.registered_domain``; no name is looked
up anywhere.

Must never: look anything up on the network, raise on odd input, or read more
than the bounded view (``MailView``) offers.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from smtpgw.mail import dkim
from smtpgw.spam.formalsigns import address_of, from_address, once, registered_domain, to_addresses, url_host
from smtpgw.spam.mailview import MailView
from smtpgw.spam.needles import Needled

MAX_LINKS = 100

# Brands most imitated by phishing (2022-2026 honeypot catches; APWG reports), with the registered
# domains beyond "<brand>.<tld>" that they really send from.
BRANDS: dict[str, tuple[str, ...]] = {
    "paypal": (), "microsoft": ("office.com", "outlook.com", "live.com", "office365.com", "sharepoint.com"),
    "office365": ("microsoft.com", "office.com"), "outlook": ("microsoft.com", "office.com", "live.com"),
    "onedrive": ("microsoft.com", "live.com"), "sharepoint": ("microsoft.com",),
    "amazon": ("amazonses.com",), "netflix": (), "apple": ("icloud.com", "me.com"),
    "icloud": ("apple.com",), "google": ("gmail.com", "youtube.com"), "facebook": ("facebookmail.com", "meta.com"),
    "instagram": ("facebookmail.com", "meta.com"), "whatsapp": ("meta.com",), "linkedin": (),
    "docusign": ("docusign.net",), "dropbox": ("dropboxmail.com",), "adobe": (), "dhl": (),
    "fedex": (), "usps": (), "coinbase": (), "binance": (), "metamask": ("consensys.net",),
    "wellsfargo": ("wf.com",), "chase": ("jpmorgan.com", "jpmchase.com"), "bankofamerica": ("bofa.com",),
    "citibank": ("citi.com",), "americanexpress": ("aexp.com", "amex.com"), "norton": ("nortonlifelock.com",),
    "mcafee": (), "spotify": (), "ebay": (), "walmart": (), "costco": (), "webmail": (),
    "mastercard": (), "citi": ("citibank.com",), "samsclub": ("walmart.com",), "starbucks": (),
    "unitedhealthcare": ("uhc.com",), "medicare": ("medicare.gov", "cms.gov", "hhs.gov"), "usaa": (),
    "geico": (), "verizon": ("verizonwireless.com", "vzw.com"), "xfinity": ("comcast.com", "comcast.net"),
    "bestbuy": (), "homedepot": (), "lowes": (), "walgreens": (), "harborfreight": (),
    "geeksquad": ("bestbuy.com",), "kohls": (), "cvs": ("cvshealth.com",),
    # Crypto wallets and exchanges, and banks, drawn from half of the phishing set (its folds 0-1 in
    # bench/spam_accuracy.py; the other folds judge them): names spammers borrow to sell "airdrops".
    "ledger": (), "trezor": (), "exodus": (), "electrum": ("electrum.org",), "uniswap": ("uniswap.org",),
    "pancakeswap": ("pancakeswap.finance",), "trustwallet": ("trustwallet.com",),
    "kraken": (), "opensea": ("opensea.io",), "tether": ("tether.to",), "aave": (), "cointracker": (),
    "mercadopago": ("mercadolibre.com", "mercadolivre.com.br"), "bradesco": (),
    "eventbrite": (),
    # Retail, insurance, motoring and broker names of 2025-26 lures ("AAA Driver Care", "Ace Hardware
    # Stores", "Liberty Mutual", "Charles Schwab", "Temu"), drawn from modern-mixed's and the phishing
    # set's spam; none is in the display name or Subject of any ham set (SpamAssassin, TREC 2007,
    # modern-mixed, the mailing list). Their own domains are "<brand>.<tld>" or start with the name. Schwab
    # only with "Charles" (a surname on a kernel list); "Endurance" and "Blue Cross" are left out: a word
    # of training plans, and some thirty licensees' domains.
    "aaa": (), "acehardware": (), "tractorsupply": (), "statefarm": (), "omahasteaks": (),
    "libertymutual": (), "charlesschwab": ("schwab.com",), "robinhood": (), "tesla": (), "temu": (), "lidl": (), "edeka": (),
    "mashreq": (), "oral-b": ("oralb.com", "pg.com"),
}
# Brand names rare enough to be searched for among the labels of a host name (or letter-spaced in a
# display name): "outlook" or "chase" also name other things.
_HOST_BRANDS = ("paypal", "microsoft", "netflix", "icloud", "docusign", "dropbox", "coinbase", "binance",
                "trustwallet", "pancakeswap", "uniswap", "mercadopago",
                "metamask", "wellsfargo", "bankofamerica", "americanexpress", "linkedin", "facebook", "instagram",
                "whatsapp", "onedrive", "sharepoint", "amazon", "mastercard", "samsclub", "starbucks",
                "unitedhealthcare", "harborfreight", "homedepot", "walgreens", "acehardware", "tractorsupply",
                "statefarm", "omahasteaks", "libertymutual", "charlesschwab")
_HOST_PARTS = re.compile(r"[.\-]")
# Cyrillic and Greek letters drawn like Latin ones (Unicode TR 39 confusables, the common subset).
_CONFUSABLES = str.maketrans("асеорхуіјԁһкмтвнАВЕКМНОРСТХУІЈԜѕԛαοερτυνκιΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
                             "aceopxyijdhkmtbhABEKMHOPCTXYIJWsqaoeptuvkiABEZHIKMNOPTYX")
_SPACED = re.compile(r"(?:\b\w\s){4,}\w\b")
_DRESSED_LETTERS = ("LATIN LETTER SMALL CAPITAL", "MODIFIER LETTER SMALL CAPITAL", "MATHEMATICAL ")
_MIXED_WORD = re.compile(r"[^\W\d_]+")
_BRAND_WORD = re.compile(r"\b(" + "|".join(sorted(BRANDS, key=len, reverse=True)) + r")\b")
_ACCOUNT_ALARM = re.compile(
    r"\b(?:account|verif\w*|suspend\w*|locked|password|sign.?in|log.?in|unusual|confirm\w*|secur\w*|expir\w*"
    r"|invoice|payment|refund|deliver\w*|package|parcel|mailbox|storage|quota)\b")
_CREDENTIAL_TEXT = Needled(re.compile(
    r"(?:verify|confirm|validate|restore|unlock|reactivate) (?:your )?(?:e-?mail account|mailbox|account|identity"
    r"|password|login|billing information|payment information)"
    r"|your (?:account|mailbox|password|apple id|payment method) (?:has been|was|is|will be) "
    r"(?:suspended|locked|limited|disabled|closed|deactivated|compromised|expired?|on hold|restricted)"
    r"|unusual (?:sign.?in|login) activity|password (?:will )?expires?|mailbox (?:is )?(?:full|almost full)"
    r"|(?:re-?enter|enter) your (?:password|credentials)"))
_UNSUBSCRIBE_TEXT = Needled(re.compile(
    r"\bunsubscribe\b|(?:manage|update) (?:your )?(?:e-?mail |subscription |communication |notification )?"
    r"(?:preferences|settings|subscriptions?)|opt.?out of|no longer (?:wish|want) to receive"))
_ONE_CLICK = re.compile(r"list-unsubscribe\s*=\s*one-click", re.I)
# Words of a host or display name that name a mail stream or a department, not an organisation.
_STREAM_WORDS = frozenset({
    "mail", "email", "emails", "news", "newsletter", "info", "send", "sender", "reply", "noreply", "marketing",
    "click", "links", "hello", "notify", "notifications", "notification", "service", "services", "smtp",
    "bounce", "bounces", "mailer", "support", "team", "customer", "customers", "account", "accounts",
    "security", "alert", "alerts", "update", "updates", "online", "store", "shop", "official", "help",
    "billing", "offers", "deals", "promo", "from", "with", "your",
})
_NAME_WORD = re.compile(r"[a-z0-9]+")
_MSGID_DOMAIN = re.compile(r"@([A-Za-z0-9.-]{1,253})>")
_DOMAIN_TEXT = re.compile(r"(?:https?://)?((?:[a-z0-9-]{1,63}\.)+[a-z]{2,12})(?=[/:?#\s]|$)")

SHORTENERS = frozenset({
    "bit.ly", "bitly.com", "tinyurl.com", "t.co", "goo.gl", "ow.ly", "is.gd", "v.gd", "buff.ly", "rebrand.ly",
    "cutt.ly", "shorturl.at", "tiny.cc", "rb.gy", "t.ly", "s.id", "bl.ink", "shorte.st", "adf.ly", "qrco.de",
    "tny.im", "x.co", "lnkd.in", "trib.al", "soo.gd", "clck.ru", "u.to", "urlz.fr", "short.gy", "tiny.one",
    "surl.li", "shorturl.ac", "gg.gg", "1url.com", "did.li", "2no.co", "hyperurl.co",
})
FREEMAIL = frozenset({
    "gmail.com", "googlemail.com", "yahoo.com", "ymail.com", "rocketmail.com", "hotmail.com", "outlook.com",
    "live.com", "msn.com", "aol.com", "icloud.com", "me.com", "mac.com", "mail.ru", "inbox.ru", "list.ru",
    "bk.ru", "yandex.ru", "yandex.com", "gmx.com", "gmx.net", "gmx.de", "web.de", "protonmail.com",
    "proton.me", "zoho.com", "qq.com", "163.com", "126.com", "sina.com", "mail.com", "tutanota.com",
    "rediffmail.com", "naver.com", "daum.net", "libero.it", "laposte.net", "orange.fr", "free.fr",
    "seznam.cz", "wp.pl", "o2.pl", "interia.pl", "t-online.de", "yahoo.co.uk", "yahoo.co.jp", "hotmail.co.uk",
    "hotmail.fr", "live.fr", "outlook.fr",
})
RISKY_EXTENSIONS = frozenset({
    "html", "htm", "shtml", "xhtml", "svg", "iso", "img", "vhd", "vhdx", "lnk", "one", "onepkg", "hta", "wsf",
    "xll", "docm", "dotm", "xlsm", "xltm", "xlam", "pptm", "potm", "ppam", "ppsm", "sldm", "mobileconfig",
})
# A page shown as the message itself (Content-Disposition: inline, RFC 2183 §2.1) is a body, not an attachment.
_PAGE_EXTENSIONS = frozenset({"html", "htm", "shtml", "xhtml"})
NEAR_EMPTY_WORDS = 25  # visible words under which a body is "near-empty"


# -- helpers ----------------------------------------------------------------------------------


def _domain_of(address: str) -> str:
    return registered_domain(address.rsplit("@", 1)[1]) if "@" in address else ""


def _from_domain(view: MailView) -> str:
    return _domain_of(from_address(view))




def _belongs_to(domain: str, brand: str) -> bool:
    """True when the registered ``domain`` is the brand's own (``paypal.com``, ``amazon.co.uk``, ``amazonses.com``)."""
    label = domain.split(".", 1)[0]
    return label == brand or (label.startswith(brand) and "-" not in label) or domain in BRANDS[brand]


def _links(view: MailView) -> list[str]:
    return view.urls[:MAX_LINKS]


def _link_hosts(view: MailView) -> list[str]:
    if "link-hosts" not in view.memo:
        view.memo["link-hosts"] = [h for h in (url_host(u) for u in _links(view)) if h]
    return list(view.memo["link-hosts"])  # type: ignore[call-overload]


def _visible_words(view: MailView) -> int:
    return len(view.body[:4096].split(None, NEAR_EMPTY_WORDS)[:NEAR_EMPTY_WORDS])


# -- link tricks ------------------------------------------------------------------------------


def link_domain_mismatch(view: MailView) -> bool:
    """A link whose visible text names a domain other than the one its href goes to."""
    if view.html is None:
        return False
    for href, shown in view.html.link_texts[:MAX_LINKS]:
        match = _DOMAIN_TEXT.fullmatch(shown.strip().lower()[:200].rstrip("/"))
        if match is None:
            continue
        real, claimed = registered_domain(url_host(href)), registered_domain(match.group(1))
        if real and claimed and real != claimed and url_host(href) and "." in claimed:
            return True
    return False


def url_shortener(view: MailView) -> bool:
    return any(host in SHORTENERS or registered_domain(host) in SHORTENERS for host in _link_hosts(view))


def url_punycode(view: MailView) -> bool:
    return any(label.startswith("xn--") for host in _link_hosts(view) for label in host.split("."))


def url_lookalike(view: MailView) -> bool:
    """A link host that carries a brand's name (``paypal.com.secure-id.ru``, ``appleid-verify.com``,
    ``paypa1.com``) but is not one of that brand's domains."""
    for host in _link_hosts(view):
        domain = registered_domain(host)
        label = domain.split(".", 1)[0]
        plain = label.translate(_DIGIT_LOOKALIKES).replace("rn", "m").replace("vv", "w")
        parts = _HOST_PARTS.split(host)
        for brand in _HOST_BRANDS:
            if brand in parts and not _belongs_to(domain, brand):
                return True
            if plain == brand and label != brand:
                return True
    return False


_DIGIT_LOOKALIKES = str.maketrans("01345", "oleas")


# -- credential theft -------------------------------------------------------------------------


def html_form(view: MailView) -> bool:
    return view.html is not None and view.html.tags.get("form", 0) > 0


def credential_prompt(view: MailView) -> bool:
    """A password field, or account-alarm wording ("verify your account", "your mailbox is full") with a link."""
    if view.html is not None and "password-field" in view.html.signs:
        return True
    if not _links(view):
        return False
    return _CREDENTIAL_TEXT.search(" ".join(view.body[:16384].lower().split())) is not None


# -- sender disguise --------------------------------------------------------------------------


def _plain(text: str) -> str:
    """``text`` with look-alike letters made Latin and compatibility forms (small capitals,
    mathematical and fullwidth letters) folded (NFKC), lower case."""
    return unicodedata.normalize("NFKC", text[:256]).translate(_CONFUSABLES).lower()


def _unrelated_brand(text: str, domain: str) -> bool:
    plain = _plain(text)
    named = set(_BRAND_WORD.findall(plain))
    compact = re.sub(r"[\s._\-*]+", "", plain)
    named.update(brand for brand in _HOST_BRANDS if brand in compact)
    return any(not _belongs_to(domain, brand) for brand in named)


def _confusable(text: str) -> bool:
    if _SPACED.search(text) is not None:
        return True
    for word in _MIXED_WORD.findall(text[:256]):
        if word.isascii():
            continue
        folded = unicodedata.normalize("NFKC", word)
        if folded != word and folded.isascii():
            return True  # mathematical or fullwidth letters
        if any(unicodedata.name(c, "").startswith(_DRESSED_LETTERS) for c in word):
            return True
        latin = sum(1 for c in word if c.isascii())
        if latin and word.translate(_CONFUSABLES).isascii():
            return True  # Latin and look-alike Cyrillic or Greek letters in one word
    return False


def confusable_text(view: MailView) -> bool:
    """A display name or Subject spelt to slip past word filters: "Lеԁgеr" (Cyrillic е, ԁ), "ᴏʀᴅᴇʀ", "C o i n b a s e".

    A capital I written for an l ("PoIicy", "Trust WaIIet", "compIimentary") is not one: inside a word it
    is as common in ham's CamelCase (WordInfo, SweaveInput, BigInt, McIntyre, bzImage: 16 display names
    or Subjects of the ham sets) as in the spam sets (3 modern, 8 phishing)."""
    return _confusable(_display_name_raw(view)) or _confusable(view.header("subject") or "")


def _display_name_raw(view: MailView) -> str:
    value = view.header("from") or ""
    return value.split("<", 1)[0].strip(" \"'") if "<" in value else ""


def brand_display_name(view: MailView) -> bool:
    """A brand in the From display name, sent from a domain that is not the brand's."""
    domain = _from_domain(view)
    return bool(domain) and _unrelated_brand(_display_name_raw(view), domain)


def brand_subject(view: MailView) -> bool:
    """A brand and account-alarm words in the Subject, sent from a domain that is not the brand's."""
    domain = _from_domain(view)
    subject = view.header("subject") or ""
    return bool(domain) and _ACCOUNT_ALARM.search(_plain(subject)) is not None and _unrelated_brand(subject, domain)


# Top-level domains of an address a display name may show ("service@paypal.com"):
# the generic ones most used, and every two-letter country code.
_NAME_TLDS = frozenset({"com", "net", "org", "info", "biz", "io", "co", "app", "ai", "me", "us", "gov", "edu",
                        "mil", "int", "dev", "tech", "pro", "finance", "bank", "cloud", "support", "services"})
_NAMED_ADDRESS = re.compile(r"[\w.+-]@((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.){1,6}([a-z]{2,12}))(?![\w-])")


def display_name_address(view: MailView) -> bool:
    """The From display name shows an address of another organisation ("service@paypal.com" <x@mailer.example>)
    than the one the mail is from. A sharing service's "bob@example.org via Service" is not one."""
    name = _plain(_display_name_raw(view))
    domain = _from_domain(view)
    if not domain or " via " in f" {name} ":
        return False
    for match in _NAMED_ADDRESS.finditer(name):
        tld = match.group(2)
        if tld not in _NAME_TLDS and tld not in CHEAP_TLDS and len(tld) != 2:
            continue
        shown = registered_domain(match.group(1))
        if shown.split(".", 1)[0] != domain.split(".", 1)[0]:
            return True
    return False


def recipient_in_subject(view: MailView) -> bool:
    """The recipient's own address in the Subject ("bob@example.org, your bonus is ready"): a mail merge
    of an address list, where a sender who knows the reader writes a name."""
    subject = (view.header("subject") or "").lower()[:512]
    return "@" in subject and any(address in subject for address in to_addresses(view)[:10] if "@" in address)


def reply_to_freemail(view: MailView) -> bool:
    """Replies go to a free mailbox of another domain than From."""
    reply = _domain_of(address_of(view.header("reply-to")))
    return reply in FREEMAIL and reply != _from_domain(view)


# Top-level domains sold for next to nothing and seldom used by an established sender (Spamhaus and
# Interisle "most abused TLDs" reports 2023-2025).
CHEAP_TLDS = frozenset({
    "shop", "space", "bar", "cyou", "help", "xyz", "top", "click", "sbs", "cfd", "icu", "buzz", "rest",
    "beauty", "hair", "quest", "monster", "lol", "online", "site", "store", "fun", "website", "pw", "tk", "ml",
    "ga", "cf", "gq", "loan", "work", "date", "racing", "win", "bid", "review", "stream", "download", "country",
    "kim", "cricket", "science", "party", "gdn", "mom", "boats", "autos", "yachts", "skin", "makeup", "bond",
    "motorcycles", "homes", "lat", "uno", "digital", "today", "life", "live", "world", "email", "express",
})
_TAG = re.compile(r"#(?=[a-z0-9]*\d)(?=[a-z0-9]*[a-z])[a-z0-9]{3,10}\b", re.I)
_UNDERSCORED = re.compile(r"[^\W\d_]+(?:_[^\W\d_]+){2,}")


def from_cheap_tld(view: MailView) -> bool:
    """The From address is on a throw-away top-level domain (.shop, .cyou, .space ...)."""
    address = from_address(view)
    return "@" in address and address.rsplit(".", 1)[-1] in CHEAP_TLDS


def subject_tracking_tag(view: MailView) -> bool:
    """A random tag of letters and digits after "#" in Subject or display name ("#uid4761", "#ufqun8"),
    there to make every copy unique for filters; ticket and order numbers are digits."""
    return _TAG.search(view.header("subject") or "") is not None or _TAG.search(_display_name_raw(view)) is not None


def underscored_words(view: MailView) -> bool:
    """Words joined by underscores in Subject or display name ("A_New_Update_for_You"): the spaces of a
    template filled in by a bulk tool, or a dodge of word filters."""
    subject = view.header("subject") or ""
    for text in (subject[:256], _display_name_raw(view)[:256]):
        for match in _UNDERSCORED.finditer(text):
            # Title-case words, not a programmer's identifier (snake_case, CONFIG_FOO_BAR).
            if sum(1 for word in match.group(0).split("_") if word[:1].isupper() and word[1:].islower()) >= 2:
                return True
    return False


def symbol_display_name(view: MailView) -> bool:
    """Arrows, ticks or dingbats in the From display name ("➤➤ Offer", "⇑⇑⇑ FastRates"); the ASCII signs of
    a brand's name ("Disney+", "Notepad++") and emoji are not."""
    name = _display_name_raw(view)[:128]
    return any(unicodedata.category(c) in ("So", "Sm") and 0x7F < ord(c) < 0x1F000 for c in name)


# Characters that take no room: zero-width spaces and joiners, word joiner and invisible operators,
# soft hyphen, combining grapheme joiner, byte-order mark, tag characters and variation selectors
# (Unicode 15 §23.2-23.4; TR 36 §2.6 "invisible characters"). Between two letters they split a word
# ("M\U000e0139i\U000e0139crosoft") past word filters while the reader sees it whole.
_INVISIBLE = re.compile("[\u00ad\u034f\u180e\u200b-\u200f\u2060-\u2064\ufeff\ufe00-\ufe0f"
                        "\U000e0000-\U000e007f\U000e0100-\U000e01ef]+")
_CRYPTO_LURE = Needled(re.compile(
    r"\b(?:airdrop|(?:seed|recovery|secret recovery|mnemonic) phrase|connect (?:your )?wallet"
    r"|wallet (?:validation|verification|synchroni[sz]ation|upgrade)"
    r"|claim (?:your )?(?:free |exclusive )?(?:\$?[a-z]{2,6} )?(?:tokens?|coins?|rewards?|allocation|airdrop)"
    r"|(?:token|coin|xrp|usdt|eth|btc) (?:distribution|giveaway|airdrop|allocation))\b"))


def invisible_in_words(view: MailView) -> bool:
    """Invisible characters between the letters of a word in the Subject or From display name (an emoji's
    variation selector or joiner, between symbols, is not)."""
    for text in (view.header("subject") or "", _display_name_raw(view)):
        for match in _INVISIBLE.finditer(text[:512]):
            before, after = text[match.start() - 1:match.start()], text[match.end():match.end() + 1]
            if before.isalpha() and after.isalpha():
                return True
    return False


def crypto_lure(view: MailView) -> bool:
    """A crypto giveaway or wallet-drain lure ("claim your tokens", "airdrop", "seed phrase", "connect
    your wallet") with a link to follow."""
    if not _links(view):
        return False
    text = " ".join(f"{view.header('subject') or ''} {view.body[:16384]}".lower().split())
    return _CRYPTO_LURE.search(text) is not None


# -- layout and attachments -------------------------------------------------------------------


def image_only_link(view: MailView) -> bool:
    """Images or a handful of words, and a link to follow: the text is in the picture or behind the link.

    A plain-text note with no picture (a feed item's headline and address, "see http://...") shows
    where its link goes and hides nothing: not this sign. Plain-text hits, ham / spam: sa-2002 56 / 0
    (feed items, a third of its Probable ham), sa-2003-05 1 / 1, trec-2007 0 / 27, phishing 3."""
    images = view.html.tags.get("img", 0) if view.html is not None else 0
    images += sum(1 for p in view.parts if p.content_type.startswith("image/"))
    if view.html is None and not images:
        return False
    anchors = view.html is not None and any(href for href, _shown in view.html.link_texts)
    if not anchors and not ("http" in view.text or "www." in view.text):
        return False
    words = _visible_words(view)
    return words < NEAR_EMPTY_WORDS and (images > 0 or words < 12)


def risky_attachment(view: MailView) -> bool:
    """An attachment of a kind that runs, mounts or renders a page (.html, .svg, .iso, .lnk, .one, macro
    documents, Apple configuration profiles); an HTML body that merely carries a name is not one."""
    for part in view.parts:
        extension = part.filename.lower().rsplit(".", 1)[-1].strip() if "." in part.filename else ""
        if extension in RISKY_EXTENSIONS and not (extension in _PAGE_EXTENSIONS and part.disposition == "inline"):
            return True
    return False


# -- legitimate bulk mail ---------------------------------------------------------------------
# The marks of legitimate bulk mail are easy to copy, and today's phishing copies them: they count only
# for a sender that does not also disguise itself, nor write from a throw-away top-level domain.


def _disguised(view: MailView) -> bool:
    """A sign that the sender passes itself off as another: a brand or a domain not its own in the display
    name or Subject, look-alike or invisible letters, a look-alike link host, replies to a free mailbox,
    a crypto lure."""
    return any(once(view, check) for check in (
        brand_display_name, brand_subject, display_name_address, confusable_text, invisible_in_words,
        url_lookalike, reply_to_freemail, crypto_lure))


def _unvouched(view: MailView) -> bool:
    """A sender whose marks of legitimate bulk mail vouch for nothing: one that disguises itself, or one on
    a throw-away top-level domain (``from_cheap_tld``). Today's bulk spam signs with the domain it
    registered that week and gives it an unsubscribe header: CONSISTENT_SENDER fired on 57% of
    modern-mixed's spam (60 messages), 33 of them from .shop, .sbs, .bar ..., and on no ham from such a domain.
    Asking also for a link to the From domain when there are links (the Message-ID's domain alone no longer
    enough) would take about ten more of that spam, but also 12% of the mailing list's ham and 1 modern ham."""
    return _disguised(view) or once(view, from_cheap_tld)


def one_click_unsubscribe(view: MailView) -> bool:
    """RFC 8058 §3.1: an HTTPS List-Unsubscribe URI and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``."""
    unsubscribe = (view.header("list-unsubscribe") or "").lower()
    post = view.header("list-unsubscribe-post") or ""
    return "<https://" in unsubscribe and _ONE_CLICK.search(post) is not None and not _unvouched(view)


def _signed_by_from_domain(view: MailView) -> bool:
    """A DKIM signature of the From domain (d=, RFC 6376 §3.5; relaxed alignment as in DMARC, RFC 7489
    §3.1.1) that verified over the whole body, or whose key could not be fetched now (temperror).

    A forged signature fails (fail) or names a selector with no key (permerror): no mark. An aligned
    temperror counts as the signature read: an attacker cannot make the brand's own DNS fail, and
    the offline tools (no key lookups, ``dkim.unverified``) judge as the gateway does when the DNS is
    slow. A pass with l= shorter than the body vouches for part of it only: no mark. The result
    used is kept in ``view.memo["dkim"]`` for the reason of the rule that used it."""
    if "dkim" not in view.memo:
        view.memo["dkim"] = _aligned_signature(view)
    return view.memo["dkim"] is not None


def _aligned_signature(view: MailView) -> dkim.Result | None:
    domain = _from_domain(view)
    if not domain:
        return None
    results = view.dkim if view.dkim is not None else dkim.unverified(view.header_all("dkim-signature"))
    aligned = [r for r in results if r.domain and registered_domain(r.domain) == domain]
    for wanted in (dkim.PASS, dkim.TEMPERROR):
        for result in aligned:
            if result.result == wanted and result.whole_body:
                return result
    return None


def consistent_sender(view: MailView) -> bool:
    """The From domain signs the mail and also names its Message-ID or most of its links."""
    domain = _from_domain(view)
    if not domain or _unvouched(view) or not _signed_by_from_domain(view):
        return False
    msgid = _MSGID_DOMAIN.search(view.header("message-id") or "")
    if msgid and registered_domain(msgid.group(1).lower()) == domain:
        return True
    hosts = _link_hosts(view)
    return bool(hosts) and 2 * sum(1 for h in hosts if registered_domain(h) == domain) >= len(hosts)


def _names_host(name: str, host: str) -> bool:
    """True when the display name ``name`` names an organisation label of ``host`` ("Filters Fast" and
    email.filtersfast.com, "Apple Card" and post.applecard.apple), or the host one of the name's words."""
    plain = _plain(name)
    compact = re.sub(r"[^a-z0-9]", "", plain)
    if len(compact) < 4:
        return False
    for label in host.split(".")[:-1]:
        label = label.replace("-", "")
        if len(label) >= 4 and label not in _STREAM_WORDS and (label in compact or compact in label):
            return True
    return any(word in host for word in _NAME_WORD.findall(plain)[:4] if len(word) >= 4 and word not in _STREAM_WORDS)


def branded_sender(view: MailView) -> bool:
    """The display name names the organisation whose domain the From address is at, and that domain signs
    the mail: "Filters Fast" <marketing@email.filtersfast.com> with d=filtersfast.com. Spam sent from
    domains of its own rarely names them; a brand named from another domain is a disguise."""
    address = from_address(view)
    name = _display_name_raw(view)
    if "@" not in address or not name or _unvouched(view):
        return False
    return _names_host(name, address.rsplit("@", 1)[1]) and _signed_by_from_domain(view)


def unsubscribe_text(view: MailView) -> bool:
    return not _unvouched(view) and _UNSUBSCRIBE_TEXT.search(" ".join(view.body[-8192:].lower().split())) is not None


def compliant_bulk(view: MailView) -> bool:
    """Bulk mail as the large mailbox providers require of it since 2024: an RFC 8058 one-click
    unsubscribe in the header and a visible opt-out in the text (CAN-SPAM 15 U.S.C. 7704(a)(3),
    GDPR Art. 21(3))."""
    return once(view, one_click_unsubscribe) and once(view, unsubscribe_text)


# -- throw-away senders -----------------------------------------------------------------------
# Today's bulk spam comes from domains registered by the hundred, each one signed and given an
# unsubscribe header like a newsletter's; what they keep is the shape of the mass-mailing kit.

_FOLD = re.compile(r"\r?\n[ \t]+")
_PADDED = re.compile(r"^\s{3,}\S|\S\s{3,}$|\S\s{4,}\S")
# A link to a domain's root whose path is one long token of mixed-case letters and digits
# ("http://pawhop.skin/epICnukEH4-GnQrCmuiS3FqRcakTl..."): the recipient's id on a site made to track
# one campaign. A mail service provider's tracked link keeps its tokens under a path or in a query.
_ROOT_TOKEN_LINK = re.compile(r"^https?://(?:www\.)?[^/?#\s]+/([A-Za-z0-9_-]{30,})/?$")
MIN_TOKEN_LINKS = 2
# Microsoft 365's default tenant domains: a trial account's sender, never an established brand's.
TENANT_DOMAINS = ("onmicrosoft.com",)


def _token_like(segment: str) -> bool:
    return (any(c.islower() for c in segment) and any(c.isupper() for c in segment)
            and any(c.isdigit() for c in segment))


def token_path_links(view: MailView) -> bool:
    """Two or more links to a site's root whose path is one long random token of mixed-case letters and
    digits, without a query."""
    found = 0
    for url in _links(view):
        match = _ROOT_TOKEN_LINK.match(url)
        if match is not None and _token_like(match.group(1)):
            found += 1
            if found >= MIN_TOKEN_LINKS:
                return True
    return False


def _unfolded(view: MailView, name: str) -> str:
    """The raw value of field ``name`` as written, each fold (RFC 5322 §2.2.3) read as one space: the
    spaces a sender put there, not those of the line wrapping."""
    return _FOLD.sub(" ", view.raw_headers.get(name, b"")[:1024].decode("utf-8", "replace"))


def from_name_padding(view: MailView) -> bool:
    """The From display name padded with runs of spaces ("WellaHeat    <...>", "➤➤         Offer"): a bulk
    tool's fixed-width template. A person's name with a few spaces inside ("Inman, Brant A.   M.D.") is
    not one."""
    raw = _unfolded(view, "from")
    if "<" not in raw:
        return False
    return _PADDED.search(raw.rsplit("<", 1)[0].replace('"', "")) is not None


def subject_padding(view: MailView) -> bool:
    """The Subject padded with runs of spaces, between its words or after them ("Guaranteed to lose 10-12
    lbs in 30 days            "): a template's fixed-width field, or room for a random tail."""
    return _PADDED.search(_unfolded(view, "subject")) is not None


def from_tenant_domain(view: MailView) -> bool:
    """The From address is at a cloud mail tenant's default domain (``x@contoso123.onmicrosoft.com``)."""
    address = from_address(view)
    return "@" in address and address.rsplit("@", 1)[1].endswith(TENANT_DOMAINS)


# -- prize lures under a brand's name ---------------------------------------------------------
# Words of a gift or prize: "Tractor-Supply,Co. is allocating you a complimentary 3500 Watt Generator",
# "Claim Your UnitedHealthcare Appreciation Gift".
_PRIZE_LURE = re.compile(r"\b(?:complimentary|free|gift|rewards?|prize|won|winner|claim|allocat\w*|bonus|giveaway"
                         r"|congratulations|selected|exclusive offer)\b")


def brand_subject_lure(view: MailView) -> bool:
    """A brand and a gift or prize in the Subject, sent from a domain that is not the brand's (the
    account-alarm kind is ``brand_subject``); a brand's own offers come from its own domain."""
    domain = _from_domain(view)
    subject = view.header("subject") or ""
    return bool(domain) and _PRIZE_LURE.search(_plain(subject)) is not None and _unrelated_brand(subject, domain)


# -- the tags of a phishing kit's mail merge --------------------------------------------------------
# Each copy of today's phishing carries a random token of its own ("Notificação ao cliente
# Ra3HNiammhtn7Q3joVp") or a long "protocol number" in the display name ("[GovBR]- Valores a Receber -
# 6231497581941"), so that no two copies are alike; a service's order or ticket number is digits, or
# letters of one case, and stays in the Subject.
_SUBJECT_TOKEN = re.compile(r"(?<![\w/.@=-])(?=[A-Za-z0-9]*[a-z])(?=[A-Za-z0-9]*[A-Z])(?=[A-Za-z0-9]*\d)"
                            r"[A-Za-z0-9]{11,40}(?![\w/.@=-])")
MIN_CASE_SWITCHES = 4
_DIGIT_INSIDE = re.compile(r"[A-Za-z]\d+[A-Za-z]")
_NAME_NUMBER = re.compile(r"\d{8,}")


def subject_random_token(view: MailView) -> bool:
    """A token of 11-40 letters and digits in the Subject that changes case four times or more and has a
    digit between two letters ("xsjgzJ5ukSpOF"); words run together in CamelCase with a version after
    them ("McAfeeVirusScan2") have no digit inside."""
    for match in _SUBJECT_TOKEN.finditer((view.header("subject") or "")[:300]):
        token = match.group(0)
        if _DIGIT_INSIDE.search(token) is None:
            continue
        switches = sum(1 for a, b in zip(token, token[1:]) if a.isalpha() and b.isalpha() and a.isupper() != b.isupper())
        if switches >= MIN_CASE_SWITCHES:
            return True
    return False


def display_name_number(view: MailView) -> bool:
    """Eight digits or more in a row in the From display name ("Ourocard - Cod. 586467716701849933")."""
    return _NAME_NUMBER.search(_display_name_raw(view)[:256]) is not None


# Coins and the foundations behind them that "staking", "claim your XRP" and wallet-upgrade lures
# write in the display name (the exchanges and wallets are in BRANDS). A coin's own mail comes from a
# domain that names it (ripple.com, stellar.org, getmonero.org).
_COIN_NAME = re.compile(r"\b(ripple|xrp|stellar|xlm|monero|solana|cardano|dogecoin|polkadot|ethereum|bitcoin|btc"
                        r"|usdt|crypto\.com)\b")


def coin_display_name(view: MailView) -> bool:
    """A coin or its foundation in the From display name ("Ripple", "Stellar Foundation"), sent from
    a domain that does not name it."""
    domain = _from_domain(view)
    match = _COIN_NAME.search(_plain(_display_name_raw(view)))
    return bool(domain) and match is not None and match.group(1).split(".", 1)[0] not in domain


# the checks that rest on a verified DKIM signature (their reasons quote it, ``signs.detail``)
DKIM_CHECKS = frozenset({"consistent_sender", "branded_sender"})

CHECKS: dict[str, Callable[[MailView], bool]] = {
    fn.__name__: fn
    for fn in (
        link_domain_mismatch, url_shortener, url_punycode, url_lookalike, html_form, credential_prompt,
        brand_display_name, brand_subject, display_name_address, recipient_in_subject, reply_to_freemail,
        confusable_text, from_cheap_tld,
        subject_tracking_tag, underscored_words, symbol_display_name, invisible_in_words, crypto_lure,
        image_only_link, risky_attachment, one_click_unsubscribe, consistent_sender, branded_sender,
        unsubscribe_text, compliant_bulk, token_path_links, from_name_padding, from_tenant_domain,
        subject_padding, brand_subject_lure, subject_random_token, display_name_number, coin_display_name,
    )
}
