"""The JSON shapes of ``/v1/rules``, ``/v1/contacts`` and ``/v1/workspace/settings``.

Kept apart from :mod:`mailgate.api.schemas` so the policy routes own their contract.
A rule's ``condition`` is free JSON here on purpose: the rules engine validates it
(:func:`mailgate.domain.rules.validate_rule`) and names problems by path, such as
``condition.any[1].value``, which a schema of nested models could not do as well.

Request models are strict: ``"enabled": "yes"`` is refused, not read as true.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, field_validator

from mailgate.domain import rules

Direction = rules.Direction
Action = rules.Action
Scope = Literal["agent", "workspace", "all"]
Verdict = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"]

AgentId = Annotated[str, StringConstraints(min_length=1, max_length=40)]
Name = Annotated[str, StringConstraints(max_length=200)]
RuleId = Annotated[str, StringConstraints(min_length=1, max_length=40)]

MAX_REORDER = 10_000
"""Most rule ids one reorder may name."""

_CONDITION_DOC = (
    "The condition tree: `{field, match, value[, case_sensitive]}`, or "
    "`{all: [...]}`, `{any: [...]}`, `{not: {...}}`. Fields: from, from_domain, to, cc, "
    "subject, body, attachment_type, attachment_name, spf, dkim, dmarc, has_attachment, "
    "known_contact, size, `header:<Name>`. Matches: is, contains, glob, regex (RE2), "
    "and gt/lt for size; case-insensitive unless `case_sensitive`."
)
_CONDITION_EXAMPLE: dict[str, JsonValue] = {
    "all": [
        {"field": "from_domain", "match": "is", "value": "example.com"},
        {"field": "subject", "match": "contains", "value": "invoice"},
    ]
}


class _Model(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)

    @classmethod
    def of(cls, value: object) -> Self:
        """The response for a service result of the same shape."""
        return cls.model_validate(value)


class _Request(BaseModel):
    # A misspelt field must fail loudly, and a string is not a boolean.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @field_validator("*")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        """JSON may spell lone surrogates (``"\\ud800"``), which no database or MIME
        parser can take: refuse them here, naming the field, instead of a 500 later."""
        _check_text(value)
        return value


class _Patch(_Request):
    """A partial update: a field left out keeps its value; an explicit null is refused
    (every field here has a value, so null would only hide a client bug)."""

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("leave the field out to keep its value; null is not a value")
        return value


def _check_text(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text holds a lone surrogate (not valid Unicode)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_text(item)
    elif isinstance(value, list):
        for item in value:
            _check_text(item)


# -- rules ------------------------------------------------------------------------------


class RuleOut(_Model):
    """A stored rule."""

    rule_id: str
    agent_id: str | None = Field(description="Null for a workspace default.")
    scope: Literal["agent", "workspace"]
    name: str
    position: int = Field(description="Order within its owner's rules; lower runs first.")
    enabled: bool
    direction: Direction
    action: Action
    condition: dict[str, Any] = Field(description=_CONDITION_DOC)
    created_at: datetime
    updated_at: datetime


class RuleList(_Model):
    rules: list[RuleOut] = Field(
        description="In evaluation order: agents' own rules by position, then the "
        "workspace defaults."
    )


class RuleIn(_Request):
    """A new rule: an agent's (``agent_id``) or a workspace default (no ``agent_id``)."""

    agent_id: AgentId | None = None
    name: Name = ""
    action: Action = Field(
        description="Inbound: deliver, review, trash, quarantine. Outbound (stored, "
        "enforced by the outbound pipeline): deliver, require_approval, block."
    )
    condition: JsonValue = Field(
        description=_CONDITION_DOC, json_schema_extra={"example": _CONDITION_EXAMPLE}
    )
    direction: Direction = "inbound"
    enabled: bool = True
    position: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Where in the owner's list (0 = first); default last."
    )


class RulePatch(_Patch):
    """Fields to change; those left out keep their value."""

    name: Name | None = None
    action: Action | None = None
    condition: JsonValue = Field(None, description=_CONDITION_DOC)
    direction: Direction | None = None
    enabled: bool | None = None
    position: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Move within the owner's list (0 = first)."
    )

    def changes(self) -> dict[str, Any]:
        """Only the fields the client sent."""
        return self.model_dump(exclude_unset=True)


