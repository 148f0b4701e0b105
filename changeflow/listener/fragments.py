"""Change events over 16 MB: MongoDB's `$changeStreamSplitLargeEvent` fragments, put back together.

A change event larger than MongoDB can return (a large document's `fullDocument` with its
`updateDescription`, or pre-images) fails the change stream with BSONObjectTooLarge (10334), and a
listener would stop at that event for ever. MongoDB 7.0 (and 6.0.9) splits such events when the
pipeline ends with `{$changeStreamSplitLargeEvent: {}}`: the event comes as fragments, in order, each
`{_id: <its own resume token>, splitEvent: {fragment: n, of: total}, <some top-level fields>}`; no
field is split or repeated. `Reassembler` takes the stream's documents one by one and hands back
whole events; `merge_fragments` is the merge itself.

Positions and keys (docs/listener.md, "Change events over 16 MB"):
- The stream position after a split event is its LAST fragment's token (MongoDB resumes after the
  whole event from it). While an event is incomplete, the position stays where it was before its
  first fragment: fragments straddle getMore batches (a batch holds at most 16 MB), and a checkpoint
  inside an event would, after a restart, deliver only the rest of it.
- The reassembled event's `_id`, from which the task ids (dedup keys) derive, is the FIRST
  fragment's token: reading the event again (after a restart from an earlier checkpoint) gives the
  same first fragment token even when the number of fragments differs, which it can, because
  `fullDocument: updateLookup` reads the document as it is at reading time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pymongo.database import Database

SPLIT_STAGE: dict[str, Any] = {"$changeStreamSplitLargeEvent": {}}
# The fields every fragment has of its own; all others belong to the event.
_FRAGMENT_FIELDS = ("_id", "splitEvent")
# maxWireVersion of MongoDB 7.0, the first release with the stage on every patch level; 6.0 (17)
# has it from 6.0.9 on; 6.1 - 6.3 (18 - 20) do not.
WIRE_VERSION_7_0 = 21
WIRE_VERSION_6_0 = 17


class FragmentError(ValueError):
    """Fragments that do not make one event: missing, repeated, out of order, or overlapping fields."""


def fragment_numbers(document: Mapping[str, Any]) -> tuple[int, int] | None:
    """(fragment, of) of a fragment, None for a whole event; FragmentError when malformed."""
    split = document.get("splitEvent")
    if split is None:
        return None
    fragment = split.get("fragment") if isinstance(split, Mapping) else None
    total = split.get("of") if isinstance(split, Mapping) else None
    if type(fragment) is not int or type(total) is not int or not 1 <= fragment <= total:
        raise FragmentError(f"malformed splitEvent {split!r} in event {document.get('_id')!r}")
    return fragment, total


def merge_fragments(fragments: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The event the fragments were split from: its fields in fragment order, `_id` the first
    fragment's token (see the module docstring), no `splitEvent`.

    FragmentError unless the fragments are exactly 1..of of one event, in order, with no field twice.
    """
    if not fragments:
        raise FragmentError("no fragments to merge")
    total = len(fragments)
    merged: dict[str, Any] = {"_id": fragments[0].get("_id")}
    for expected, fragment in enumerate(fragments, start=1):
        numbers = fragment_numbers(fragment)
        if numbers != (expected, total):
            raise FragmentError(
                f"fragment {expected} of {total} expected, got splitEvent {fragment.get('splitEvent')!r} "
                f"(event {merged['_id']!r})"
            )
        for name, value in fragment.items():
            if name in _FRAGMENT_FIELDS:
                continue
            if name in merged:
                raise FragmentError(f"field {name!r} in two fragments of event {merged['_id']!r}")
            merged[name] = value
    return merged


class Reassembler:
    """Whole events from a change stream's documents, some of which may be fragments.

    `feed(document, position_before)` returns the event to route, or None while a split event is
    incomplete; `position(current)` is where the stream may be resumed without losing a fragment.
    Fragments held here belong to the stream they came from: `reset()` when the stream is reopened
    (MongoDB then sends them again from the first one).
    """

    def __init__(self) -> None:
        self._parts: list[Mapping[str, Any]] = []
        self._total = 0
        self._before: Any = None  # the position before the incomplete event's first fragment

    @property
    def pending(self) -> bool:
        """A split event has started and not ended."""
        return bool(self._parts)

    def reset(self) -> None:
        self._parts, self._total, self._before = [], 0, None

    def feed(self, document: Mapping[str, Any], position_before: Any) -> Mapping[str, Any] | None:
        """The whole event `document` completes, or None. `position_before` is the stream's position
        before `document` (kept when it starts a split event)."""
        numbers = fragment_numbers(document)
        if numbers is None:
            if self._parts:
                raise FragmentError(
                    f"event {document.get('_id')!r} arrived after fragment {len(self._parts)} of "
                    f"{self._total} of event {self._parts[0].get('_id')!r}"
                )
            return document
        fragment, total = numbers
        if fragment == 1:
            if self._parts:
                raise FragmentError(
                    f"a new split event {document.get('_id')!r} started after fragment {len(self._parts)} "
                    f"of {self._total} of event {self._parts[0].get('_id')!r}"
                )
            self._total, self._before = total, position_before
        elif fragment != len(self._parts) + 1 or total != self._total:
            raise FragmentError(
                f"fragment {fragment} of {total} ({document.get('_id')!r}) does not follow fragment "
                f"{len(self._parts)} of {self._total or '?'}"
            )
        self._parts.append(document)
        if fragment < total:
            return None
        event = merge_fragments(self._parts)
        self.reset()
        return event

    def position(self, current: Any) -> Any:
        """The stream's resume position `current`, unless a split event is incomplete: then the
        position before its first fragment."""
        return self._before if self._parts else current


def splits_large_events(hello: Mapping[str, Any], version: Sequence[int] | None = None) -> bool | None:
    """Whether the server has $changeStreamSplitLargeEvent, from its hello reply (and, for MongoDB
    6.0, whose patch level the wire version does not tell, buildInfo's versionArray: None asks for it)."""
    wire = hello.get("maxWireVersion")
    wire = wire if type(wire) is int else 0
    if wire >= WIRE_VERSION_7_0:
        return True
    if wire != WIRE_VERSION_6_0:
        return False
    if version is None:
        return None
    return tuple(version[:3]) >= (6, 0, 9)


def server_splits_large_events(db: Database) -> bool:
    """Ask the server behind `db` whether it can split large change events (two commands at most)."""
    answer = splits_large_events(db.command("hello"))
    if answer is None:
        answer = splits_large_events(
            {"maxWireVersion": WIRE_VERSION_6_0}, db.command("buildInfo").get("versionArray") or ()
        )
    return bool(answer)
