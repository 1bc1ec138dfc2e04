"""Routes for rules and known contacts (``/v1/rules``, ``/v1/contacts``)."""

from __future__ import annotations

from fastapi import APIRouter

from mailgate.api.errors import PROBLEM_RESPONSES

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)
