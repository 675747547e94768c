"""Turn the errors a user can act on into one clear line, wherever Ray wrapped them."""

from __future__ import annotations


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


def explain(exc: BaseException) -> str | None:
    """The actionable message inside ``exc`` (a missing weights file, a held lease, bad input)."""
    from pipeline.io.lease import LeaseHeld
    from pipeline.io.shards import InputError
    from pipeline.models.weights import WeightsChecksumMismatch, WeightsNotFound

    for cause in _causes(exc):
        if isinstance(cause, (WeightsNotFound, WeightsChecksumMismatch, LeaseHeld, InputError)):
            return str(cause)
        text = str(cause)
        if "WeightsNotFound" in text or "WeightsChecksumMismatch" in text:
            # Ray re-raised an actor's error as text: keep the last line, which is the message.
            return text.strip().splitlines()[-1]
    return None
