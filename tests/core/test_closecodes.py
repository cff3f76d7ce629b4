"""Close codes stay in their documented ranges."""

from __future__ import annotations

import pytest

from gateway.core import closecodes
from gateway.core.closecodes import ERRORS, CloseReason, ErrorCode


def test_constants_respect_ranges() -> None:
    """Retryable application codes are 4000-4499, terminal ones 4500-4999."""
    reasons = [v for v in vars(closecodes).values() if isinstance(v, CloseReason)]
    exported = [n for n in closecodes.__all__ if isinstance(getattr(closecodes, n), CloseReason)]
    assert len(reasons) == len(exported)
    assert set(closecodes.__all__) - set(exported) == {"CloseReason", "ERRORS", "ErrorCode"}
    for reason in reasons:
        if 4000 <= reason.code <= 4499:
            assert reason.reconnect
        if 4500 <= reason.code <= 4999:
            assert not reason.reconnect


@pytest.mark.parametrize(
    ("code", "reason", "reconnect"),
    [(4001, "x" * 124, True), (4001, "x", False), (4500, "x", True)],
)
def test_invalid_reasons_refused(code: int, reason: str, reconnect: bool) -> None:
    """A reason over 123 bytes, or a code outside its range's reconnect rule, is refused."""
    with pytest.raises(ValueError):
        CloseReason(code, reason, reconnect)


def test_every_error_code_has_a_close() -> None:
    """Each ErrorCode member is its code's text in upper case and maps to a close reason."""
    assert set(ERRORS) == set(ErrorCode)
    for code in ErrorCode:
        assert code.name == code.value.upper()
        assert code == code.value and f"{code}" == code.value
        assert isinstance(ERRORS[code], CloseReason)
