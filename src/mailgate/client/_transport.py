"""Performing a :class:`~mailgate.client._calls.Call`: configuration, authentication,
retries and error mapping, once for the sync client and once for the async one."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import httpx

from mailgate.client._calls import Call
from mailgate.client._errors import (
    MailgateAPIError,
    MailgateClientError,
    MailgateConnectionError,
    MailgateTimeoutError,
    error_from_response,
)
from mailgate.client._retry import RetryPolicy, parse_retry_after

T = TypeVar("T")

__version__ = "0.1.0"
DEFAULT_TIMEOUT = 30.0
USER_AGENT = f"mailgate-python/{__version__}"


class _Config:
    """What both clients are configured with (explicit arguments, else environment)."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        retry: RetryPolicy | None,
    ) -> None:
        base_url = base_url or os.environ.get("MAILGATE_URL")
        api_key = api_key or os.environ.get("MAILGATE_API_KEY")
        if not base_url:
            raise MailgateClientError("no base_url given and MAILGATE_URL is not set")
        if not api_key:
            raise MailgateClientError("no api_key given and MAILGATE_API_KEY is not set")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = (
            timeout
            if isinstance(timeout, httpx.Timeout)
            else httpx.Timeout(DEFAULT_TIMEOUT if timeout is None else timeout)
        )
        if retry is None:
            retry = RetryPolicy(max_retries=max_retries)
        self.retry = retry

    def request_args(self, call: Call[Any]) -> dict[str, Any]:
        timeout = self.timeout
        if call.extra_timeout and timeout.read is not None:
            timeout = httpx.Timeout(
                connect=timeout.connect,
                read=timeout.read + call.extra_timeout,
                write=timeout.write,
                pool=timeout.pool,
            )
        headers = {
            "Authorization": f"Bearer {self.api_key}",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            **call.headers,
        }
        args: dict[str, Any] = {
            "method": call.method,
            "url": self.base_url + call.path,
            "params": call.params,
            "headers": headers,
            "timeout": timeout,
        }
        if call.json is not None:
            args["json"] = call.json
        return args


def _failure(response: httpx.Response) -> MailgateAPIError:
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return error_from_response(response, retry_after=retry_after)


def _connection_error(exc: httpx.TransportError, call: Call[Any]) -> MailgateConnectionError:
    timed_out = isinstance(exc, httpx.TimeoutException)
    cls = MailgateTimeoutError if timed_out else MailgateConnectionError
    return cls(f"{call.method} {call.path}: {type(exc).__name__}: {exc}")


class SyncTransport:
    def __init__(
        self,
        config: _Config,
        *,
        http_client: httpx.Client | None,
        transport: httpx.BaseTransport | None,
        sleep: Callable[[float], None] | None,
    ) -> None:
        self.config = config
        self._owns_client = http_client is None
        self.http = http_client or httpx.Client(transport=transport)
        self.sleep = sleep or time.sleep

    def perform(self, call: Call[T]) -> T:
        """Send ``call``, retrying what may be retried.

        Raises:
            MailgateAPIError: an error answer (its subclass by status).
            MailgateConnectionError: no answer, after the retries allowed.
        """
        policy, retry = self.config.retry, 0
        while True:
            try:
                response = self.http.request(**self.config.request_args(call))
            except httpx.TransportError as exc:
                delay = policy.after_error(retry, retry_safe=call.retry_safe)
                if delay is None:
                    raise _connection_error(exc, call) from exc
            else:
                if response.is_success:
                    return call.parse(response)
                error = _failure(response)
                delay = policy.after_status(retry, error, retry_safe=call.retry_safe)
                if delay is None:
                    raise error
            self.sleep(delay)
            retry += 1

    def close(self) -> None:
        if self._owns_client:
            self.http.close()


class AsyncTransport:
    def __init__(
        self,
        config: _Config,
        *,
        http_client: httpx.AsyncClient | None,
        transport: httpx.AsyncBaseTransport | None,
        sleep: Callable[[float], Awaitable[None]] | None,
    ) -> None:
        self.config = config
        self._owns_client = http_client is None
        self.http = http_client or httpx.AsyncClient(transport=transport)
        self.sleep = sleep or anyio.sleep

    async def perform(self, call: Call[T]) -> T:
        """Send ``call``, retrying what may be retried (as :meth:`SyncTransport.perform`)."""
        policy, retry = self.config.retry, 0
        while True:
            try:
                response = await self.http.request(**self.config.request_args(call))
            except httpx.TransportError as exc:
                delay = policy.after_error(retry, retry_safe=call.retry_safe)
                if delay is None:
                    raise _connection_error(exc, call) from exc
            else:
                if response.is_success:
                    return call.parse(response)
                error = _failure(response)
                delay = policy.after_status(retry, error, retry_safe=call.retry_safe)
                if delay is None:
                    raise error
            await self.sleep(delay)
            retry += 1

    async def aclose(self) -> None:
        if self._owns_client:
            await self.http.aclose()
