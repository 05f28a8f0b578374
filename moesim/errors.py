"""The one error type a user ever sees: bad input, reported on one line."""

from __future__ import annotations


class InputError(ValueError):
    """A scenario, profile or table the user gave cannot be used as it is.

    ``field`` names the offending input (a dotted path such as ``deployment.ep``) and ``fix``
    says what would be valid; the CLI prints ``error: <field>: <message> (<fix>)`` and exits 2.
    """

    def __init__(self, field: str, message: str, fix: str = "") -> None:
        self.field = field
        self.message = message
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.field}: {self.message}" if self.field else self.message
        if self.fix:
            text += f" ({self.fix})"
        return " ".join(text.split())


def from_pydantic(exc, prefix: str = "") -> InputError:
    """Turn the first error of a pydantic ``ValidationError`` into an :class:`InputError`."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-"))
    field = ".".join(p for p in (prefix, loc) if p)
    kind = err.get("type", "")
    msg = err.get("msg", "invalid value")
    if kind == "extra_forbidden":
        return InputError(field, "unknown field", "remove it or check its spelling")
    if kind == "missing":
        return InputError(field, "required field is missing", "add it")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    if kind not in ("model_type",) and not isinstance(got, (dict, list)):
        msg += f"; got {got!r}"
    return InputError(field, msg)
