"""The signs of today's mail: each fires on a small crafted message and not on its legitimate twin,
and its rule name reaches the verdict's reasons (the AS-SCANNED log line) through SpamFilter."""

from __future__ import annotations

import base64
import os
from types import SimpleNamespace

import pytest

from smtpgw.spam import SpamFilter, mailview
from smtpgw.spam.database import DatabaseInfo, SpamDatabase
from smtpgw.spam.htmltext import html_to_text
from smtpgw.spam.signs import CHECKS, run_check
from smtpgw.spam.spamfilter import default_bases
from smtpgw.spam.tokenizer import tokens
from smtpgw.spam.training import default_rules, read_manifest


def message(body: str, *, sender: str = '"Shop News" <news@shop.example.com>', subject: str = "Your order",
            html: bool = True, extra: str = "", attachment: str = "") -> bytes:
    """One message: the body as HTML (or plain text), optional extra header lines and an attachment name."""
    head = (f"From: {sender}\nTo: bob@example.org\nSubject: {subject}\nDate: Mon, 07 Dec 2026 07:00:00 +0000\n"
            f"Message-ID: <a1@shop.example.com>\nMIME-Version: 1.0\n{extra}")
    kind = "text/html" if html else "text/plain"
    if not attachment:
        return f"{head}Content-Type: {kind}; charset=utf-8\n\n{body}\n".encode()
    return (f"{head}Content-Type: multipart/mixed; boundary=b1\n\n--b1\nContent-Type: {kind}; charset=utf-8\n\n"
            f"{body}\n--b1\nContent-Type: application/octet-stream\nContent-Disposition: attachment; "
            f'filename="{attachment}"\nContent-Transfer-Encoding: base64\n\nAAAA\n--b1--\n').encode()


TEXT = "<p>" + "Thank you for shopping with us; here is the summary of what you bought this week. " * 3 + "</p>"
UNSUBSCRIBE = '<p>To stop these mails, <a href="https://shop.example.com/u">unsubscribe</a>.</p>'
ONE_CLICK = ("List-Unsubscribe: <https://shop.example.com/u/1>, <mailto:u@shop.example.com>\n"
             "List-Unsubscribe-Post: List-Unsubscribe=One-Click\n")

def related(html: str, image: str = "offer.gif", picture: bytes = b"GIF89a") -> bytes:
    """An HTML message with one picture carried along (multipart/related, RFC 2387) under Content-ID
    <img1>, which the HTML shows as cid:img1 (RFC 2392)."""
    head = ('From: "Shop News" <news@shop.example.com>\nTo: bob@example.org\nSubject: Your order\n'
            "Date: Mon, 07 Dec 2026 07:00:00 +0000\nMessage-ID: <a2@shop.example.com>\nMIME-Version: 1.0\n")
    encoded = base64.encodebytes(picture).decode()
    return (f"{head}Content-Type: multipart/related; boundary=b2\n\n--b2\nContent-Type: text/html; charset=utf-8\n\n"
            f"{html}\n--b2\nContent-Type: image/gif; name=\"{image}\"\nContent-Transfer-Encoding: base64\n"
            f"Content-ID: <img1>\n\n{encoded}--b2--\n").encode()


PADDING = "<p>" + "The river ran slowly past the old mill while the princess read her letter aloud. " * 4 + "</p>"
SITE_LINKS = "".join(f'<a href="https://shop.example.com/{page}">{page}</a> ' for page in ("new", "sale", "help"))

