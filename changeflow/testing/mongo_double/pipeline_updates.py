"""Pipeline-style updates (`u: [stages]`, MongoDB 4.2+), evaluated with mongomock's aggregation.

mongod runs the stages on the matched document and stores the result as a replacement that keeps
the original `_id` (ObjectReplaceExecutor); an upsert runs them on the document built from the
query's equality fields. Expressions are mongomock's: what it lacks fails with 115
(`CommandNotSupported`) naming it, an operator MongoDB does not know either with mongod's 168.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any

from mongomock.aggregate import process_pipeline

from changeflow.testing.mongo_double.errors import MongoError

# Stages mongod allows in an update pipeline (StageConstraints::isAllowedWithinUpdatePipeline).
UPDATE_STAGES = frozenset({"$addFields", "$set", "$project", "$unset", "$replaceRoot", "$replaceWith"})
# Other stages of MongoDB 7.0: valid in an aggregation, refused in an update with InvalidOptions (72).
_AGGREGATION_STAGES = frozenset(
    {
        "$bucket", "$bucketAuto", "$changeStream", "$changeStreamSplitLargeEvent", "$collStats",
        "$count", "$densify", "$documents", "$facet", "$fill", "$geoNear", "$graphLookup", "$group",
        "$indexStats", "$limit", "$listLocalSessions", "$listSampledQueries", "$listSearchIndexes",
        "$listSessions", "$lookup", "$match", "$merge", "$out", "$planCacheStats", "$redact",
        "$sample", "$search", "$searchMeta", "$setWindowFields", "$shardedDataDistribution",
        "$skip", "$sort", "$sortByCount", "$unionWith", "$unwind", "$currentOp",
    }
)  # fmt: skip
# Expression operators of MongoDB 7.0 that mongomock reports as unknown: refused as unsupported
# here (115), where an operator unknown to MongoDB gets mongod's InvalidPipelineOperator (168).
_MONGODB_EXPRESSIONS = frozenset(
    {
        "$accumulator", "$acosh", "$asinh", "$atanh", "$binarySize", "$bitAnd", "$bitNot", "$bitOr",
        "$bitXor", "$bottom", "$bottomN", "$bsonSize", "$convert", "$dateAdd", "$dateDiff",
        "$dateFromParts", "$dateFromString", "$dateSubtract", "$dateToParts", "$dateTrunc",
        "$degreesToRadians", "$firstN", "$function", "$getField", "$isoDayOfWeek", "$isoWeek",
        "$isoWeekYear", "$lastN", "$maxN", "$median", "$minN", "$percentile", "$radiansToDegrees",
        "$rand", "$regexFind", "$regexFindAll", "$replaceAll", "$replaceOne", "$round",
        "$sampleRate", "$setField", "$sortArray", "$tsIncrement", "$tsSecond", "$toBool",
        "$toDate", "$toDecimal", "$toDouble", "$toInt", "$toLong", "$toObjectId", "$top", "$topN",
        "$unsetField", "$mergeObjects", "$reduce", "$zip", "$trim", "$ltrim", "$rtrim",
        "$let", "$switch", "$first", "$last", "$objectToArray", "$arrayToObject", "$indexOfArray",
        "$range", "$reverseArray", "$in", "$split", "$strLenBytes", "$strLenCP", "$substrBytes",
        "$substrCP", "$indexOfBytes", "$indexOfCP", "$toHashedIndexKey", "$meta",
    }
)  # fmt: skip


def is_pipeline(update: Any) -> bool:
    return isinstance(update, list)


def validate(pipeline: list[Any]) -> list[dict[str, Any]]:
    """The stages as mongomock runs them; refuses what mongod refuses in an update pipeline."""
    for stage in pipeline:
        if not isinstance(stage, dict) or len(stage) != 1:
            raise MongoError(40323, "A pipeline stage specification object must contain exactly one field.")
        name = next(iter(stage))
        if name in UPDATE_STAGES:
            continue
        if name in _AGGREGATION_STAGES:
            raise MongoError(72, f"{name} is not allowed to be used within an update")
        raise MongoError(40324, f"Unrecognized pipeline stage name: '{name}'")
    return [_translate(name, spec) for stage in pipeline for name, spec in stage.items()]


def _translate(name: str, spec: Any) -> dict[str, Any]:
    """The stages mongomock lacks as equivalent ones it has (as changestreams.translate_stages does;
    importing it here would be circular: storage -> this module -> changestreams -> storage)."""
    if name == "$replaceWith":
        return {"$replaceRoot": {"newRoot": spec}}
    if name == "$unset":
        fields = [spec] if isinstance(spec, str) else spec
        if not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields):
            raise MongoError(31002, "$unset specification must be a string or an array of strings")
        return {"$project": dict.fromkeys(fields, 0)}
    return {name: spec}


def _bind_system_variables(value: Any, now: datetime.datetime) -> Any:
    """$$NOW as a literal (mongomock would drop the field silently); $$CLUSTER_TIME is refused."""
    if isinstance(value, str):
        if value == "$$NOW":
            return {"$literal": now}
        if value.startswith("$$CLUSTER_TIME"):
            raise MongoError(115, "$$CLUSTER_TIME is not supported by the MongoDB test server")
        return value
    if isinstance(value, dict):
        if "$literal" in value:
            return value
        return {k: _bind_system_variables(v, now) for k, v in value.items()}
    if isinstance(value, list):
        return [_bind_system_variables(v, now) for v in value]
    return value


def apply(stages: list[dict[str, Any]], doc: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's result for one document, with the original `_id` (first) if the result has none;
    changing `_id` fails with ImmutableField (66), as on mongod."""
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    bound = _bind_system_variables(stages, now)
    try:
        # mongomock changes the documents it is given in place: run it on a copy.
        out = list(process_pipeline([copy.deepcopy(doc)], None, bound, None))
    except MongoError:
        raise
    except NotImplementedError as exc:
        raise MongoError(115, f"not supported by the MongoDB test server: {exc}") from exc
    except Exception as exc:
        raise _expression_error(exc) from exc
    if len(out) != 1 or not isinstance(out[0], dict):
        raise MongoError(2, "the update pipeline did not produce exactly one document")
    result = out[0]
    if "_id" not in result:
        if "_id" in doc:
            result = {"_id": doc["_id"], **result}
    elif "_id" in doc and not _same(result["_id"], doc["_id"]):
        raise MongoError(
            66,
            "After applying the update, the (immutable) field '_id' was found to have been altered "
            f"to _id: {result['_id']!r}",
        )
    return result


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _expression_error(exc: Exception) -> MongoError:
    text = str(exc)
    marker = "Unrecognized expression '"
    if marker in text:
        name = text.split(marker, 1)[1].split("'", 1)[0]
        if name in _MONGODB_EXPRESSIONS:
            return MongoError(115, f"expression {name} is not supported by the MongoDB test server")
        return MongoError(168, f"Unrecognized expression '{name}'")
    code = getattr(exc, "code", None)
    return MongoError(code if isinstance(code, int) and code else 2, f"{type(exc).__name__}: {text}")


def upsert_seed(query: dict[str, Any]) -> dict[str, Any]:
    """The document an upsert starts from: the query's equality fields (dotted paths nested), as
    mongod's populateDocumentWithQueryFields builds it."""
    seed: dict[str, Any] = {}
    for path, value in _equalities(query):
        target = seed
        parts = path.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                break
        else:
            target.setdefault(parts[-1], copy.deepcopy(value))
    return seed


def _equalities(query: dict[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in query.items():
        if key == "$and" and isinstance(value, list):
            for sub in value:
                if isinstance(sub, dict):
                    out.extend(_equalities(sub))
        elif key.startswith("$"):
            continue
        elif isinstance(value, dict) and value and all(k.startswith("$") for k in value):
            if "$eq" in value:
                out.append((key, value["$eq"]))
        else:
            out.append((key, value))
    return out
