"""The project's exception tree, kept shallow on purpose.

Callers catch `ImagegenError` for "anything this project raises on purpose", or one of its
direct subclasses when they can act on it. `transient` tells a retry loop whether trying the same
thing again later can succeed.
"""


class ImagegenError(Exception):
    """Base class of every error this project raises on purpose."""

    transient: bool = False


class InvalidMessage(ImagegenError, ValueError):
    """Bytes or fields that do not meet the wire contract. Retrying never helps."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        #: (field, what is wrong with it) pairs; the field is "" when the whole input is bad.
        self.problems: list[tuple[str, str]] = problems or []


class ConfigError(ImagegenError):
    """A setting is missing, malformed or contradicts another one."""


class StackError(ImagegenError):
    """The embedded broker or object store could not be started, found or stopped."""


class BrokerUnavailable(ImagegenError):
    """Kafka did not answer in time."""

    transient = True


class PublishError(ImagegenError):
    """The broker refused a record for a reason that retrying will not fix."""


class ObjectStoreUnavailable(ImagegenError):
    """The object store did not answer, or answered with a server-side error."""

    transient = True


class ObjectStoreError(ImagegenError):
    """The object store refused a request for a reason that retrying will not fix."""


class WorkerCrashed(ImagegenError):
    """A thread of a render worker died of an unexpected error; the worker stopped."""
