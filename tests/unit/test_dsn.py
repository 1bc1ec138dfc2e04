"""DSN parsing (RFC 3464) against every real delivery report in the corpus, plus the
messy shapes the corpus does not cover."""

from __future__ import annotations

import email
from email.policy import compat32
from pathlib import Path
from typing import NamedTuple

import pytest

from mailgate.domain.dsn import DeliveryReport, is_delivery_report, parse_report
from tests.conftest import CORPUS


class Expected(NamedTuple):
    recipients: tuple[str, ...]
    action: str
    status: str | None
    permanent: bool
    message_id: str | None


# Every corpus file that mentions delivery-status, with what it reports. A new corpus
# DSN without a row here fails test_every_corpus_dsn_has_an_expectation.
CORPUS_DSNS: dict[str, Expected] = {
    "apache-spamassassin/BOUNCE_MESSAGE__14": Expected(
        ("s.woolcock@cris.unu.edu",), "failed", "5.1.1", True,
        "000801c8deee$04218af2$38f93592@rqgxb",
    ),
    "apache-spamassassin/BOUNCE_MESSAGE__bug5884_att4343_2": Expected(
        ("vos01589@planet.nl",), "failed", "5.2.2", True,
        "20080620080238.2855.qmail@eka74.internetdsl.tpnet.pl",  # text/rfc822-headers
    ),
    "apache-spamassassin/BOUNCE_MESSAGE__bug5884_att4343_centroshop": Expected(
        ("aleshina@centroshop.ru", "i.aandrievskih@centroshop.ru", "i.alekhina@centroshop.ru"),
        "failed", "5.0.0", True, "20060625161316.694E27A5DD4@mx1.office",
    ),
    "apache-spamassassin/BOUNCE_MESSAGE__bug5884_att4343_tbwamerlin": Expected(
        ("b16f1252@tequila.ro",), "failed", "5.1.1", True,
        "20080613141906.2299.qmail@ser-c60bcda6c48",
    ),
    "apache-spamassassin/BOUNCE_MESSAGE__fp_bug5912_att4321": Expected(
        ("wlycnh1@pacbell.net",), "failed", "5.3.0", True, "06794767.cb647dd91f65@192.168.0.141"
    ),
    "apache-spamassassin/BOUNCE_MESSAGE__fp_bug5912_att4322": Expected(
        ("wlycnh1@pacbell.net",), "failed", "5.3.0", True, "06794767.cb647dd91f65@192.168.0.141"
    ),
    # The recipient group is base64-encoded on its own inside the report part.
    "jstedfast-mimekit/messages__bounce.txt": Expected(
        ("netec.test@netecgc.com",), "failed", "5.1.1", True,
        "44565655.JitbitHelpdesk.13439.691a0afc-a0a0-457c-8208-f20b7c4a4cb1@jitbit.com",
    ),
    # No Action, only Original-Recipient, and extra blank lines between the groups.
    "jstedfast-mimekit/messages__delivery-status-multiple-blank-lines.txt": Expected(
        ("orig_recip@customer.com",), "failed", "5.5.0", True, None
    ),
    # No Status: the class comes from "Diagnostic-Code: X-LOCAL; 500 (err.nosuchuser)".
    "jstedfast-mimekit/messages__delivery-status-no-blank-line.txt": Expected(
        ("newsletter-request@imusic.com",), "failed", None, True, "31FC7EB4.41C6@netscape.com"
    ),
    "jstedfast-mimekit/messages__delivery-status.txt": Expected(
        ("newsletter-request@imusic.com",), "failed", None, True, "31FC7EB4.41C6@netscape.com"
    ),
    "jstedfast-mimekit/messages__delivery-status2.txt": Expected(
        ("source@domain.com",), "failed", "5.0.0", True, None  # the original has no id
    ),
    # A bare message/delivery-status with MIME headers inside the groups; 4.x.x.
    "mailgun-flanker/bounce__delayed-broken.eml": Expected(
        ("demo@example.com",), "failed", "4.2.2", False, None
    ),
    "mailgun-flanker/bounce__delayed.eml": Expected(
        ("foo@example.com",), "failed", "4.0.0", False, None
    ),
    "mailgun-flanker/bounce__mailbox-full.eml": Expected(
        ("user@aol.com",), "failed", "5.2.2", True, "4E326A95.3010907@example.com"
    ),
    "mailgun-flanker/bounce__no-mx.eml": Expected(
        ("user@example.com",), "delayed", "4.4.4", False, "19E44CA63F984902B7D654F8FF40F89D@bo"
    ),
    "mailgun-flanker/bounce__office365.eml": Expected(
        ("noname@example.com",), "failed", "5.1.10", True,
        "20171013111011.20866.254C2F3A4D7AA526@ninomail.com",
    ),
    "mailgun-flanker/bounce__zed.eml": Expected(
        ("asdfasdfasdfasdfasdfasdfewrqertrtyrthsfgdfgadfqeadvxzvz@gmail.com",), "failed",
        "5.1.1", True, "20090708054735.GC7578@example.com",
    ),
    "mikel-mail/multipart_report_emails__multi_address_bounce1.eml": Expected(
        (
            "bbbbvhvbbvkjbhfbvbvjhb@gmail.com",
            "bscdbcjhasbcjhbdscbhbsdhcbj@gmail.com",
            "egyfefsdvsfvvhjsd@gmail.com",
            "kfhejkfbsjkjsbhds@gmail.com",
            "qfvhgsvhgsduiohncdhcvhsdfvsfygusd@gmail.com",
        ),
        "failed", "5.1.1", True, "118707422.15521266992174819.JavaMail.root@lvmail01",
    ),
    # Two report parts, the first holding prose instead of fields.
    "mikel-mail/multipart_report_emails__multipart_report_multiple_status.eml": Expected(
        ("u@ci.com",), "failed", "5.3.0", True, "4c2a146147ac8_61ff157c4ec1652df@s.h.c.mail"
    ),
    "mikel-mail/multipart_report_emails__report_422.eml": Expected(
        ("fraser@oooooooo.com.au",), "delayed", "4.2.2", False,
        "15655788.13.1200472642578.JavaMail.Administrator@mail.ttttt.com.au",
    ),
    "mikel-mail/multipart_report_emails__report_530.eml": Expected(
        ("edwin@zzzzzzz.com",), "failed", "5.3.0", True,
        "200712232303.lBNN3jDq002941@mail12.rrrr.com.au",
    ),
    # message/rfc822-headers (unregistered) and "4.2.2 (comment)" with Action failed.
    "spamscope-mail-parser/mail_malformed_2": Expected(
        ("abh@netpar.com.br",), "failed", "4.2.2", False,
        "004801d1fc84$01c934ac$b247f0b7$@infospacemail.com",
    ),
}  # fmt: skip


