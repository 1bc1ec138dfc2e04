"""Routes: filled in by the outbound issue."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
