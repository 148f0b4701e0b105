"""find / count read a large result in time linear in its size (mongomock's Cursor alone is quadratic).

Found through the Node.js driver: estimatedDocumentCount() on a 100k-document collection did not
answer within minutes. Goes through the store directly: inserting that many documents over the wire
would make this test slow for an unrelated reason.
"""

from __future__ import annotations

import time

import mongomock

from changeflow.testing.mongo_double import storage

N = 30_000


def test_iter_find_is_linear_in_the_result_size() -> None:
    c = mongomock.MongoClient()["d"]["c"]
    c.insert_many([{"_id": i, "k": i % 3} for i in range(N)])
    started = time.monotonic()
    docs = list(storage.iter_find(c, {}))
    elapsed = time.monotonic() - started
    assert [d["_id"] for d in docs] == list(range(N))
    # Linear: a quarter of a second here; iterating mongomock's Cursor took about 11 s.
    assert elapsed < 3, f"reading {N} documents took {elapsed:.1f}s"
    window = list(storage.iter_find(c, {"filter": {"k": 1}, "sort": {"_id": -1}, "skip": 2, "limit": 3}))
    assert [d["_id"] for d in window] == [i for i in reversed(range(N)) if i % 3 == 1][2:5]
