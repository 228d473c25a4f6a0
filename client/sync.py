"""`Client`: the HTTP API, blocking."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Self

import httpx

from imagegen.client import base
from imagegen.client.models import Job, JobPage, ServerEvent
from imagegen.client.sse import EventParser


class Client:
    """`base_url` and `api_key` default to IMAGEGEN_GATEWAY_URL and IMAGEGEN_API_KEY."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = base.DEFAULT_TIMEOUT_S,
    ) -> None:
        url, headers = base.connection(base_url, api_key)
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def generate(
        self,
        prompt: str,
        *,
        idempotency_key: str | None = None,
        wait_s: float | None = None,
        **fields: Any,
    ) -> Job:
        """Submit a job; with `wait_s`, the answer waits up to that long for its end.
        `fields` are the request's other fields (width=512, steps=25, ttl_s=60, ...)."""
        return Job.model_validate(
            self._send(base.generation(prompt, idempotency_key, wait_s, fields)).json()
        )

    def job(self, job_id: str) -> Job:
        return Job.model_validate(self._send(base.Call("GET", f"{base.JOBS}/{job_id}")).json())

    def jobs(self, limit: int = 20, cursor: str | None = None) -> JobPage:
        """One page of the caller's jobs, newest first."""
        return JobPage.model_validate(self._send(base.job_page(limit, cursor)).json())

    def all_jobs(self, page_size: int = 100) -> Iterator[Job]:
        """Every job of the caller, newest first, page after page."""
        cursor: str | None = None
        while True:
            page = self.jobs(page_size, cursor)
            yield from page.data
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> Job:
        """Ask for the job to stop; `Conflict` once it has ended."""
        call = base.Call("POST", f"{base.JOBS}/{job_id}/cancel")
        return Job.model_validate(self._send(call).json())

    def wait(self, job_id: str, timeout_s: float = 300.0, poll_s: float = 0.5) -> Job:
        """The job once it has ended; `TimeoutError` if it has not within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not (job := self.job(job_id)).ended:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout_s:g}s")
            time.sleep(poll_s)
        return job

    def image_url(self, job_id: str) -> str:
        """A fresh presigned URL of the job's image; `Conflict` unless it succeeded."""
        response = self._send(base.Call("GET", f"{base.JOBS}/{job_id}/image"))
        return response.headers["location"]

    def download(self, job_id: str) -> bytes:
        """The job's image."""
        with httpx.Client(timeout=self._http.timeout) as plain:  # a presigned URL: no key
            response = plain.get(self.image_url(job_id))
            response.raise_for_status()
            return response.content

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[ServerEvent]:
        """The job's events until `completed`, reconnecting with Last-Event-ID when the
        connection drops, so that nothing that still matters is missed."""
        parser = EventParser(last_event_id)
        for _attempt in range(base.MAX_RECONNECTS + 1):
            try:
                headers = base.stream_headers(parser.last_event_id)
                with self._http.stream(
                    "GET", f"{base.JOBS}/{job_id}/events", headers=headers
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                    base.checked(response)
                    for line in response.iter_lines():
                        event = parser.feed(line)
                        if event is not None:
                            yield event
                            if event.event == "completed":
                                return
            except httpx.TransportError:
                time.sleep(base.RECONNECT_DELAY_S)
        raise ConnectionError(f"the event stream of {job_id} kept dropping; try again later")

    def _send(self, call: base.Call) -> httpx.Response:
        response = self._http.request(
            call.method,
            call.path,
            json=call.json,
            params=call.params,
            headers=call.headers,
            timeout=base.timeout_of(call, self._http.timeout),
        )
        return base.checked(response)