# (check, a message it must fire on, its legitimate twin)
TWINS = {
    "embedded_image_lure": (
        related('<img src="cid:img1">' + PADDING),
        related('<img src="cid:img1" alt="Shop">' + TEXT + SITE_LINKS + UNSUBSCRIBE)),
    "link_domain_mismatch": (
        message(TEXT + '<a href="https://login.evil-host.example.net/x">www.mybank.example.com</a>'),
        message(TEXT + '<a href="https://www.mybank.example.com/x">www.mybank.example.com</a>')),
    "url_shortener": (
        message(TEXT + '<a href="https://bit.ly/3xYz">see your parcel</a>'),
        message(TEXT + '<a href="https://shop.example.com/parcel">see your parcel</a>')),
    "url_punycode": (
        message(TEXT + '<a href="https://xn--pypal-4ve.com/login">log in</a>'),
        message(TEXT + '<a href="https://paypal.com/login">log in</a>')),
    "url_lookalike": (
        message(TEXT + '<a href="https://paypal.secure-check.example.net/login">log in</a>'),
        message(TEXT + '<a href="https://www.paypal.com/login">log in</a>')),
    "html_form": (
        message(TEXT + '<form action="https://x.example.net/p"><input name="q"></form>'),
        message(TEXT + '<a href="https://shop.example.com/q">answer the survey</a>')),
    "credential_prompt": (
        message(TEXT + '<p>Your account has been suspended. <a href="https://x.example.net">Verify your account</a>'
                       "</p>"),
        message(TEXT + '<p>Your account has been created. <a href="https://shop.example.com">Visit it</a></p>')),
    "brand_display_name": (
        message(TEXT, sender='"PayPal Service" <notice@mailer-77.example.net>'),
        message(TEXT, sender='"PayPal Service" <service@paypal.com>')),
    "brand_subject": (
        message(TEXT, subject="Netflix: your payment was declined", sender="billing@renew-now.example.net"),
        message(TEXT, subject="Netflix: your payment was declined", sender="info@mailer.netflix.com")),
    "display_name_address": (
        message(TEXT, sender='"service@paypal.com" <notice@mailer-77.example.net>'),
        message(TEXT, sender='"bob@example.org via Drive" <drive-shares-noreply@google.com>')),
    "recipient_in_subject": (
        message(TEXT, subject="bob@example.org, your $619 credit is waiting"),
        message(TEXT, subject="Bob, your order has shipped")),
    "reply_to_freemail": (
        message(TEXT, extra="Reply-To: claims.desk@gmail.com\n"),
        message(TEXT, extra="Reply-To: support@shop.example.com\n")),
    "confusable_text": (
        message(TEXT, subject="Recent L\u0435\u0501g\u0435r breach"),
        message(TEXT, subject="Recent Ledger news")),
    "from_cheap_tld": (
        message(TEXT, sender='"Your Lungs" <your_lungs@breathh.shop>'),
        message(TEXT, sender='"Shop News" <news@shop.example.com>')),
    "subject_tracking_tag": (
        message(TEXT, subject="Taste what makes us special #uid4761"),
        message(TEXT, subject="Your order #47611 has shipped")),
    "underscored_words": (
        message(TEXT, subject="A_New_Starbucks_Update_for_You"),
        message(TEXT, subject="kbuild: rename CONFIG_DEBUG_INFO and fix_up_symbols")),
    "symbol_display_name": (
        message(TEXT, sender='"\u27a4\u27a4 Life Insurance Offer" <offer@example.net>'),
        message(TEXT, sender='"Disney+" <disneyplus@mail.example.net>')),
    "invisible_in_words": (
        message(TEXT, sender='"M\U000e0139i\U000e0139cro\u200bsoft" <billing@notice-7.example.net>'),
        message(TEXT, sender='"Microsoft Store" <store@example.net>', subject="\u26a0\ufe0f Your order \U0001f468\u200d\U0001f4bb")),
    "crypto_lure": (
        message(TEXT + '<p>Claim your free UNI tokens before the airdrop ends: <a href="https://x.example.net/c">'
                       "claim</a></p>"),
        message(TEXT + '<p>Your monthly statement of tokens of appreciation: <a href="https://shop.example.com/s">'
                       "view</a></p>")),
    "image_only_link": (
        message('<a href="https://x.example.net/o"><img src="https://x.example.net/offer.png"></a>'),
        message(TEXT + '<a href="https://shop.example.com/o"><img src="https://shop.example.com/logo.png"></a>')),
    "risky_attachment": (
        message(TEXT, attachment="Invoice_2026.html"),
        message(TEXT, attachment="Invoice_2026.pdf")),
    "one_click_unsubscribe": (
        message(TEXT, extra=ONE_CLICK),
        message(TEXT, extra="List-Unsubscribe: <mailto:u@shop.example.com>\n")),
    "consistent_sender": (
        message(TEXT, extra="DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1; h=from; bh=eA==; b=eQ==\n"),
        message(TEXT, extra="DKIM-Signature: v=1; a=rsa-sha256; d=esp-relay.example.net; s=s1; bh=eA==; b=eQ==\n")),
    "branded_sender": (
        message(TEXT, sender='"Filters Fast" <marketing@email.filtersfast.example>',
                extra="DKIM-Signature: v=1; a=rsa-sha256; d=filtersfast.example; s=s1; h=from; bh=eA==; b=eQ==\n"),
        message(TEXT, sender='"Filters Fast" <deals@mailer-77.example.net>',
                extra="DKIM-Signature: v=1; a=rsa-sha256; d=mailer-77.example.net; s=s1; h=from; bh=eA==; b=eQ==\n")),
    "unsubscribe_text": (
        message(TEXT + UNSUBSCRIBE),
        message(TEXT)),
    "compliant_bulk": (
        message(TEXT + UNSUBSCRIBE, extra=ONE_CLICK),
        message(TEXT, extra=ONE_CLICK)),
}

# The throw-away senders' kit: links to a site's root whose path is one long token, a display name padded
# with spaces, a cloud tenant's default domain.
LINK_TOKENS = ("epICnukEH4-GnQrCmuiS3FqRcakTleqqYGw7GgKgDsbTjF1y1g", "kbCc7ZX-c_aUKLbuTdAUqMVWrH5qiUPl5jIV205Z9q2VMDpwew")
TOKEN_LINKS = "".join(f'<a href="http://pawhop.example/{token}">see the trick</a> ' for token in LINK_TOKENS)
# A mail service provider's tracked links keep the token in a query, under a path.
TRACKED_LINKS = "".join(f'<a href="https://click.shop.example.com/ls/click?upn={token}">new</a> ' for token in LINK_TOKENS)
TWINS.update({
    "token_path_links": (
        message(TEXT + TOKEN_LINKS),
        message(TEXT + TRACKED_LINKS + '<a href="https://shop.example.com/orders/2026/how-to-return-an-item-you-bought">'
                "returns</a>")),
    "from_name_padding": (
        message(TEXT, sender="WellaHeat    <GMtgMintVenustglimbUgwards@complex.example.com>"),
        message(TEXT, sender='"Inman, Brant A.   M.D." <Inman.Brant@clinic.example.org>')),
    "from_tenant_domain": (
        message(TEXT, sender='"Savings Kit Claims" <noreply@legaloffers.onmicrosoft.com>'),
        message(TEXT, sender='"Savings Kit Claims" <noreply@legaloffers.example.com>')),
    "subject_padding": (
        message(TEXT, subject="Guaranteed to lose 10-12 lbs in 30 days            "),
        message(TEXT, subject="Re: [kbuild] a subject long enough to be folded by the sender's mail program,\n"
                              "    twice over")),
})


