"""Edges that send mail out: one :class:`Transport` per process, chosen by settings."""

from __future__ import annotations

from mailgate.clock import Clock
from mailgate.config import Settings
from mailgate.store.blobs import BlobStore
from mailgate.store.db import Database
from mailgate.transports.base import OutgoingMessage, Transport, TransportReceipt
from mailgate.transports.capture import CaptureTransport
from mailgate.transports.sendgrid import SendGridTransport
from mailgate.transports.smtp_relay import SmtpRelayTransport

__all__ = [
    "CaptureTransport",
    "OutgoingMessage",
    "SendGridTransport",
    "SmtpRelayTransport",
    "Transport",
    "TransportReceipt",
    "build_transport",
]


def build_transport(settings: Settings, db: Database, blobs: BlobStore, clock: Clock) -> Transport:
    """The transport ``settings.transport`` names. ``blobs`` is unused today (the
    delivery service stores the bytes before any transport sees them) and kept so
    a transport that needs them later changes no caller."""
    del blobs
    if settings.transport == "smtp":
        return SmtpRelayTransport(settings)
    if settings.transport == "sendgrid":
        return SendGridTransport(settings)
    return CaptureTransport(db, clock)
