"""Regular expressions as Envoy runs them: RE2.

Envoy matches ``regex`` fields (a URI, a header, a query parameter) with Google's RE2,
which runs in time linear in the input and has no lookaround (``(?=``, ``(?!``,
``(?<=``) and no backreferences (``\\1``). Compiling each expression with the same
library here (the ``google-re2`` bindings) means an expression Envoy would refuse is
refused at apply time, with RE2's own reason, and never reaches a proxy::

    check_regex(r"^/api/v[0-9]+/users$")    # fine
    check_regex(r"(?=admin)")               # ValueError: must be an RE2 regular expression: ...

Envoy refuses an expression whose compiled program is larger than its runtime key
``re2.max_program_size.error_level`` (100 unless set). Everyday expressions pass that
(``[a-zA-Z0-9._-]{0,200}`` is a program of about 1,000), so the proxies' bootstrap sets
that key to :data:`MAX_PROGRAM_SIZE` and this module refuses anything larger. Envoy
matches the whole value (a full match), as Istio documents.
"""

from __future__ import annotations

import re2

__all__ = [
    "MAX_PATTERN_LENGTH",
    "MAX_PROGRAM_SIZE",
    "check_regex",
]

MAX_PATTERN_LENGTH = 1024
MAX_PROGRAM_SIZE = 10_000


def check_regex(pattern: str) -> None:
    """Raise ``ValueError`` unless RE2 compiles ``pattern`` to a program Envoy accepts."""
    if not pattern:
        raise ValueError("must not be empty")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"must be at most {MAX_PATTERN_LENGTH} characters")
    options = re2.Options()
    options.log_errors = False  # RE2 would print each refused expression on stderr
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as err:
        raise ValueError(f"must be an RE2 regular expression: {_reason(err)}") from None
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise ValueError(
            f"is too complex: RE2 program size {compiled.programsize}, at most "
            f"{MAX_PROGRAM_SIZE}; simplify it (large counted repetitions such as "
            "{1000} grow it most)"
        )


def _reason(err: Exception) -> str:
    reason = err.args[0] if err.args else str(err)
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    text = str(reason)
    if text.startswith("invalid perl operator: (?=") or text.startswith(
        "invalid perl operator: (?!"
    ):
        text += " (RE2 has no lookahead)"
    elif text.startswith("invalid perl operator: (?<"):
        text += " (RE2 has no lookbehind)"
    elif text.startswith("invalid escape sequence: \\") and text[-1:].isdigit():
        text += " (RE2 has no backreferences)"
    return text