def test_every_sign_of_today_has_twins_and_a_rule() -> None:
    named = {rule.target for rule in default_rules() if rule.kind == "check"}
    assert set(TWINS) <= set(CHECKS)
    assert set(TWINS) <= named


@pytest.mark.parametrize("name", sorted(TWINS))
def test_sign_fires_on_the_crafted_message_not_on_its_twin(name: str) -> None:
    crafted, twin = TWINS[name]
    assert run_check(name, mailview.build(crafted)), f"{name} should fire"
    assert not run_check(name, mailview.build(twin)), f"{name} fired on the legitimate twin"


def test_brand_disguises_are_seen_through() -> None:
    spaced = message(TEXT, sender='"C o i n b a s e" <noreply@dev-b7.example.nl>')
    small_caps = message(TEXT, subject="\u1d0f\u0280\u1d05\u1d07\u0280 \u1d04\u1d0f\u0274\u0493\u026a\u0280\u1d0d")
    digits = message(TEXT + '<a href="https://paypa1.com/x">log in</a>')
    assert run_check("brand_display_name", mailview.build(spaced))
    assert run_check("confusable_text", mailview.build(small_caps))
    assert run_check("url_lookalike", mailview.build(digits))
    # A word that merely contains a brand, and non-Latin text, are not disguises.
    plain = message(TEXT, sender='"Purchase Desk" <desk@buyer.example.com>', subject="Привет, Müller")
    assert not run_check("brand_display_name", mailview.build(plain))
    assert not run_check("confusable_text", mailview.build(plain))


def test_crypto_brands_in_a_display_name_from_another_domain() -> None:
    assert run_check("brand_display_name", mailview.build(message(TEXT, sender='"Trust Wallet - Support" <a@itpro.example.br>')))
    assert run_check("brand_display_name", mailview.build(message(TEXT, sender='"Ledger" <rodrigo@tradestars.example.br>')))
    assert not run_check("brand_display_name", mailview.build(message(TEXT, sender='"Ledger" <news@ledger.com>')))
    # A surname is not a brand: "Andreas Schwab" on a kernel list.
    assert not run_check("brand_display_name", mailview.build(message(TEXT, sender='"Andreas Schwab" <s@linux-m68k.org>')))


@pytest.mark.parametrize(("lure", "own"), [
    ('"AAA Driver Care" <care@wifimarfix.example.com>', '"AAA Travel" <travel@aaa.com>'),
    ('"Ace Hardware Stores" <ahs@h0s.homerentals.example>', '"Ace Hardware" <ace@email.acehardware.com>'),
    ('"Liberty Mutual\u2197" <sh@events-and-venue.example>', '"Liberty Mutual" <news@libertymutual.com>'),
    ('"Charles Schwab & Co., Inc." <postmaster@mg.beepsafe.example>', '"Charles Schwab" <alerts@schwab.com>'),
    ('"Your Free Oral-B Kit" <w33d@cookfest.example>', '"Oral-B" <club@oralb.com>'),
])
def test_retail_insurance_and_broker_names_from_another_domain(lure: str, own: str) -> None:
    """The names of 2025-26 lures; each brand's own mail (its domain, or one starting with its name) is no disguise."""
    assert run_check("brand_display_name", mailview.build(message(TEXT, sender=lure)))
    assert not run_check("brand_display_name", mailview.build(message(TEXT, sender=own)))


def test_a_plain_text_note_with_a_link_is_no_image_only_link() -> None:
    """A feed item or a short notice in plain text shows the address it links to; the same few words
    with a picture, or behind an anchor, are the image-only shape."""
    feed = "URL: http://news.example.com/click/-1,8388720,1717/\nDate: 2002-09-30T10:08:10+01:00\n\n(Some Game Boy)"
    assert not run_check("image_only_link", mailview.build(message(feed, html=False)))
    pictured = '<img src="https://news.example.com/p.png"> <a href="https://news.example.com/c">Some Game Boy</a>'
    assert run_check("image_only_link", mailview.build(message(pictured)))
    assert run_check("image_only_link", mailview.build(message('<a href="https://x.example.net/o">see it</a>')))


