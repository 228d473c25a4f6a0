"""The publishing client: validated requests onto `imagegen.requests`."""

from imagegen.producers.publisher import AsyncRequestPublisher, RequestPublisher

__all__ = ["AsyncRequestPublisher", "RequestPublisher"]
