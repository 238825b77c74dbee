"""The error every layer raises for a problem the user can act on (imports nothing: models, the
library and the engine all raise it, and the server turns it into a protocol `error` message)."""

from __future__ import annotations


class UserError(Exception):
    """An error a user can act on. `kind` is a short machine tag, the message says what to do.

    kinds in use: bad_input, model_not_found, bad_model, unsupported, context_full,
    out_of_memory, device.
    """

    def __init__(self, kind: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.detail = detail
