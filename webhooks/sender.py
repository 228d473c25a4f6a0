"""POST one webhook to one vetted target, and say how it went.

The connection goes to an address `infra.webhook_targets.resolve` vetted, never to the
name: the URL is rewritten to the IP literal, the Host header carries the real name, and TLS
is told the real name (`sni_hostname`) so that SNI and certificate verification use it. A
name that resolves elsewhere between the check and the connect (DNS rebinding) cannot move
the connection inside the network.

The receiver's answer is judged by its status line alone: its body is never read, so a
receiver cannot make the deliverer hold (or log) whatever it sends back.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Final

import httpx

from imagegen.infra.settings import Settings
from imagegen.infra.webhook_targets import WebhookTarget

_ERROR_LIMIT: Final = 300


def _user_agent() -> str:
    try:
        return f"imagegen-webhooks/{version('imagegen-pipeline')}"
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "imagegen-webhooks/unknown"


USER_AGENT: Final = _user_agent()


@dataclass(frozen=True)
class DeliveryAttempt:
    #: The receiver answered 2xx.
    delivered: bool
    #: The receiver's status, None when no answer came.
    status_code: int | None
    #: Why it was not delivered, None when it was. Names at most scheme://host:port of the
    #: URL, never its path or query (they may hold the receiver's secrets).
    error: str | None
    #: Whether trying again later can succeed: every network and HTTP failure can.
    retryable: bool
    elapsed_s: float


class WebhookSender:
    """One HTTP client shared by the deliverer's threads (httpx's client is thread-safe).
    Pass `ssl_context` to trust other certificate authorities than the system's."""

    def __init__(self, settings: Settings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._connect_timeout_s = settings.webhook_connect_timeout_s
        self._read_timeout_s = settings.webhook_read_timeout_s
        self._client = httpx.Client(
            timeout=httpx.Timeout(settings.webhook_read_timeout_s, connect=self._connect_timeout_s),
            # No keep-alive: the pool keys connections by address, not by name, so a
            # kept connection verified for one name could carry a request for another
            # name at the same address without that name's certificate being checked.
            limits=httpx.Limits(
                max_connections=settings.webhook_concurrency, max_keepalive_connections=0
            ),
            # A redirect could point anywhere, the inside of the network included.
            follow_redirects=False,
            # No HTTP(S)_PROXY, NO_PROXY or SSL_CERT_FILE from the environment: a proxy
            # would resolve the name itself, undoing the pinning to vetted addresses.
            trust_env=False,
            verify=ssl_context if ssl_context is not None else True,
        )

    def send(
        self, target: WebhookTarget, body: bytes, headers: Mapping[str, str]
    ) -> DeliveryAttempt:
        """POST `body` to `target`, trying its addresses in turn while they refuse the
        connection. Never raises for what the network or the receiver did."""
        started = time.monotonic()
        # httpx.Headers merges case-insensitively: a caller's "host" cannot add a second one.
        request_headers = httpx.Headers(
            {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        )
        request_headers.update(headers)
        request_headers["Host"] = _host_header(target)  # the name, not the pinned address
        error = f"{target.origin} has no vetted addresses"
        for address in target.addresses:
            try:
                status = self._post(target, address, body, request_headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error = self._describe(exc, target)
                continue  # the next address may accept
            except httpx.InvalidURL:
                why = f"{target.origin}: the URL's path or query is not valid"
                return _failed(started, why, retryable=False)
            except (httpx.HTTPError, OSError) as exc:
                return _failed(started, self._describe(exc, target))
            return _answered(started, status, target)
        if len(target.addresses) > 1:
            error = f"{error} (tried {len(target.addresses)} addresses)"
        return _failed(started, error)

    def close(self) -> None:
        self._client.close()

    def _post(
        self, target: WebhookTarget, address: str, body: bytes, headers: httpx.Headers
    ) -> int:
        url = f"{target.scheme}://{_bracketed(address)}:{target.port}{target.path_and_query}"
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        with self._client.stream(
            "POST", url, content=body, headers=headers, extensions=extensions
        ) as response:
            # Leaving the block closes the response unread: the connection is dropped,
            # not drained, so a large or endless body costs nothing.
            return response.status_code

    def _describe(self, exc: Exception, target: WebhookTarget) -> str:
        kind = type(exc).__name__
        if isinstance(exc, httpx.ConnectTimeout):
            return f"{kind}: no connection within {self._connect_timeout_s:g} s to {target.origin}"
        if isinstance(exc, httpx.PoolTimeout):
            return f"{kind}: no free connection within {self._read_timeout_s:g} s"
        if isinstance(exc, httpx.WriteTimeout):
            return f"{kind}: could not send within {self._read_timeout_s:g} s to {target.origin}"
        if isinstance(exc, httpx.TimeoutException):
            return f"{kind}: no answer within {self._read_timeout_s:g} s from {target.origin}"
        return f"{kind}: {_scrubbed(str(exc), target) or 'no details'} ({target.origin})"


def _answered(started: float, status: int, target: WebhookTarget) -> DeliveryAttempt:
    elapsed = time.monotonic() - started
    if 200 <= status < 300:
        return DeliveryAttempt(True, status, None, retryable=False, elapsed_s=elapsed)
    if 300 <= status < 400:
        error = f"redirect ({status}) not followed: {target.origin} must answer 2xx itself"
    else:
        error = f"HTTP {status} from {target.origin}"
    return DeliveryAttempt(False, status, error, retryable=True, elapsed_s=elapsed)


def _failed(started: float, error: str, *, retryable: bool = True) -> DeliveryAttempt:
    elapsed = time.monotonic() - started
    return DeliveryAttempt(False, None, error[:_ERROR_LIMIT], retryable, elapsed)


def _scrubbed(text: str, target: WebhookTarget) -> str:
    """`text` without the URL's path and query, should an exception's message quote them."""
    path, _, query = target.path_and_query.partition("?")
    for secret in (target.path_and_query, query, path):
        if len(secret) > 1:  # "/" alone gives nothing away
            text = text.replace(secret, "…")
    return text


def _host_header(target: WebhookTarget) -> str:
    default = {"https": 443, "http": 80}[target.scheme]
    host = _bracketed(target.host)
    return host if target.port == default else f"{host}:{target.port}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
