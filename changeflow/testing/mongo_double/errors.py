"""MongoDB errors as the server reports them: code, codeName, errmsg and error labels."""

from __future__ import annotations

from typing import Any

# Names for the codes this server produces (mongod's error_codes.yml spelling).
CODE_NAMES: dict[int, str] = {
    1: "InternalError",
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    9: "FailedToParse",
    11: "UserNotFound",
    13: "Unauthorized",
    14: "TypeMismatch",
    18: "AuthenticationFailed",
    20: "IllegalOperation",
    26: "NamespaceNotFound",
    27: "IndexNotFound",
    43: "CursorNotFound",
    47: "NoMatchingDocument",
    48: "NamespaceExists",
    50: "MaxTimeMSExpired",
    59: "CommandNotFound",
    63: "StaleShardVersion",
    72: "InvalidOptions",
    73: "InvalidNamespace",
    85: "IndexOptionsConflict",
    86: "IndexKeySpecsConflict",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    112: "WriteConflict",
    115: "CommandNotSupported",
    133: "FailedToSatisfyReadPreference",
    150: "StaleEpoch",
    168: "InvalidPipelineOperator",
    189: "PrimarySteppedDown",
    225: "TransactionTooOld",
    234: "RetryChangeStream",
    244: "TransactionAborted",
    251: "NoSuchTransaction",
    256: "TransactionCommitted",
    260: "InvalidResumeToken",
    262: "ExceededTimeLimit",
    263: "OperationNotSupportedInTransaction",
    280: "ChangeStreamFatalError",
    286: "ChangeStreamHistoryLost",
    9001: "SocketException",
    10334: "BSONObjectTooLarge",
    10107: "NotWritablePrimary",
    11000: "DuplicateKey",
    11600: "InterruptedAtShutdown",
    11602: "InterruptedDueToReplStateChange",
    13388: "StaleConfig",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
    40324: "Location40324",
    40415: "Location40415",
}

# Codes in mongod's RetriableError / NetworkError / NeedRetargettingError categories plus the two
# extra codes mongod treats as resumable for change streams (234, 133).
RESUMABLE_CHANGE_STREAM_CODES = frozenset(
    {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 63, 150, 13388, 234, 133}
)
# Codes for which mongod labels a retryable write RetryableWriteError.
RETRYABLE_WRITE_CODES = frozenset({6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436})
NON_RESUMABLE_CHANGE_STREAM_CODES = frozenset({280, 286})


# mongod's BSON size limits (src/mongo/bson/util/builder.h): a user document, and what mongod can
# serialize at all (the user limit plus headroom for its own fields around a document).
BSON_MAX_USER_SIZE = 16 * 1024 * 1024
BSON_MAX_INTERNAL_SIZE = BSON_MAX_USER_SIZE + 16 * 1024
BSON_OBJECT_TOO_LARGE = 10334


class MongoError(Exception):
    """A command failure, answered as {ok: 0, errmsg, code, codeName, errorLabels?}."""

    def __init__(
        self,
        code: int,
        errmsg: str,
        labels: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(errmsg)
        self.code = code
        self.errmsg = errmsg
        self.labels: list[str] = list(labels or [])
        self.extra: dict[str, Any] = dict(extra or {})

    @property
    def code_name(self) -> str:
        return CODE_NAMES.get(self.code, f"Location{self.code}")

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "ok": 0.0,
            "errmsg": self.errmsg,
            "code": self.code,
            "codeName": self.code_name,
        }
        doc.update(self.extra)
        if self.labels:
            doc["errorLabels"] = list(self.labels)
        return doc


class DuplicateKey(MongoError):
    def __init__(
        self, ns: str, detail: str = "", key_pattern: dict | None = None, key_value: dict | None = None
    ):
        extra: dict[str, Any] = {}
        if key_pattern is not None:
            extra["keyPattern"] = key_pattern
        if key_value is not None:
            extra["keyValue"] = key_value
        super().__init__(11000, f"E11000 duplicate key error collection: {ns}{detail}", extra=extra)


class CloseConnection(Exception):
    """Raised by a fail point: drop the client's connection without answering."""


def bson_object_too_large(size: int, first_element: str) -> MongoError:
    """mongod's error for an object it cannot serialize (over BSON_MAX_INTERNAL_SIZE), word for word."""
    return MongoError(
        BSON_OBJECT_TOO_LARGE,
        f"BSONObj size: {size} (0x{size:X}) is invalid. Size must be between 0 and "
        f"{BSON_MAX_INTERNAL_SIZE}(16MB) First element: {first_element}",
    )


def command_not_found(name: str) -> MongoError:
    return MongoError(59, f"no such command: '{name}'")
