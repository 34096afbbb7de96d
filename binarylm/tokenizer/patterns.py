"""Pre-tokenization: the split pattern that cuts text into pieces before BPE.

BPE never merges across piece boundaries, so the pattern decides what a token
can be: with the GPT-4 pattern a token never holds both letters and digits,
never more than three digits, and a space sticks to the word that follows it.

The two built-in patterns are written for the third-party `regex` engine
(they use `\\p{L}` for "any letter" and `\\p{N}` for "any number"), which is
what tiktoken's patterns mean. Python's own `re` engine is about three times
faster on this kind of pattern but has no `\\p{...}` classes, so for the
built-in patterns we spell the classes out as explicit code-point ranges,
computed once from `regex` itself, and run them on `re`.

One catch: `re` checks a class with characters beyond U+FFFF range by range,
which is slow, so the explicit classes stop at U+FFFF. Text that has such
"astral" characters (emoji, math letters) is split with each of them replaced
by a stand-in from the same class (a letter for a letter, a number for a
number, a symbol for anything else). The split only looks at which class a
character is in, so the piece boundaries are the same, and the pieces are
then cut from the original text. Tests check both engines agree everywhere.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re

import regex

from binarylm.errors import BinaryLMError

GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# The same patterns with {L}, {N} and {S} standing for the explicit ranges of
# letters, numbers and white space, in the syntax of the standard `re` module.
_FAST_TEMPLATES = {
    GPT2_PATTERN: (
        r"""'(?:[sdmt]|ll|ve|re)| ?[{L}]++| ?[{N}]++| ?[^{S}{L}{N}]++|[{S}]++$"""
        r"""|[{S}]+(?![^{S}])|[{S}]"""
    ),
    GPT4_PATTERN: (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n{L}{N}]?+[{L}]++|[{N}]{{1,3}}+"""
        r"""| ?[^{S}{L}{N}]++[\r\n]*+|[{S}]++$|[{S}]*[\r\n]|[{S}]+(?![^{S}])|[{S}]"""
    ),
}


def resolve_pattern(pattern: str) -> str:
    """Turn a pattern name ("gpt2", "gpt4") or a custom regex into the regex text."""
    pattern = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pattern)
    except regex.error as exc:
        names = ", ".join(PATTERNS)
        raise BinaryLMError(
            f"split pattern {pattern!r} is not a valid regular expression ({exc}); "
            f"use one of the built-in names ({names}) or fix the expression"
        ) from None
    return pattern


def is_builtin(pattern: str) -> bool:
    return pattern in _FAST_TEMPLATES


@functools.lru_cache(maxsize=None)
def compile_pattern(pattern: str) -> "Splitter":
    """A splitter for `pattern`: the fast `re` form for built-ins, else plain `regex`."""
    return Splitter(pattern)


class Splitter:
    """Cuts text into pre-tokens; `findall(text)` returns them in order."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        template = _FAST_TEMPLATES.get(pattern)
        if template is None:
            self._engine = regex.compile(pattern)
            self.findall = self._engine.findall
        else:
            self._engine = re.compile(template.format(**_bmp_classes()))

    def findall(self, text: str) -> list[str]:
        astral_positions = [match.start() for match in _ASTRAL.finditer(text)]
        if not astral_positions:
            return self._engine.findall(text)
        pieces = self._engine.findall(_ASTRAL.sub(_stand_in, text))
        ends = list(itertools.accumulate(map(len, pieces)))
        for index in {bisect.bisect_right(ends, position) for position in astral_positions}:
            pieces[index] = text[ends[index - 1] if index else 0 : ends[index]]
        return pieces


_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")
_LETTER, _NUMBER, _SPACE, _OTHER = "\u00aa", "\u00b2", "\u2003", "\u00a7"  # ª ² em-space §


@functools.lru_cache(maxsize=None)
def _stand_in_for(char: str) -> str:
    """A character below U+10000 in the same class (letter, number, space, other) as `char`."""
    for stand_in, prop in ((_LETTER, r"\p{L}"), (_NUMBER, r"\p{N}"), (_SPACE, r"\s")):
        if regex.match(prop, char):
            return stand_in
    return _OTHER


def _stand_in(match: re.Match) -> str:
    return _stand_in_for(match.group())


@functools.lru_cache(maxsize=None)
def _bmp_classes() -> dict[str, str]:
    """`re` class bodies for `regex`'s \\p{L}, \\p{N} and \\s, over U+0000..U+FFFF."""
    every_bmp_char = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x10000)))
    return {
        name: _ranges(regex.finditer(prop + "+", every_bmp_char))
        for name, prop in (("L", r"\p{L}"), ("N", r"\p{N}"), ("S", r"\s"))
    }


def _ranges(runs) -> str:
    parts = []
    for run in runs:
        first, last = run.group()[0], run.group()[-1]
        parts.append(re.escape(first) if first == last else f"{re.escape(first)}-{re.escape(last)}")
    return "".join(parts)
