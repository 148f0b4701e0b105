"""Batched tasks, the listener's side: a publish's messages of a batched task go as lists of events.

`BatchingPublisher` wraps the configured publisher. Of the messages it is given (the task messages of
the listener's batch of events, in stream order), those of a task declared with `@app.on(...,
batch=N)` are grouped per task into messages of at most N events (`args=[[event, ...]]`, task id
`batch_id(keys)`); the other messages pass unchanged. Nothing waits for more events: a batch holds
what one publish holds (changeflow/worker/batches.py says why this and not a worker-side buffer).

Guarantees stay the `Publisher` protocol's, per event: when `publish` returns, every event not
returned as rejected is in the broker; a message the serializer refuses is sent again as the single
messages of its events, so only the event that cannot be serialized is rejected (and dead-lettered
by the listener under its own key), with its own `Message`. The listener's metrics and dead letters
see the messages it built (one per event), never the grouped ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from changeflow.listener.publish import Message, Publisher, Rejected
from changeflow.worker.batches import batch_id


def group(
    messages: Sequence[Message], sizes: Mapping[str, int]
) -> tuple[list[Message], dict[str, list[Message]]]:
    """(`messages` with the batched tasks' grouped, in order; batch message id -> the messages in it).

    A batched task's messages are grouped in chunks of its size, each chunk taking the place of its
    first message (a chunk of one stays the single message it is); other messages keep their place.
    Traces are not carried (a batch is many events).
    """
    slots: list[Message | list[Message]] = []  # a message, or a chunk of a batched task's messages
    open_chunks: dict[str, list[Message]] = {}
    for message in messages:
        size = sizes.get(message.task_name)
        if size is None:
            slots.append(message)
            continue
        chunk = open_chunks.get(message.task_name)
        if chunk is None or len(chunk) == size:
            chunk = open_chunks[message.task_name] = []
            slots.append(chunk)
        chunk.append(message)
    out: list[Message] = []
    members: dict[str, list[Message]] = {}
    for slot in slots:
        if isinstance(slot, list) and len(slot) == 1:
            out.append(slot[0])  # a batch of one: its single message (id = its key), as unbatched
        elif isinstance(slot, list):
            batch = batch_message(slot)
            members[batch.task_id] = slot
            out.append(batch)
        else:
            out.append(slot)
    return out, members


def batch_message(messages: Sequence[Message]) -> Message:
    """One message carrying the payloads of `messages` (all of one task) as a list."""
    payloads: Any = [m.payload for m in messages]
    return Message(messages[0].task_name, batch_id([m.task_id for m in messages]), payloads)


class BatchingPublisher:
    """A `Publisher` that sends batched tasks' messages as lists of events through `inner` (module doc)."""

    def __init__(self, inner: Publisher, sizes: Mapping[str, int]) -> None:
        self.inner = inner
        self.sizes = dict(sizes)

    def publish(self, messages: Sequence[Message]) -> list[Rejected]:
        if not any(m.task_name in self.sizes for m in messages):
            return self.inner.publish(messages)
        grouped, members = group(messages, self.sizes)
        rejected: list[Rejected] = []
        singles: list[Message] = []
        for refused in self.inner.publish(grouped):
            if refused.message.task_id in members:
                singles += members[refused.message.task_id]  # find the event that cannot be sent
            else:
                rejected.append(refused)
        if singles:
            rejected += self.inner.publish(singles)
        return rejected

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def check(self) -> None:
        check = getattr(self.inner, "check", None)
        if check is not None:
            check()


def batch_sizes(app: Any) -> dict[str, int]:
    """Task name -> batch size, for the app's batched tasks that a route names."""
    from changeflow.worker.batches import batch_size

    tasks = getattr(app, "tasks", {})
    sizes: dict[str, int] = {}
    for route in getattr(app, "routes", ()):
        for name in route.tasks:
            size = batch_size(tasks.get(name))
            if size is not None:
                sizes[name] = size
    return sizes
