"""Routes for the review inbox and the trash (``/v1/review``, message trash/restore)."""

from __future__ import annotations

from fastapi import APIRouter

from mailgate.api.errors import PROBLEM_RESPONSES

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)
