"""The error of a malformed query: where it went wrong and what was expected there."""

from __future__ import annotations

from mailmesh_common.errors import InvalidInput


class QuerySyntaxError(InvalidInput):
    """INVALID_ARGUMENT naming the 1-based character position and what was expected."""

    def __init__(self, position: int, expected: str, got: str = "") -> None:
        self.position = position + 1  # 1-based, as people count
        self.expected = expected
        self.got = got
        found = f", found {got}" if got else ""
        super().__init__(f"invalid query at character {self.position}: expected {expected}{found}")