def test_a_link_shown_as_its_owners_other_host_is_no_url_text_mismatch() -> None:
    """A newsletter's link showing its site (www.) that goes to the same owner's mail or click host
    is no disguise; a shown address of one site leading to another site is."""
    own = message(TEXT + '<a href="https://click.news.shop.example.com/r/1">https://www.shop.example.com/</a>')
    assert not run_check("url_text_mismatch", mailview.build(own))
    other = message(TEXT + '<a href="https://login.evil-host.example.net/x">https://www.shop.example.com/</a>')
    assert run_check("url_text_mismatch", mailview.build(other))


def test_missing_fields_are_rules_never_bayes_tokens() -> None:
    """A message without From, Date and Message-ID (a script's report, a device's alert) is judged by
    the modest MISSING_* rules alone, not also by tokens learned from a handful of old spam."""
    bare = b"To: bob@example.org\nSubject: backup report\n\nThe nightly backup finished at 02:10, 3 files changed.\n"
    view = mailview.build(bare)
    signs = ("missing_from", "missing_date", "missing_message_id")
    assert all(run_check(name, view) for name in signs)
    assert not {"sign:" + name for name in signs} & tokens(view)


def test_an_embedded_picture_with_a_link_or_two_is_a_lure_and_remote_pictures_are_not() -> None:
    """Image spam opens with its picture and links its offer once or twice; a newsletter's pictures are
    fetched from its site (no cid: at all), and a picture named in HTML but not carried is no lure."""
    offer = '<a href="https://x.example.net/o">order now</a> <a href="https://x.example.net/u">remove</a>'
    assert run_check("embedded_image_lure", mailview.build(related("Hi, <img src=cid:img1>" + offer + PADDING)))
    remote = message('<img src="https://shop.example.com/logo.gif">' + PADDING)
    assert not run_check("embedded_image_lure", mailview.build(remote))
    not_carried = message('<img src="cid:img1">' + PADDING)
    assert not run_check("embedded_image_lure", mailview.build(not_carried))
    # A rule with the weight default.rules gives it, never also a learned token.
    assert "sign:embedded_image_lure" not in tokens(mailview.build(related('<img src="cid:img1">' + PADDING)))


def test_a_letters_logo_and_a_family_photo_are_no_lure() -> None:
    """A letter's embedded logo sits in its signature, after the text; a photo sent to family opens the
    message but is larger than the pictures sent in bulk."""
    letter = ("<p>Hi Tom,</p><p>Tuesday at 10 works for me; I will bring the draft of the contract.</p>"
              '<p>Best regards<br>Anna</p><img src="cid:img1">')
    assert not run_check("embedded_image_lure", mailview.build(related(letter)))
    photo = related('<img src="cid:img1"><p>The kids at the beach!</p>', "beach.jpg", bytes(100 * 1024))
    assert not run_check("embedded_image_lure", mailview.build(photo))
    small = related('<img src="cid:img1"><p>The kids at the beach!</p>', "beach.jpg", bytes(10 * 1024))
    assert run_check("embedded_image_lure", mailview.build(small))


def test_the_words_before_an_embedded_picture_count_across_html_parts() -> None:
    """Two HTML parts read as one page: the words of the first come before a picture in the second."""
    first, picture = html_to_text("<p>one two three</p>"), html_to_text('<p>four</p><img src="CID:x">')
    assert picture.words_before_embedded == 1
    assert first.merged(picture).words_before_embedded == 4
    assert picture.merged(first).words_before_embedded == 1
    assert first.merged(first).words_before_embedded == -1
    assert html_to_text('<img src="https://x.example/a.gif">').words_before_embedded == -1


def test_password_field_is_a_credential_prompt() -> None:
    form = message(TEXT + '<form><input type="password" name="p"></form>')
    assert run_check("credential_prompt", mailview.build(form))


def test_an_html_body_that_carries_a_name_is_not_a_risky_attachment() -> None:
    """A newsletter's HTML part named "accuwx.htm" and shown inline (RFC 2183 §2.1) is the message itself."""
    inline = message(TEXT, html=False).replace(
        b"Content-Type: text/plain; charset=utf-8\n",
        b'Content-Type: text/html; charset=utf-8; name="accuwx.htm"\nContent-Disposition: inline; filename="accuwx.htm"\n')
    assert not run_check("risky_attachment", mailview.build(inline))
    attached = message(TEXT, attachment="Remittance.HTM")
    assert run_check("risky_attachment", mailview.build(attached))
    assert run_check("risky_attachment", mailview.build(message(TEXT, attachment="profile.mobileconfig")))


