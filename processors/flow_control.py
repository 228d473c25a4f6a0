"""A faust App whose flow control never drops events it has already fetched.

faust's `FlowControlEvent.resume()` always clears every stream buffer. faust resumes flow
twice after a rebalance: once to read the changelogs, and again once the tables are
recovered, after seeking the stream partitions to their committed offsets. Events fetched
between the seek and the second resume sit in the agent's buffer, and the consumer's read
offset has already moved past them, so clearing the buffer loses them: they are never
processed, never acked, and the partition's commit stalls at the gap. (Reproduced against
faust-streaming 0.15.3 by restarting a processor while requests wait on every partition.)

Clearing is right only when flow was suspended: the buffers then hold events of revoked
partitions, which the next owner reads again. A resume while flow is already running has
nothing stale to clear.
"""

from __future__ import annotations

import faust
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent


class KeepBuffersOnResume(FlowControlEvent):
    def resume(self) -> None:
        if self.is_active():
            return
        super().resume()


class App(faust.App):
    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return KeepBuffersOnResume(loop=self.loop)