def _corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name != "SOURCES.md")


def _mentions_delivery_status(path: Path) -> bool:
    return b"delivery-status" in path.read_bytes().lower()


def test_every_corpus_dsn_has_an_expectation() -> None:
    found = {str(p.relative_to(CORPUS)) for p in _corpus_files() if _mentions_delivery_status(p)}

    assert found == set(CORPUS_DSNS)


@pytest.mark.parametrize("name", sorted(CORPUS_DSNS))
def test_a_corpus_dsn_reports_its_recipients_action_status_and_original(name: str) -> None:
    expected = CORPUS_DSNS[name]
    raw = (CORPUS / name).read_bytes()

    report = parse_report(raw)

    assert report is not None
    assert is_delivery_report(raw)
    assert tuple(r.address for r in report.recipients) == expected.recipients
    assert {r.action for r in report.recipients} == {expected.action}
    assert {r.status for r in report.recipients} == {expected.status}
    assert {r.is_permanent for r in report.recipients} == {expected.permanent}
    assert report.original_message_id == expected.message_id
    assert report.reporting_mta


def test_a_parsed_message_object_reads_like_its_bytes() -> None:
    raw = (CORPUS / "mailgun-flanker/bounce__zed.eml").read_bytes()

    assert parse_report(email.message_from_bytes(raw, policy=compat32)) == parse_report(raw)


def test_postfix_fields_are_kept_per_message_and_remote_mta_per_recipient() -> None:
    raw = (CORPUS / "apache-spamassassin/BOUNCE_MESSAGE__fp_bug5912_att4321").read_bytes()

    report = parse_report(raw)

    assert report is not None
    assert report.fields["x-postfix-queue-id"] == "3E2479E5965"
    [entry] = report.recipients
    assert entry.remote_mta == "pbimail5.prodigy.net"
    assert entry.original_recipient == "wlycnh1@pacbell.net"
    assert entry.reply_code == 553
    assert (
        entry.diagnostic_code is not None and "Addressee unknown, relay=" in entry.diagnostic_code
    )


@pytest.mark.parametrize(
    "path", [p for p in _corpus_files() if not _mentions_delivery_status(p)], ids=lambda p: p.name
)
def test_corpus_mail_that_is_no_delivery_report_gives_none(path: Path) -> None:
    assert parse_report(path.read_bytes()) is None


@pytest.mark.parametrize(
    "name",
    [
        "apache-spamassassin/BOUNCE_MESSAGE__2",  # prose bounce, text/plain
        "mailgun-flanker/bounce__gmail-invalid-address.eml",
        "mailgun-flanker/complaints__aol.eml",  # multipart/report, feedback-report
        "mailgun-flanker/disposition-notification.eml",  # a read receipt
    ],
)
def test_a_bounce_or_report_that_is_not_rfc_3464_gives_none_rather_than_a_guess(name: str) -> None:
    assert parse_report((CORPUS / name).read_bytes()) is None


