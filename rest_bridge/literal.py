"""A strict parser for legacy 1's `text_pairs` string: a Python literal list of [query, passage] pairs.

The original service ran `ast.literal_eval` on it. This reads only brackets, commas and plain string
literals (the subset `str(list_of_pairs)` writes), so nothing in the text is ever evaluated.
"""

from __future__ import annotations

import re

_SIMPLE_ESCAPES = {
    "\\": "\\",
    "'": "'",
    '"': '"',
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "0": "\0",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_SPACE = re.compile(r"[ \t\r\n]*")


class LiteralError(ValueError):
    """The text is not a list of [query, passage] string pairs; the message says where and why."""


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> LiteralError:
        found = repr(self.text[self.pos : self.pos + 20]) if self.pos < len(self.text) else "the end of the text"
        return LiteralError(f"text_pairs: {what} at character {self.pos}, found {found}")

    def skip_space(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos : self.pos + 1]

    def expect(self, chars: str, what: str) -> str:
        char = self.peek()
        if not char or char not in chars:
            raise self.fail(f"expected {what}")
        self.pos += 1
        return char

    def string(self) -> str:
        quote = self.peek()
        if quote not in ("'", '"'):
            raise self.fail("expected a quoted string (only plain 'text' or \"text\" literals are accepted)")
        if self.text.startswith(quote * 3, self.pos):
            raise self.fail("triple-quoted strings are not accepted")
        self.pos += 1
        out: list[str] = []
        text = self.text
        while True:
            end = _next_special(text, self.pos, quote)
            out.append(text[self.pos : end])
            self.pos = end
            if end >= len(text) or text[end] in "\n\r":
                raise self.fail("unterminated string")
            if text[end] == quote:
                self.pos += 1
                return "".join(out)
            out.append(self._escape())

    def _escape(self) -> str:
        self.pos += 1  # the backslash
        char = self.text[self.pos : self.pos + 1]
        if char in _SIMPLE_ESCAPES:
            self.pos += 1
            return _SIMPLE_ESCAPES[char]
        if char in _HEX_ESCAPES:
            digits = self.text[self.pos + 1 : self.pos + 1 + _HEX_ESCAPES[char]]
            if len(digits) != _HEX_ESCAPES[char] or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise self.fail(f"bad \\{char} escape")
            value = int(digits, 16)
            if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                raise self.fail(f"\\{char} escape is not a valid character")
            self.pos += 1 + len(digits)
            return chr(value)
        raise self.fail("unsupported escape sequence")


def _next_special(text: str, start: int, quote: str) -> int:
    """Index of the next quote, backslash or newline at or after `start` (len(text) if none)."""
    best = len(text)
    for char in (quote, "\\", "\n", "\r"):
        i = text.find(char, start, best)
        if i != -1:
            best = i
    return best


def parse_text_pairs(text: str, max_chars: int, max_pairs: int) -> list[list[str]]:
    """`[['q', 'p'], ...]` -> [[q, p], ...]; pairs may also be tuples. LiteralError names the problem."""
    if len(text) > max_chars:
        raise LiteralError(f"text_pairs has {len(text)} characters; the limit is {max_chars}")
    r = _Reader(text)
    r.expect("[", "'[' starting the list of [query, passage] pairs")
    pairs: list[list[str]] = []
    while r.peek() != "]":
        if len(pairs) == max_pairs:
            raise LiteralError(f"text_pairs has more than {max_pairs} pairs; the limit is {max_pairs}")
        close = "]" if r.expect("[(", "'[' starting a [query, passage] pair") == "[" else ")"
        query = r.string()
        r.expect(",", "',' between query and passage (each pair holds exactly two strings)")
        passage = r.string()
        if r.peek() == ",":
            r.pos += 1
        r.expect(close, f"'{close}' closing the pair (each pair holds exactly two strings)")
        pairs.append([query, passage])
        if r.peek() != "]":
            r.expect(",", "',' or ']' after a pair")
    r.pos += 1
    r.skip_space()
    if r.pos != len(text):
        raise r.fail("unexpected text after the list")
    if not pairs:
        raise LiteralError("text_pairs is an empty list; send at least one [query, passage] pair")
    return pairs
