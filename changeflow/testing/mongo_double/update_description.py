"""updateDescription of pipeline-style updates and `disambiguatedPaths`, as mongod 7.0 computes them.

A pipeline-style update has no update operators to describe it: mongod diffs the pre-image against
the post-image (doc_diff::computeOplogDiff), logs the diff as a `$v: 2` oplog entry, and the change
stream parses that diff back into `updatedFields`, `removedFields` and `truncatedArrays`
(change_stream_document_diff_parser). When the diff would not be smaller than the new document,
mongod logs a full replacement instead, and the change event is a `replace`. This module follows
both algorithms, including their size bookkeeping, so the same write gives the same event here.

`disambiguatedPaths` (only in streams opened with `showExpandedEvents`) spells out every reported
path that holds a field name containing a dot, or a numeric-looking field name below the top level:
the list of its components, array indexes as integers, field names as strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import bson

# update_oplog_entry::kSizeOfDeltaOplogEntryMetadata: the `$v` and `diff` fields around the diff.
DELTA_METADATA_SIZE = 15
_EMPTY_DOC_DIFF_SIZE = 5
_EMPTY_ARRAY_DIFF_SIZE = 9  # empty object, the `a: true` header
_SECTION_WRAPPING_SIZE = 8  # type byte, one-letter name, its terminator, an empty object
_RESIZE_SIZE = 7  # `l: <int32>`


def _value_size(value: Any) -> int:
    """BSONElement::valuesize(): the bytes of the value alone (no type byte, no field name)."""
    return len(bson.encode({"": value})) - 7


def binary_equal(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b and bson.encode({"": a}) == bson.encode({"": b})


def _container(value: Any) -> str | None:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return None


@dataclass
class DocDiff:
    """diff_tree::DocumentSubDiffNode: a changed sub-document."""

    size: int
    deletes: list[str] = field(default_factory=list)
    updates: list[tuple[str, Any]] = field(default_factory=list)
    inserts: list[tuple[str, Any]] = field(default_factory=list)
    subdiffs: list[tuple[str, DocDiff | ArrayDiff]] = field(default_factory=list)

    def _entry(self, name: str, section: list[Any], payload: int) -> None:
        self.size += len(name.encode()) + 2 + payload
        if not section:
            self.size += _SECTION_WRAPPING_SIZE

    def add_update(self, name: str, value: Any) -> None:
        self._entry(name, self.updates, _value_size(value))
        self.updates.append((name, value))

    def add_insert(self, name: str, value: Any) -> None:
        self._entry(name, self.inserts, _value_size(value))
        self.inserts.append((name, value))

    def add_delete(self, name: str) -> None:
        self._entry(name, self.deletes, 1)
        self.deletes.append(name)

    def add_child(self, name: str, sub: DocDiff | ArrayDiff) -> None:
        self.size += len(name.encode()) + 2 + sub.size + 1  # + 1: the `s` prefix
        self.subdiffs.append((name, sub))

    def serialize(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.deletes:
            out["d"] = dict.fromkeys(self.deletes, False)
        if self.updates:
            out["u"] = dict(self.updates)
        if self.inserts:
            out["i"] = dict(self.inserts)
        for name, sub in self.subdiffs:
            out["s" + name] = sub.serialize()
        return out


@dataclass
class ArrayDiff:
    """diff_tree::ArrayNode: a changed array (updated or appended indexes, a shorter length)."""

    size: int = _EMPTY_ARRAY_DIFF_SIZE
    children: dict[int, Any] = field(default_factory=dict)  # index -> new value, or a sub-diff
    resize: int | None = None

    def _add(self, index: int, value: Any, payload: int) -> None:
        self.size += 1 + len(str(index)) + 2 + payload
        self.children[index] = value

    def add_update(self, index: int, value: Any) -> None:
        self._add(index, _Value(value), _value_size(value))

    def add_child(self, index: int, sub: DocDiff | ArrayDiff) -> None:
        self._add(index, sub, sub.size)

    def set_resize(self, size: int) -> None:
        self.resize = size
        self.size += _RESIZE_SIZE

    def serialize(self) -> dict[str, Any]:
        out: dict[str, Any] = {"a": True}
        if self.resize is not None:
            out["l"] = self.resize
        for index in sorted(self.children):
            child = self.children[index]
            if isinstance(child, _Value):
                out[f"u{index}"] = child.value
            else:
                out[f"s{index}"] = child.serialize()
        return out


@dataclass
class _Value:
    value: Any


def _sub_diff(pre: Any, post: Any, name: str | int, parent: DocDiff | ArrayDiff) -> None:
    """calculateSubDiffHelper: a sub-diff, or the whole new value when the sub-diff is not smaller."""
    sub: DocDiff | ArrayDiff | None
    sub = _doc_diff(pre, post) if isinstance(pre, dict) else _array_diff(pre, post)
    if sub is None:
        parent.add_update(name, post)  # type: ignore[arg-type]  # str for documents, int for arrays
    else:
        parent.add_child(name, sub)  # type: ignore[arg-type]


def _doc_diff(pre: dict[str, Any], post: dict[str, Any], padding: int = 0) -> DocDiff | None:
    """computeDocDiff: walk both documents in field order; None when the diff outgrows `post`."""
    node = DocDiff(padding + _EMPTY_DOC_DIFF_SIZE)
    post_size = _value_size(post)
    pre_items, post_items = list(pre.items()), list(post.items())
    i = j = 0
    deletes: set[str] = set()
    while i < len(pre_items) and j < len(post_items):
        if post_size < node.size:
            return None
        (pre_name, pre_value), (post_name, post_value) = pre_items[i], post_items[j]
        if pre_name == post_name:
            if not binary_equal(pre_value, post_value):
                kind = _container(pre_value)
                if kind is not None and kind == _container(post_value):
                    _sub_diff(pre_value, post_value, pre_name, node)
                else:
                    node.add_update(pre_name, post_value)
            i, j = i + 1, j + 1
        else:
            # Removed, or moved further down: an insert below then takes it off the deletes.
            deletes.add(pre_name)
            i += 1
    for name, _ in pre_items[i:]:
        node.add_delete(name)
    for name, value in post_items[j:]:
        node.add_insert(name, value)
        deletes.discard(name)
    for name in sorted(deletes):  # a std::set: byte order, which is code point order for UTF-8
        node.add_delete(name)
    return node if post_size > node.size else None


def _array_diff(pre: list[Any], post: list[Any]) -> ArrayDiff | None:
    """computeArrayDiff: index by index; a shorter array is a resize (truncatedArrays)."""
    node = ArrayDiff()
    post_size = _value_size(post)
    common = min(len(pre), len(post))
    for index in range(common):
        if post_size < node.size:
            return None
        pre_value, post_value = pre[index], post[index]
        if not binary_equal(pre_value, post_value):
            kind = _container(pre_value)
            if kind is not None and kind == _container(post_value):
                _sub_diff(pre_value, post_value, index, node)
            else:
                node.add_update(index, post_value)
    for index in range(common, len(post)):
        node.add_update(index, post[index])
    if len(pre) > len(post):
        node.set_resize(len(post))
    return node if post_size > node.size else None


def oplog_diff(pre: dict[str, Any], post: dict[str, Any]) -> DocDiff | None:
    """computeOplogDiff: the diff mongod logs for a pipeline update, or None when it logs the whole
    document instead (the diff would not be smaller than the new document)."""
    node = _doc_diff(pre, post, DELTA_METADATA_SIZE)
    if node is None or len(bson.encode(node.serialize())) >= _value_size(post):
        return None
    return node


# ---------------------------------------------------------------------------------------------
# The diff as the change stream reports it


Part = str | int  # a field name, or an array index


class _Describer:
    """change_stream_document_diff_parser: the diff as updatedFields / removedFields /
    truncatedArrays, plus disambiguatedPaths."""

    def __init__(self) -> None:
        self.updated: dict[str, Any] = {}
        self.removed: list[str] = []
        self.truncated: list[dict[str, Any]] = []
        self.disambiguated: dict[str, list[Part]] = {}

    def _note(self, path: list[Part]) -> str:
        dotted = ".".join(str(p) for p in path)
        if is_ambiguous(path):
            self.disambiguated[dotted] = list(path)
        return dotted

    def document(self, node: DocDiff, path: list[Part]) -> None:
        for name, value in [*node.updates, *node.inserts]:
            self.updated[self._note([*path, name])] = value
        for name in node.deletes:
            self.removed.append(self._note([*path, name]))
        for name, sub in node.subdiffs:
            self.visit(sub, [*path, name])

    def array(self, node: ArrayDiff, path: list[Part]) -> None:
        if node.resize is not None:
            self.truncated.append({"field": self._note(path), "newSize": node.resize})
        for index in sorted(node.children):
            child = node.children[index]
            if isinstance(child, _Value):
                self.updated[self._note([*path, index])] = child.value
            else:
                self.visit(child, [*path, index])

    def visit(self, node: DocDiff | ArrayDiff, path: list[Part]) -> None:
        if isinstance(node, DocDiff):
            self.document(node, path)
        else:
            self.array(node, path)


def describe(diff: DocDiff) -> tuple[dict[str, Any], dict[str, list[Part]]]:
    """(updateDescription, disambiguatedPaths) of a pipeline update's diff."""
    out = _Describer()
    out.document(diff, [])
    return (
        {"updatedFields": out.updated, "removedFields": out.removed, "truncatedArrays": out.truncated},
        out.disambiguated,
    )


