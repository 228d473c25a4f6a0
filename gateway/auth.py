"""Who is asking: the `Authorization: Bearer <API key>` of every route, checked against
the key book (`infra.key_book`), which follows imagegen.api-keys and so sees a revocation
within about one fetch wait.

The key alone decides the user: a request never names its user itself. The token is
neither logged nor kept; only the user it maps to travels on (`request.scope`, for the
request log).
"""

from __future__ import annotations

from typing import Protocol

from fastapi import Request

from imagegen.gateway.problems import unauthorized

#: Where the authenticated user is left in the ASGI scope, for the request log.
USER_SCOPE_KEY = "imagegen.user_id"
_SCHEME = "bearer"


class Keys(Protocol):
    def user_for(self, token: str) -> str | None: ...


def user_of(authorization: str | None, keys: Keys) -> str:
    """The user of the bearer token in `authorization`; raises the 401 problem otherwise."""
    if not authorization:
        raise unauthorized(
            "send your API key as `Authorization: Bearer <key>` (an operator makes one "
            "with `imagegen keys create --user <you>`)"
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != _SCHEME or not token.strip():
        raise unauthorized("the Authorization header must be `Bearer <key>`")
    user = keys.user_for(token.strip())
    if user is None:
        raise unauthorized("this API key is unknown or revoked: ask an operator for a new one")
    return user


def authenticate(request: Request, keys: Keys) -> str:
    """`user_of` the request's header, remembered in its scope for the request log."""
    user = user_of(request.headers.get("authorization"), keys)
    request.scope[USER_SCOPE_KEY] = user
    return user
