"""The publishing client: validated requests onto `imagegen.requests`."""

from producers.publisher import AsyncRequestPublisher, RequestPublisher

__all__ = ["AsyncRequestPublisher", "RequestPublisher"]
