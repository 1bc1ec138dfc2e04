"""Provider webhooks (``/inbound/...``): SendGrid, Mailgun, Postmark and raw MIME."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/inbound", tags=["inbound"])