@pytest.mark.parametrize("disguise", [
    {"sender": '"MetaMask Support" <news@mailer-77.example.net>'},
    {"sender": '"service@paypal.com" <news@mailer-77.example.net>'},
    {"subject": "Recent L\u0435\u0501g\u0435r breach"},
    {"extra": "Reply-To: claims.desk@gmail.com\n"},
    {"sender": '"Soda Water" <vx8bouft4@mitolyns.shop>'},  # a throw-away top-level domain vouches for nothing
])
def test_the_marks_of_bulk_mail_do_not_count_for_a_disguised_sender(disguise: dict[str, str]) -> None:
    """Phishing copies the one-click header, the opt-out line and its own DKIM signature: beside a disguise
    they are no sign of a legitimate sender."""
    def bulk(sender: str = '"Shop News" <news@shop.example.com>', subject: str = "Your order", extra: str = "") -> bytes:
        domain = sender.rsplit("@", 1)[1].rstrip(">")
        signed = f"DKIM-Signature: v=1; a=rsa-sha256; d={domain}; s=s1; h=from; bh=eA==; b=eQ==\n"
        return message(TEXT + UNSUBSCRIBE, sender=sender, subject=subject, extra=ONE_CLICK + signed + extra)

    marks = ("one_click_unsubscribe", "unsubscribe_text", "compliant_bulk", "consistent_sender")
    assert all(run_check(name, mailview.build(bulk())) for name in marks)
    assert not any(run_check(name, mailview.build(bulk(**disguise))) for name in marks)


@pytest.fixture(scope="module")
def spam_filter() -> SpamFilter:
    return SpamFilter(SimpleNamespace(Check=True, SpamDetection="standard"), None)


