"""What routes take from the request: the instance's services, and the user of its API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from imagegen.gateway.auth import authenticate
from imagegen.gateway.services import Services


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _user(request: Request) -> str:
    return authenticate(request, services_of(request).keys)


User = Annotated[str, Depends(_user)]
Svc = Annotated[Services, Depends(services_of)]
