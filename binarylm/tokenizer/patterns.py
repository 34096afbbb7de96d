"""Pre-tokenization: the split pattern that cuts text into pieces before BPE.

BPE never merges across piece boundaries, so the pattern decides what a token
can be: with the GPT-4 pattern a token never holds both letters and digits,
never more than three digits, and a space sticks to the word that follows it.

The two built-in patterns are written for the third-party `regex` engine
(they use `\\p{L}` for "any letter" and `\\p{N}` for "any number"), which is
what tiktoken's patterns mean. Python's own `re` engine is about three times
faster on this kind of pattern but has no `\\p{...}` classes, so for the
built-in patterns we spell the classes out as explicit code-point ranges,
computed once, and run them on `re`.

Which characters are letters depends on the Unicode version. tiktoken's
engine knows Unicode 16.0, while the `regex` module may know a newer one (17.0
made ~9000 more code points letters). To split exactly as tiktoken does, the
classes come from `unicodedata2` pinned at 16.0 (white space is the same in
every version). Custom patterns run on `regex` with whatever it knows.

One catch: `re` checks a class with characters beyond U+FFFF range by range,
which is slow, so the explicit classes stop at U+FFFF. The few stretches of
text that have such "astral" characters (emoji, math letters) are split with
each of them replaced by a stand-in from the same class (a letter for a
letter, a number for a number, a symbol for anything else). The split only
looks at which class a character is in, so the piece boundaries are the same,
and the pieces are then cut from the original text. Tests check that both
engines agree everywhere.
"""

from __future__ import annotations

import functools
import itertools
import re

import regex
import unicodedata2

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


@functools.cache
def compile_pattern(pattern: str) -> Splitter:
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
        """The pieces of `text`; stretches with astral characters take the slower stand-in path."""
        pieces: list[str] = []
        done = 0
        while (astral := _ASTRAL.search(text, done)) is not None:
            begin = _safe_cut_before(text, astral.start(), done)
            end = _safe_cut_after(text, astral.end())
            pieces += self._engine.findall(text, done, begin)
            pieces += self._findall_with_stand_ins(text[begin:end])
            done = end
        pieces += self._engine.findall(text, done)
        return pieces

    def _findall_with_stand_ins(self, text: str) -> list[str]:
        pieces = self._engine.findall(_ASTRAL.sub(_stand_in, text))
        ends = list(itertools.accumulate(map(len, pieces)))
        return [text[start:end] for start, end in zip([0, *ends], ends)]


# A place where both built-in patterns always end one piece and start another, so
# splitting the text there changes nothing: a line break after a visible ASCII
# character, with an ASCII letter next. (The pieces before it end with the line
# break whatever follows, and no piece starts with a line break and goes on.)
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=[A-Za-z])")


def _safe_cut_after(text: str, position: int) -> int:
    found = _SAFE_CUT.search(text, position)
    return found.start() if found else len(text)


def _safe_cut_before(text: str, position: int, floor: int) -> int:
    newline = position
    while (newline := text.rfind("\n", floor + 1, newline)) != -1:
        if _SAFE_CUT.match(text, newline + 1):
            return newline + 1
    return floor


_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")
_LETTER, _NUMBER, _SPACE, _OTHER = "\u00aa", "\u00b2", "\u2003", "\u00a7"  # ª ² em-space §
_WHITE_SPACE = regex.compile(r"\s")  # the White_Space property, unchanged since Unicode 6


def _unicode_class(char: str) -> str:
    """"L" for a letter, "N" for a number, "S" for white space, "" for anything else."""
    major = unicodedata2.category(char)[0]
    if major in "LN":
        return major
    return "S" if _WHITE_SPACE.match(char) else ""


@functools.cache
def _stand_in_for(char: str) -> str:
    """A character below U+10000 in the same class (letter, number, space, other) as `char`."""
    return {"L": _LETTER, "N": _NUMBER, "S": _SPACE}.get(_unicode_class(char), _OTHER)


def _stand_in(match: re.Match) -> str:
    return _stand_in_for(match.group())


@functools.cache
def _bmp_classes() -> dict[str, str]:
    """`re` class bodies for letters (L), numbers (N) and white space (S), over U+0000..U+FFFF."""
    members: dict[str, list[str]] = {"L": [], "N": [], "S": []}
    for code in [*range(0xD800), *range(0xE000, 0x10000)]:
        char = chr(code)
        kind = _unicode_class(char)
        if kind:
            members[kind].append(char)
    return {kind: _ranges(chars) for kind, chars in members.items()}


def _ranges(chars: list[str]) -> str:
    """Sorted characters as compact `re` ranges: "a-z" rather than 26 letters."""
    parts = []
    for _, run in itertools.groupby(enumerate(chars), key=lambda item: ord(item[1]) - item[0]):
        run = [char for _, char in run]
        first, last = re.escape(run[0]), re.escape(run[-1])
        parts.append(first if len(run) == 1 else f"{first}-{last}")
    return "".join(parts)