@pytest.fixture(scope="module")
def rules_bases(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder whose database holds the rules of ``default.rules`` as they are now (no tokens), so that a
    sign's rule is read even before the shipped database is rebuilt with it."""
    folder = tmp_path_factory.mktemp("bases")
    SpamDatabase.empty(default_rules(), DatabaseInfo(version="t", date="2026-12-07", source="test")).save(
        str(folder / "spam.db"))
    return str(folder)


@pytest.mark.parametrize("name", ["brand_display_name", "one_click_unsubscribe", "risky_attachment",
                                  "display_name_address", "recipient_in_subject", "token_path_links",
                                  "from_tenant_domain", "subject_padding", "from_name_padding"])
def test_sign_names_reach_the_verdict_reasons(rules_bases: str, name: str) -> None:
    rule = next(r for r in default_rules() if r.kind == "check" and r.target == name)
    level = "standard" if "standard" in rule.levels else "hard"  # the level at which the rule is on
    spam_filter = SpamFilter(SimpleNamespace(Check=True, SpamDetection=level), rules_bases)
    crafted, twin = TWINS[name]
    hit = spam_filter.classify(crafted, None, "", [], [])
    missed = spam_filter.classify(twin, None, "", [], [])
    # The reason carries the weight added to the log-odds: + for a spam sign, - for a legitimate-bulk one.
    assert f"rule {rule.name} {rule.weight:+.2f}" in hit.reasons, hit.reasons
    assert not any(reason.startswith(f"rule {rule.name} ") for reason in missed.reasons)


def test_a_folded_from_field_is_no_padded_display_name() -> None:
    """RFC 5322 §2.2.3: a long From folded before its address reads as one space there."""
    folded = message(TEXT, sender='"Wagner, David --- Senior Programmer Analyst --- WGO" \n    <dw@freight.example.com>')
    padded = message(TEXT, sender='"->     Xmas Tree Night Light"  <renewable@gastric.example.com>')
    assert not run_check("from_name_padding", mailview.build(folded))
    assert run_check("from_name_padding", mailview.build(padded))


def test_a_scripts_report_without_from_date_or_message_id_is_not_spam(spam_filter: SpamFilter) -> None:
    """It scored Probable Spam (0.84) when the missing fields were Bayes tokens besides their rules."""
    bare = b"To: bob@example.org\nSubject: backup report\n\nThe nightly backup finished at 02:10, 3 files changed.\n"
    verdict = spam_filter.classify(bare, None, "", [], [])
    assert verdict.status == "Not Detected", verdict.reasons
    assert "rule MISSING_FROM +1.00" in verdict.reasons


def test_shipped_training_list_covers_the_eras_and_never_the_phishing_set() -> None:
    """The shipped database's exact input: several sources and eras, no CC BY-NC phishing pack, no test-only set."""
    manifest = read_manifest(os.path.join(default_bases(), "spam", "TRAINING_FILES.txt"))
    folders = {path.rsplit("/", 1)[0] for _spam, _digest, path in manifest.entries}
    assert {"spamassassin/ham", "spamassassin/spam", "modern-mixed/ham", "modern-mixed/spam",
            "packs/trec07p/ham", "packs/trec07p/spam"} <= folders
    assert not any("phishing" in folder or "modern-ham-lists" in folder for folder in folders)
    assert all(len(digest) == 64 for _spam, digest, _path in manifest.entries)


@pytest.mark.parametrize(("rule", "spam", "ham"), [
    ("STOCK_PROMOTION",
     "HXPN IS MAKING GREAT PROGRESS! Company: Harris Exploration Inc Symbol: HXPN Price: 0.64 (28% UP!) "
     "5-day Target: $3 Rating: Strong Buy",
     "Stock Quote Notification for Netflix, Inc. The last trade was at 25.10, up 0.4% on the day."),
    ("MALE_ENHANCEMENT",
     "Introducing the Newest, Safest and Most Advanced Solution in Pnis En1argment, anywhere!",
     "The choir needs more male voices; the female section has grown and the hall was enlarged."),
])
def test_phrases_of_2007_spam_reach_the_verdict_reasons(rules_bases: str, rule: str, spam: str, ham: str) -> None:
    """A pump-and-dump tip and an "enlargement" offer; a stock notice and a choir's note are neither."""
    spam_filter = SpamFilter(SimpleNamespace(Check=True, SpamDetection="standard"), rules_bases)
    weight = next(r.weight for r in default_rules() if r.name == rule)
    hit = spam_filter.classify(message(spam, html=False, subject="Hi"), None, "", [], [])
    missed = spam_filter.classify(message(ham, html=False, subject="Hi"), None, "", [], [])
    assert f"rule {rule} {weight:+.2f}" in hit.reasons, hit.reasons
    assert not any(reason.startswith(f"rule {rule} ") for reason in missed.reasons)


def letter(mailer: str, msgid: str, *, sender: str = '"Ann Lee" <ann@mail.example.net>', subject: str = "Lunch",
           body: str = "Are we still on for lunch on Friday? I can book the usual place.") -> bytes:
    """A plain-text letter with the X-Mailer and Message-ID given (either left out when empty)."""
    fields = [f"From: {sender}", "To: bob@example.org", f"Subject: {subject}",
              "Date: Wed, 25 Apr 2007 10:12:11 +0200"]
    fields += [f"X-Mailer: {mailer}"] if mailer else []
    fields += [f"Message-ID: {msgid}"] if msgid else []
    return ("\n".join(fields) + "\nMIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n" + body
            + "\n").encode()


OUTLOOK = "Microsoft Outlook Express 6.00.2800.1106"
BAT = "The Bat! (v3.80.06) Professional"


@pytest.mark.parametrize(("mailer", "msgid"), [
    (OUTLOOK, "<E17sjK3-0008ST-00@usw-sf-list1.example.net>"),  # a relay's id: the spam tool wrote none
    (OUTLOOK, "<5f6701c79313$01c79313$0405d35c@example.net>"),  # the time's low word is its high word again
    (OUTLOOK, "<01c7871d$156e73f0$6c822ecf@example.net>"),  # no counter before the time
    ("Microsoft Outlook, Build 10.0.2616", "<200205281315.g4SDFq729626@mandark.example.net>"),
    (BAT, "<340125436.65285190086232@example.net>"),  # no local time after the number
])
def test_a_mail_program_named_with_an_id_it_never_writes_is_forged(mailer: str, msgid: str) -> None:
    assert run_check("forged_mailer_id", mailview.build(letter(mailer, msgid)))


@pytest.mark.parametrize(("mailer", "msgid"), [
    (OUTLOOK, "<003a01c2543b$5537c5b5$5ee52ad7@example.net>"),
    ("Microsoft Outlook, Build 10.0.2616", "<000001c791a0$6514b800$0a01a8c0@example.net>"),
    (OUTLOOK, "<DAV18rbcAAdkDKKnQ5i000095dc@hotmail.com>"),  # Hotmail's web client names Outlook Express
    (OUTLOOK, "<BAY141-DAV112B8C22615AAA200D791B8F520@phx.gbl>"),
    ("Microsoft Outlook Express Macintosh Edition - 5.01 (1630)", "<E17hrT0-0004gj-00@example.net>"),
    ("Microsoft Outlook IMO, Build 9.0.2416 (9.0.2910.0)", "<AMEPKEBLDJJCCDEJHAMICEGPFGAA.ejw@example.edu>"),
    (BAT, "<16680971951.20020930182931@example.net>"),
    ("Mutt/1.4i", "<20020930182931.GA1234@example.net>"),
    (OUTLOOK, ""),  # no Message-ID at all: MISSING_MESSAGE_ID's matter
])
def test_a_mail_programs_own_id_is_no_forgery(mailer: str, msgid: str) -> None:
    assert not run_check("forged_mailer_id", mailview.build(letter(mailer, msgid)))


@pytest.mark.parametrize("subject", ["Mlcrosoft7,Adobeu+M0RE starting at 29$", "0ffice6 2OO7 and Photoshopv.CS3",
                                     "Buy 0EM Software", "Snatch away Soft C1alis!", "Tlmepleces by Mont Blanc"])
def test_spam_words_spelt_with_look_alike_characters(subject: str) -> None:
    assert run_check("obfuscated_subject", mailview.build(letter("", "", subject=subject)))


@pytest.mark.parametrize("subject", ["Microsoft Office 2007 licence renewal", "Adobe Photoshop CS3 update 10.0.1",
                                     "Re: OEM drivers for Windows 7", "More pills? Ask the pharmacy", "l10n: 2007 strings"])
def test_the_words_spelt_plainly_are_not_obfuscated(subject: str) -> None:
    assert not run_check("obfuscated_subject", mailview.build(letter("", "", subject=subject)))


@pytest.mark.parametrize(("rule", "spam", "ham"), [
    ("FORGED_MAILER_ID", letter(OUTLOOK, "<E17sjK3-0008ST-00@list.example.net>"),
     letter(OUTLOOK, "<003a01c2543b$5537c5b5$5ee52ad7@example.net>")),
    ("OE_LOCALHOST_ID", letter("Microsoft Outlook, Build 10.0.2627", "<000001c791a0$6514b800$0100007f@example.net>"),
     letter("Microsoft Outlook, Build 10.0.2627", "<000001c791a0$6514b800$0a01a8c0@example.net>")),
    ("MALFORMED_MESSAGE_ID", letter("", "<3CFB1EED003722B3@> (added by postmaster@example.net)"),
     letter("", "<3CFB1EED003722B3@example.net>")),
    ("FROM_EMPTY_COMMENT", letter("", "<a1@example.net>", sender="Pamela@blinkese.example.com ()"),
     letter("", "<a1@example.net>", sender="Pamela@blinkese.example.com (Pamela Lee)")),
    ("OBFUSCATED_SUBJECT", letter("", "<a1@example.net>", subject="Mlcrosoft+Adobe starting at 29$"),
     letter("", "<a1@example.net>", subject="Microsoft and Adobe licences")),

])
def test_the_marks_of_2002_07_spam_tools_reach_the_verdict(rules_bases: str, rule: str, spam: bytes,
                                                            ham: bytes) -> None:
    """Each rule's name and weight are in the reasons of the message it fires on, with X-SpamTest-Method
    "headers" when it decides; its legitimate twin has no such reason."""
    spam_filter = SpamFilter(SimpleNamespace(Check=True, SpamDetection="standard"), rules_bases)
    weight = next(r.weight for r in default_rules() if r.name == rule)
    hit = spam_filter.classify(spam, None, "", [], [])
    missed = spam_filter.classify(ham, None, "", [], [])
    assert f"rule {rule} {weight:+.2f}" in hit.reasons, hit.reasons
    assert hit.method == "headers", (hit.method, hit.reasons)
    assert not any(reason.startswith(f"rule {rule} ") for reason in missed.reasons), missed.reasons


def test_the_mail_programs_marks_are_rules_never_bayes_tokens() -> None:
    """forged_mailer_id and obfuscated_subject add their rules' weights and nothing else: no token a
    database would learn (and so no term weight of any other message moves with them)."""
    view = mailview.build(letter(OUTLOOK, "<E17sjK3-0008ST-00@list.example.net>", subject="Buy 0EM Software"))
    assert run_check("forged_mailer_id", view) and run_check("obfuscated_subject", view)
    assert not {"sign:forged_mailer_id", "sign:obfuscated_subject"} & tokens(view)


@pytest.mark.parametrize(("rule", "spam", "ham"), [
    ("REMOVE_BY_REPLY", "Cheap toner for every printer. To be removed from our list please reply with your address.",
     "Thanks for the toner. The old cartridge is to be removed from the printer before the new one goes in."),
    ("ONE_TIME_MAILING", "Work from home and earn more. This is a one-time mailing, no removal is necessary.",
     "The committee meets every month; the next time we mail the minutes they will include the budget."),
    ("FEEDBACK_FORM_RELAY", "Below is the result of your feedback form. It was submitted by (x@example.com) on "
                            "Sunday. message: Free cell phone with any plan!",
     "Below is the result of the survey: most of you liked the new feedback form on the site."),
    ("THIRD_PARTY_LIST", "You are receiving this mailing because you joined our opt-in list through one of our "
                         "marketing partners. Never pay retail!",
     "You are receiving this newsletter because you subscribed to Rust Weekly at rustweekly.example.org."),
    ("MERGE_PLACEHOLDER", "Hello ~name~, your free calling trial starts today. %EM%jm@example.org%/EM%",
     "Use ${email} or {firstname} in the template; printf(\"%s\", name) fills in the name."),
])
def test_the_opt_out_of_2002_bulk_mail_reaches_the_verdict(rules_bases: str, rule: str, spam: str, ham: str) -> None:
    spam_filter = SpamFilter(SimpleNamespace(Check=True, SpamDetection="standard"), rules_bases)
    weight = next(r.weight for r in default_rules() if r.name == rule)
    hit = spam_filter.classify(letter("", "<a1@example.net>", body=spam), None, "", [], [])
    missed = spam_filter.classify(letter("", "<a1@example.net>", body=ham), None, "", [], [])
    assert f"rule {rule} {weight:+.2f}" in hit.reasons, hit.reasons
    assert not any(reason.startswith(f"rule {rule} ") for reason in missed.reasons), missed.reasons


@pytest.mark.parametrize(("sender", "subject", "fires"), [
    ("TS Co Labs <tscolabs@gaantays.example.com>",
     "Tractor-Supply,Co. is allocating you a complimentary 3500 Watt Generator", True),
    ('"Rewards" <loyalty@uhcrewards-bkp.example.net>', "Claim Your UnitedHealthcare Appreciation Gift", True),
    ('"Tractor Supply Co." <news@tractorsupply.com>', "A complimentary gift with every order this week", False),
    ("TS Co Labs <tscolabs@gaantays.example.com>", "Tractor-Supply,Co. opens a store in your town", False),
    ('"Garden Club" <club@garden.example.org>', "Free seeds for every member this spring", False),
])
def test_a_brands_prize_from_another_domain_is_a_lure(sender: str, subject: str, fires: bool) -> None:
    """The brand's own gift is not, nor the brand's news from elsewhere, nor a gift that names no brand."""
    view = mailview.build(letter("", "<a1@example.net>", sender=sender, subject=subject))
    assert run_check("brand_subject_lure", view) is fires
    assert "sign:brand_subject_lure" not in tokens(view)


def test_a_brands_prize_lure_reaches_the_verdict(rules_bases: str) -> None:
    spam_filter = SpamFilter(SimpleNamespace(Check=True, SpamDetection="standard"), rules_bases)
    lure = letter("", "<a1@example.net>", sender="TS Co Labs <tscolabs@gaantays.example.com>",
                  subject="Tractor-Supply,Co. is allocating you a complimentary 3500 Watt Generator")
    assert "rule BRAND_SUBJECT_LURE +2.00" in spam_filter.classify(lure, None, "", [], []).reasons


def dated(date: str) -> bytes:
    """The letter of ``letter`` with the Date field given."""
    return letter("", "<a1@example.net>").replace(b"Date: Wed, 25 Apr 2007 10:12:11 +0200", f"Date: {date}".encode())


@pytest.mark.parametrize(("date", "fires"), [
    ("Wed, 24 Jul 2002 20:03:30", True),  # no zone (RFC 5322 §3.3 requires one)
    ("Wed, 05 Aug 2020 04:01:50 -1900", True),  # an offset no zone has
    ("Mon, 04 Feb 0102 16:27:08 -0900", True),  # the year as C's tm_year
    ("Thu,  5 Sep 2002 02:12:52 -0400 (EDT)", False),
    ("Mon, 22 Jul 2002 17:45:17 UT", False),  # an obsolete zone name (RFC 5322 §4.3) is still a zone
    ("3 Sep 2002 19:48:55 -0000", False),
    ("Fri, 29 Mar 02 05:01:01 +1400", False),  # a two-digit year is obsolete, not bogus; UTC+14 exists
    ("next Tuesday", False),  # no date-time to judge
])
def test_a_date_with_no_zone_a_bogus_offset_or_year_is_malformed(date: str, fires: bool) -> None:
    view = mailview.build(dated(date))
    assert run_check("malformed_date", view) is fires
    assert "sign:malformed_date" not in tokens(view)


@pytest.mark.parametrize(("name", "crafted", "twin"), [
    ("subject_random_token",
     letter("", "<a1@example.net>", subject="Notificação ao cliente - Cod. xsjgzJ5ukSpOF"),
     letter("", "<a1@example.net>", subject="Order 4417-20931 shipped: McAfeeVirusScan2 licence")),
    ("display_name_number",
     letter("", "<a1@example.net>", sender='"Ourocard - Cod. 586467716701849933" <a@mailer.example.net>'),
     letter("", "<a1@example.net>", sender='"Ourocard - order 5864677" <a@mailer.example.net>')),
    ("coin_display_name",
     letter("", "<a1@example.net>", sender='"Ripple" <xrp@billing.eplane.example.com>'),
     letter("", "<a1@example.net>", sender='"Ripple Insights" <news@ripple.com>')),
])
def test_the_mail_merge_of_a_phishing_kit(name: str, crafted: bytes, twin: bytes) -> None:
    """Each sign fires on its crafted message, not on its legitimate twin, and is never a Bayes token."""
    view = mailview.build(crafted)
    assert run_check(name, view)
    assert not run_check(name, mailview.build(twin))
    assert f"sign:{name}" not in tokens(view)


@pytest.mark.parametrize(("rule", "spam", "ham", "method"), [
    ("MALFORMED_DATE", dated("Wed, 24 Jul 2002 20:03:30"), dated("Wed, 24 Jul 2002 20:03:30 +0100"), "headers"),
    ("SUBJECT_RANDOM_TOKEN", letter("", "<a1@example.net>", subject="Aviso Ra3HNiammhtn7Q3joVp"),
     letter("", "<a1@example.net>", subject="Aviso 2026-0042"), "rules"),
    ("DISPLAY_NAME_NUMBER", letter("", "<a1@example.net>", sender='"[GovBR] - 6231497581941" <a@x.example.net>'),
     letter("", "<a1@example.net>", sender='"GovBR" <a@x.example.net>'), "rules"),
    ("COIN_DISPLAY_NAME", letter("", "<a1@example.net>", sender='"Stellar Foundation" <r.diaz@una.example.edu>'),
     letter("", "<a1@example.net>", sender='"Stellar" <news@stellar.org>'), "rules"),
])
def test_the_new_marks_reach_the_verdict(rules_bases: str, rule: str, spam: bytes, ham: bytes, method: str) -> None:
    """The rule's name and weight are in the reasons (X-SpamTest-Method names its family when it
    decides); its legitimate twin has no such reason."""
    spam_filter = SpamFilter(SimpleNamespace(Check=True, SpamDetection="standard"), rules_bases)
    weight = next(r.weight for r in default_rules() if r.name == rule)
    hit = spam_filter.classify(spam, None, "", [], [])
    missed = spam_filter.classify(ham, None, "", [], [])
    assert f"rule {rule} {weight:+.2f}" in hit.reasons, hit.reasons
    assert hit.method == method, (hit.method, hit.reasons)
    assert not any(reason.startswith(f"rule {rule} ") for reason in missed.reasons), missed.reasons