def _dsn(report_part: str, *, returned: str = "", root_type: str = "multipart/report") -> bytes:
    returned_part = (
        f"--B\r\nContent-Type: text/rfc822-headers\r\n\r\n{returned}\r\n" if returned else ""
    )
    return (
        "From: MAILER-DAEMON@mx.example.net\r\n"
        "To: bot@agents.test\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f'Content-Type: {root_type}; report-type=delivery-status;\r\n boundary="B"\r\n'
        "\r\n"
        "--B\r\nContent-Type: text/plain\r\n\r\nSorry.\r\n"
        f"--B\r\nContent-Type: message/delivery-status\r\n\r\n{report_part}\r\n"
        f"{returned_part}--B--\r\n"
    ).encode()


def test_groups_without_blank_lines_split_where_a_recipient_field_repeats() -> None:
    raw = _dsn(
        "reporting-mta: DNS; mx.example.net\r\n"
        "ORIGINAL-ENVELOPE-ID: out_123\r\n"
        "\r\n"
        "final-recipient: RFC822; <A@Example.org>\r\n"
        "ACTION: Failed\r\n"
        "status: 5.1.1\r\n"
        "diagnostic-code: smtp; 550 5.1.1 no such\r\n"
        "  user here\r\n"
        "Final-Recipient: rfc822;b@example.org\r\n"
        "Action: delayed\r\n"
        "Status: 4.4.1\r\n",
        returned="Message-ID: <out_123@agents.test>\r\nSubject: hi\r\n",
    )

    report = parse_report(raw)

    assert report is not None
    first, second = report.recipients
    assert (first.address, first.action, first.status, first.is_permanent) == (
        "a@example.org", "failed", "5.1.1", True,
    )  # fmt: skip
    assert first.diagnostic_code == "smtp; 550 5.1.1 no such user here"  # unfolded
    assert (second.address, second.is_delay, second.is_permanent) == ("b@example.org", True, False)
    assert report.original_envelope_id == "out_123"
    assert report.original_message_id == "out_123@agents.test"
    assert report.reporting_mta == "mx.example.net"
    assert report.permanent_failures == (first,)


def test_a_missing_action_is_inferred_from_the_status_class_and_recorded() -> None:
    raw = _dsn(
        "Reporting-MTA: dns; mx\r\n\r\nFinal-Recipient: rfc822; c@example.org\r\nStatus: 2.0.0\r\n"
    )

    report = parse_report(raw)

    assert report is not None
    assert report.recipients[0].action == "delivered"
    assert report.recipients[0].is_success
    assert any("Action" in d for d in report.defects)


def test_a_group_naming_no_recipient_is_skipped_and_none_at_all_gives_none() -> None:
    assert (
        parse_report(_dsn("Reporting-MTA: dns; mx\r\n\r\nAction: failed\r\nStatus: 5.0.0\r\n"))
        is None
    )


def test_a_dsn_forwarded_inside_another_message_is_not_taken_for_one() -> None:
    inner = _dsn(
        "Reporting-MTA: dns; mx\r\n\r\n"
        "Final-Recipient: rfc822; d@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    )
    raw = (
        b"From: alice@example.com\r\nTo: bot@agents.test\r\nSubject: Fwd: bounce\r\n"
        b'Content-Type: multipart/mixed; boundary="F"\r\n\r\n'
        b"--F\r\nContent-Type: text/plain\r\n\r\nlook at this\r\n"
        b"--F\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--F--\r\n"
    )

    assert parse_report(raw) is None


def test_a_global_delivery_status_part_is_read_as_text() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example.net\r\nTo: bot@agents.test\r\n"
        b'Content-Type: multipart/report; report-type=global-delivery-status; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: message/global-delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example.net\r\n\r\n"
        b"Final-Recipient: utf-8; j\xc3\xb6rg@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"--B--\r\n"
    )

    report = parse_report(raw)

    assert report is not None
    assert report.recipients[0].address == "jörg@example.org"
    assert report.recipients[0].is_permanent


def test_the_header_hint_looks_at_the_top_level_header_only() -> None:
    report = _dsn("Final-Recipient: rfc822; e@example.org\r\nAction: failed\r\n")
    chatty = b"From: a@example.com\r\nSubject: about multipart/report\r\n\r\nbody"
    body_only = b"From: a@example.com\r\nSubject: hi\r\n\r\nmessage/delivery-status is a type"

    assert is_delivery_report(report)
    assert is_delivery_report(chatty)  # a false positive parse_report then clears
    assert parse_report(chatty) is None
    assert not is_delivery_report(body_only)


def test_a_report_value_is_immutable() -> None:
    report = parse_report(_dsn("Final-Recipient: rfc822; f@example.org\r\nAction: failed\r\n"))

    assert isinstance(report, DeliveryReport)
    with pytest.raises(AttributeError):
        report.original_message_id = "x"  # type: ignore[misc]
