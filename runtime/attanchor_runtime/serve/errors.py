"""OpenAI-style errors: every refusal is `{"error": {"message", "type", "param", "code"}}` with its status.

Handlers raise APIError; the app turns it (and FastAPI's validation errors, and anything unexpected) into
that body, so a client never sees a traceback and the server keeps serving.
"""

from __future__ import annotations

from ..errors import one_line

# OpenAI's error types by status, so clients that branch on `type` behave as with OpenAI.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
         504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(one_line(message))
        self.status, self.code, self.param = status, code, param

    @property
    def message(self) -> str:
        return str(self)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
