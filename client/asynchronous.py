"""`AsyncClient`: the HTTP API for asyncio, method for method as `Client`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Self

import httpx

from imagegen.client import base
from imagegen.client.models import Job, JobPage, ServerEvent
from imagegen.client.sse import EventParser


class AsyncClient:
    """`base_url` and `api_key` default to IMAGEGEN_GATEWAY_URL and IMAGEGEN_API_KEY."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = base.DEFAULT_TIMEOUT_S,
    ) -> None:
        url, headers = base.connection(base_url, api_key)
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def generate(
        self,
        prompt: str,
        *,
        idempotency_key: str | None = None,
        wait_s: float | None = None,
        **fields: Any,
    ) -> Job:
        call = base.generation(prompt, idempotency_key, wait_s, fields)
        return Job.model_validate((await self._send(call)).json())

    async def job(self, job_id: str) -> Job:
        call = base.Call("GET", f"{base.JOBS}/{job_id}")
        return Job.model_validate((await self._send(call)).json())

    async def jobs(self, limit: int = 20, cursor: str | None = None) -> JobPage:
        return JobPage.model_validate((await self._send(base.job_page(limit, cursor))).json())

    async def all_jobs(self, page_size: int = 100) -> AsyncIterator[Job]:
        cursor: str | None = None
        while True:
            page = await self.jobs(page_size, cursor)
            for job in page.data:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job_id: str) -> Job:
        call = base.Call("POST", f"{base.JOBS}/{job_id}/cancel")
        return Job.model_validate((await self._send(call)).json())

    async def wait(self, job_id: str, timeout_s: float = 300.0, poll_s: float = 0.5) -> Job:
        deadline = time.monotonic() + timeout_s
        while not (job := await self.job(job_id)).ended:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout_s:g}s")
            await asyncio.sleep(poll_s)
        return job

    async def image_url(self, job_id: str) -> str:
        response = await self._send(base.Call("GET", f"{base.JOBS}/{job_id}/image"))
        return response.headers["location"]

    async def download(self, job_id: str) -> bytes:
        async with httpx.AsyncClient(timeout=self._http.timeout) as plain:
            response = await plain.get(await self.image_url(job_id))
            response.raise_for_status()
            return response.content

    async def events(
        self, job_id: str, last_event_id: str | None = None
    ) -> AsyncIterator[ServerEvent]:
        parser = EventParser(last_event_id)
        path = f"{base.JOBS}/{job_id}/events"
        for _attempt in range(base.MAX_RECONNECTS + 1):
            try:
                headers = base.stream_headers(parser.last_event_id)
                async with self._http.stream("GET", path, headers=headers) as response:
                    if response.status_code >= 400:
                        await response.aread()
                    base.checked(response)
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is not None:
                            yield event
                            if event.event == "completed":
                                return
            except httpx.TransportError:
                await asyncio.sleep(base.RECONNECT_DELAY_S)
        raise ConnectionError(f"the event stream of {job_id} kept dropping; try again later")

    async def _send(self, call: base.Call) -> httpx.Response:
        response = await self._http.request(
            call.method,
            call.path,
            json=call.json,
            params=call.params,
            headers=call.headers,
            timeout=base.timeout_of(call, self._http.timeout),
        )
        return base.checked(response)