class RuleDeleted(_Model):
    rule_id: str
    deleted: Literal[True] = True


class ReorderIn(_Request):
    agent_id: AgentId | None = Field(
        None, description="Whose rules; null for the workspace defaults."
    )
    rule_ids: list[RuleId] = Field(
        max_length=MAX_REORDER, description="Every rule of that owner, in the new order."
    )


class AuthIn(_Request):
    """Sender-authentication verdicts to assume in a dry run."""

    spf: Verdict = "none"
    spf_domain: Annotated[str, StringConstraints(max_length=255)] | None = None
    dkim: Verdict = "none"
    dkim_domains: list[Annotated[str, StringConstraints(max_length=255)]] = Field(
        default_factory=list, max_length=20
    )
    dmarc: Verdict = "none"

    def facts(self) -> rules.AuthResults:
        return rules.AuthResults.from_dict(self.model_dump())


class RuleTestIn(_Request):
    """A dry run: exactly one of ``message_id`` and ``raw``."""

    agent_id: AgentId | None = Field(
        None, description="Whose policy; required with `raw`, default the message's agent."
    )
    message_id: Annotated[str, StringConstraints(min_length=1, max_length=40)] | None = None
    raw: str | None = Field(None, description="A pasted message (MIME text).")
    rule: dict[str, JsonValue] | None = Field(
        None,
        description="An unsaved rule (as `POST /v1/rules` takes it, without `agent_id`), "
        "run enabled and before the stored ones.",
    )
    auth: AuthIn | None = Field(
        None,
        description="Verdicts to assume; default those recorded with the stored message, "
        "or none (unauthenticated) for `raw`.",
    )


class ConditionResultOut(_Model):
    path: str = Field(description="As in validation errors: `condition.any[1]`.")
    condition: str
    result: bool


class RuleTraceOut(_Model):
    rule_id: str | None = Field(description="Null for the unsaved rule of the request.")
    rule_name: str
    matched: bool
    conditions: list[ConditionResultOut]


class RuleTestOut(_Model):
    """What the policy decided, and how it got there."""

    action: Action
    rule_id: str | None = Field(description="The matching rule; null when none matched.")
    rule_name: str | None
    reasons: list[str]
    contact_bypass: bool = Field(
        description="An authenticated, auto-approved known contact skipped the rules."
    )
    trace: list[RuleTraceOut] = Field(
        description="Each rule tried, in order, up to the first match (empty on a bypass)."
    )

    @classmethod
    def of_decision(cls, decision: rules.RuleDecision) -> RuleTestOut:
        return cls.model_validate({"trace": [], **decision.as_dict()})


# -- contacts ---------------------------------------------------------------------------


class ContactOut(_Model):
    contact_id: str
    agent_id: str | None = Field(description="Null for a workspace-wide contact.")
    scope: Literal["agent", "workspace"]
    kind: Literal["address", "domain"]
    value: str = Field(description="The address or domain, lower-cased.")
    name: str
    auto_approve: bool = Field(
        description="Its authenticated mail skips the rules (when the workspace allows)."
    )
    created_at: datetime


class ContactList(_Model):
    contacts: list[ContactOut]


class ContactIn(_Request):
    """A known sender: exactly one of ``address`` and ``domain``."""

    agent_id: AgentId | None = Field(None, description="Whose; null for the whole workspace.")
    address: Annotated[str, StringConstraints(max_length=320)] | None = None
    domain: Annotated[str, StringConstraints(max_length=255)] | None = Field(
        None, description="Covers addresses at exactly this domain (not subdomains)."
    )
    name: Name = ""
    auto_approve: bool = True


class ContactDeleted(_Model):
    contact_id: str
    deleted: Literal[True] = True


class ContactPatch(_Patch):
    name: Name | None = None
    auto_approve: bool | None = None


# -- workspace settings -----------------------------------------------------------------


class WorkspaceSettingsOut(_Model):
    workspace_id: str
    contacts_bypass: bool = Field(
        description="An authenticated, auto-approved known contact skips the rules."
    )


class WorkspaceSettingsPatch(_Patch):
    contacts_bypass: bool | None = None
