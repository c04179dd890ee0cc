"""The header names the service reads and writes, defined once (lower case, as ASGI has them)."""

REQUEST_ID_HEADER = "x-request-id"  # the client's id when it is a safe token, else a new UUID4
MODEL_VERSION_HEADER = "x-model-version"  # pins a version on a request; names it on an answer
ERROR_CODE_HEADER = "x-error-code"  # on every error answer: its stable code (the body has it too)
