"""What agents read of a message and its attachments, within the configured budget.

The work is pure (:mod:`mailgate.domain.extract`); this service picks the budget and
loads attachment bytes through :class:`~mailgate.services.queries.QueryService`, whose
``get_attachment`` checks the scope and pins the read to the caller's tenant, so an
attachment of another agent's message is ``not_found`` here exactly as on the byte
download route.
"""

from __future__ import annotations

from mailgate.config import Settings
from mailgate.domain import extract
from mailgate.domain.extract import AttachmentText, Extracted
from mailgate.domain.keys import Principal
from mailgate.errors import ValidationFailed
from mailgate.services.queries import MessageDetail, QueryService


class ExtractionService:
    """Extracted text of messages and attachments, never longer than the budget."""

    def __init__(self, queries: QueryService, settings: Settings) -> None:
        self.queries = queries
        self.settings = settings

    def budget(self, max_chars: int | None) -> int:
        """The budget of one call: what the caller asked for, capped at
        ``extract_max_chars`` (a caller may ask for less, never more).

        Raises:
            ValidationFailed: ``max_chars`` is below 1.
        """
        if max_chars is None:
            return self.settings.extract_max_chars
        if max_chars < 1:
            raise ValidationFailed(
                "max_chars must be at least 1",
                errors=[{"field": "max_chars", "message": "must be at least 1"}],
            )
        return min(max_chars, self.settings.extract_max_chars)

    def message_extract(
        self, detail: MessageDetail, *, max_chars: int | None = None
    ) -> tuple[Extracted, Extracted]:
        """The new text of a message and its HTML without quoted history: ``(text, html)``.

        Raises:
            ValidationFailed: ``max_chars`` is below 1.
        """
        budget = self.budget(max_chars)
        return (
            extract.reply_text(detail.text, detail.html, max_chars=budget),
            extract.reply_html(detail.html, max_chars=budget),
        )

    def attachment_extract(
        self,
        principal: Principal,
        message_id: str,
        attachment_id: str,
        *,
        max_chars: int | None = None,
    ) -> AttachmentText:
        """The text of one attachment, or why there is none (type, size, damage).

        Raises:
            ValidationFailed: ``max_chars`` is below 1.
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such attachment on a message visible to the caller.
        """
        budget = self.budget(max_chars)
        found = self.queries.get_attachment(principal, message_id, attachment_id)
        return extract.attachment_text(
            found.data,
            content_type=found.info.content_type,
            filename=found.info.filename,
            max_chars=budget,
            max_bytes=self.settings.extract_max_attachment_bytes,
        )
