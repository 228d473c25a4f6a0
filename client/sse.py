"""Server-sent events, read line by line (the WHATWG event-stream format, as much of it as
the gateway uses: `event`, `id`, `data`, comments, blank lines)."""

from __future__ import annotations

import json

from imagegen.client.models import ServerEvent


class EventParser:
    """Fed one line at a time (without its line ending); returns an event when a blank line
    completes one. The last `id` seen survives events without one, as the format says."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self.last_event_id = last_event_id
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> ServerEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the gateway's keep-alive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\x00" not in value:
            self.last_event_id = value
        return None

    def _dispatch(self) -> ServerEvent | None:
        event, data = self._event, "\n".join(self._data)
        self._event, self._data = "message", []
        if not data:
            return None
        try:
            decoded = json.loads(data)
        except ValueError:
            decoded = {"text": data}
        if not isinstance(decoded, dict):
            decoded = {"value": decoded}
        return ServerEvent(event=event, id=self.last_event_id, data=decoded)
