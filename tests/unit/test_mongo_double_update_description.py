"""The MongoDB test server's copy of mongod's document diff (pipeline-update events) and of its
disambiguatedPaths rules, on documents the conformance suite cannot build through the server
(field names with dots inside nested documents need `$setField`, which mongomock lacks)."""

from __future__ import annotations

import copy
from typing import Any

from changeflow.testing.mongo_double.update_description import (
    describe,
    disambiguate,
    is_ambiguous,
    oplog_diff,
)

BIG = "*" * 128  # keeps every diff below smaller than what it describes


def event_of(pre: dict[str, Any], post: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    diff = oplog_diff(pre, post)
    return None if diff is None else describe(diff)


def test_dotted_names_nested_in_arrays_are_spelled_out() -> None:
    pre = {"_id": 1, "obj": {"sub.obj": {"arr.x": [[{"a": {"b.c": 1, "pad": BIG}}, "cut"]]}}, "pad": BIG}
    post = copy.deepcopy(pre)
    post["obj"]["sub.obj"]["arr.x"] = [[{"a": {"b.c": 2, "pad": BIG}}]]
    result = event_of(pre, post)
    assert result is not None
    description, paths = result
    assert description == {
        "updatedFields": {"obj.sub.obj.arr.x.0.0.a.b.c": 2},
        "removedFields": [],
        "truncatedArrays": [{"field": "obj.sub.obj.arr.x.0", "newSize": 1}],
    }
    assert paths == {
        "obj.sub.obj.arr.x.0": ["obj", "sub.obj", "arr.x", 0],
        "obj.sub.obj.arr.x.0.0.a.b.c": ["obj", "sub.obj", "arr.x", 0, 0, "a", "b.c"],
    }


def test_numeric_field_names_are_strings_array_indexes_integers() -> None:
    pre = {"_id": 1, "arr": [[{"0": [{"1.2": {"a.b": None, "pad": BIG}}]}]], "pad": BIG}
    post = copy.deepcopy(pre)
    post["arr"][0][0]["0"][0]["1.2"]["a.b"] = True
    result = event_of(pre, post)
    assert result is not None
    assert result[1] == {"arr.0.0.0.0.1.2.a.b": ["arr", 0, 0, "0", 0, "1.2", "a.b"]}


def test_plain_paths_and_a_leading_number_are_not_ambiguous() -> None:
    assert not is_ambiguous(["a", 0, "b", 3])
    assert not is_ambiguous(["0", "b"])  # a numeric name at the top level cannot be an array index
    assert is_ambiguous(["a", "0"])
    assert not is_ambiguous(["a", "01"])  # not a canonical index: no ambiguity either
    assert is_ambiguous(["a.b"])


def test_small_sub_documents_are_reported_whole() -> None:
    pre = {"_id": 1, "sub": {"x": 1, "y": 2}, "pad": BIG}
    post = {"_id": 1, "sub": {"x": 5, "y": 2}, "pad": BIG}
    result = event_of(pre, post)
    assert result is not None
    assert result[0]["updatedFields"] == {"sub": {"x": 5, "y": 2}}  # a sub-diff would not be smaller


def test_a_diff_not_smaller_than_the_document_is_a_replacement() -> None:
    assert oplog_diff({"_id": 1, "a": 1}, {"_id": 1, "a": 2}) is None
    assert oplog_diff({"_id": 1, "a": 1, "pad": BIG}, {"_id": 1, "a": 2, "pad": BIG}) is not None


def test_removed_and_moved_fields() -> None:
    pre = {"_id": 1, "a": 1, "b": 2, "c": 3, "pad": BIG}
    post = {"_id": 1, "c": 3, "pad": BIG, "a": 1}
    result = event_of(pre, post)
    assert result is not None
    # mongod walks both in order: `a` moved behind is re-inserted, `b` is gone.
    assert result[0] == {"updatedFields": {"a": 1}, "removedFields": ["b"], "truncatedArrays": []}


def test_operator_update_paths_resolve_indexes_in_the_document() -> None:
    before = {"_id": 1, "m": {"0": {"1": "x"}}, "arr": [[{"0": "y"}]], "gone": {"7": 1}}
    after = {"_id": 1, "m": {"0": {"1": "z"}}, "arr": [[{"0": "w"}]], "gone": {}}
    description = {
        "updatedFields": {"m.0.1": "z", "arr.0.0.0": "w"},
        "removedFields": ["gone.7"],
        "truncatedArrays": [],
    }
    assert disambiguate(description, before, after) == {
        "m.0.1": ["m", "0", "1"],
        "arr.0.0.0": ["arr", 0, 0, "0"],
        "gone.7": ["gone", "7"],
    }
