"""The header names the service reads and writes, defined once (lower case, as ASGI has them)."""

import re
import uuid

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

REQUEST_ID_HEADER = "x-request-id"  # the client's id when it is a safe token, else a new UUID4
MODEL_VERSION_HEADER = "x-model-version"  # pins a version on a request; names it on an answer
ERROR_CODE_HEADER = "x-error-code"  # on every error answer: its stable code (the body has it too)


def request_id_for(given: str | None) -> str:
    """The client's request id when it is a safe token, else a new UUID4."""
    return given if given and _SAFE_REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