def _numeric_strict(part: str) -> bool:
    """FieldRef::isNumericPathComponentStrict: digits only, no leading zero."""
    return part.isascii() and part.isdigit() and not (len(part) > 1 and part[0] == "0")


def is_ambiguous(path: list[Part]) -> bool:
    """A path is ambiguous once it holds a field name with a dot, or a numeric field name that is not
    its first component (array indexes alone are not ambiguous)."""
    for position, part in enumerate(path):
        if isinstance(part, int):
            continue
        if (position > 0 and _numeric_strict(part)) or "." in part:
            return True
    return False


def resolve_path(doc: Any, dotted: str) -> list[Part]:
    """The components of an operator update's path (operators split paths on dots): indexes into
    arrays as integers, as the document holds them."""
    parts: list[Part] = []
    for part in dotted.split("."):
        if isinstance(doc, list) and part.isdigit():
            parts.append(int(part))
            index = int(part)
            doc = doc[index] if index < len(doc) else None
        else:
            parts.append(part)
            doc = doc.get(part) if isinstance(doc, dict) else None
    return parts


def disambiguate(
    description: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
) -> dict[str, list[Part]]:
    """disambiguatedPaths of an operator update's description: removed paths resolved in the
    pre-image, the others in the post-image."""
    out: dict[str, list[Part]] = {}
    paths = [(p, after) for p in description.get("updatedFields", {})]
    paths += [(p, before) for p in description.get("removedFields", [])]
    paths += [(t["field"], after) for t in description.get("truncatedArrays", [])]
    for dotted, doc in paths:
        parts = resolve_path(doc, dotted)
        if is_ambiguous(parts):
            out[dotted] = parts
    return out
