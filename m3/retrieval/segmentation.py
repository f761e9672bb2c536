r"""Text segmentation for lexical embedders: what a token is, in any script (paper §3.1).

`HashedNgramEmbedder` hashes n-grams of tokens, so what it retrieves depends on how text is
cut into tokens. Cutting at `\w+` runs, as m3 first did, serves languages written with
spaces between words, but a Chinese or Japanese sentence is then a single token (which no
paraphrase shares) and emoji are no token at all. The paper's model is bilingual, English
and Chinese (§4; §7 evaluates it on C-Eval and CMMLU too), so its chunks must find their
references in scripts without spaces as well. `unicode_tokens` therefore

- normalises the text with NFKC (full-width letters and digits become ASCII, half-width
  kana full-width), so that variant forms of a character are one token, and drops format
  characters (zero-width joiners, bidi marks), variation selectors and emoji skin tones;
- keeps a word of a script written with spaces as one token, its combining marks
  (accents, harakat, vowel signs) included;
- makes each letter of a script written without spaces (Han, kana, Hangul, Thai, Lao,
  Khmer, Myanmar) a token of its own, so that token pairs are character bigrams, the usual
  lexical unit for those scripts;
- makes each emoji and other non-ASCII symbol a token, so that 🍣 matches 🍣.

On ASCII text it gives exactly the tokens of `\w+` (`word_tokens`), and it takes that
shortcut for ASCII pieces, so English text is segmented as before and as fast.

| segmentation | function | what a token is |
|---|---|---|
| `"unicode"` | `unicode_tokens` | a word, a letter of a script without spaces, or a symbol |
| `"words"` | `word_tokens` | a run of `\w` characters (how banks built before cut text) |
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Iterable

_WORD = re.compile(r"\w+", re.UNICODE)

#: How `HashedNgramEmbedder` cuts text into tokens (see `unicode_tokens`, `word_tokens`).
SEGMENTATIONS = ("unicode", "words")

#: Blocks of scripts written without spaces between words (or, for Hangul, with particles
#: glued to words): each of their letters is a token of its own.
_NO_SPACE_BLOCKS = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK and Kangxi radicals
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3021, 0x3029),  # Hangzhou numerals
    (0x3031, 0x303C),  # kana repeat marks, 〻 〼
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3130, 0x318F),  # Hangul compatibility Jamo
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xA960, 0xA97F),  # Hangul Jamo Extended-A
    (0xAC00, 0xD7FF),  # Hangul syllables, Jamo Extended-B
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFF66, 0xFFDC),  # halfwidth Katakana and Hangul (NFKC widens most of them)
    (0x1B000, 0x1B16F),  # Kana Supplement, Extended-A, Small Kana Extension
    (0x20000, 0x3FFFF),  # CJK Unified Ideographs Extensions B–H, compatibility supplement
)

#: Emoji skin-tone modifiers: dropped, so that 👍🏽 is the token 👍.
_SKIN_TONES = range(0x1F3FB, 0x1F400)

#: Code points classified by category: planes 0–1 and plane 14 (tags, variation selectors);
#: the others hold only letters (Han), unassigned or private-use code points.
_CLASSIFIED = (range(0x20000), range(0xE0000, 0xE1000))


def _char_class(code_points: Iterable[int]) -> str:
    """A regex character class body (`a-z…`) for a set of code points, as ranges."""
    points = sorted(set(code_points))
    parts: list[str] = []
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        first, last = re.escape(chr(points[i])), re.escape(chr(points[j]))
        parts.append(first if i == j else f"{first}-{last}")
        i = j + 1
    return "".join(parts)


@functools.cache
def _unicode_tables() -> tuple[re.Pattern[str], dict[int, None]]:
    """The token pattern and the table of dropped characters (built once, ~0.1 s)."""
    marks, symbols, dropped = [], [], dict.fromkeys(_SKIN_TONES)
    for block in _CLASSIFIED:
        for cp in block:
            category = unicodedata.category(chr(cp))
            if category == "Cf" or 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:
                dropped[cp] = None  # format characters (ZWJ, bidi marks, tags), selectors
            elif category[0] == "M":
                marks.append(cp)
            elif category[0] == "S" and cp >= 0x80 and cp not in _SKIN_TONES:
                symbols.append(cp)  # emoji and other non-ASCII symbols (So, Sm, Sc, Sk)
    no_space = [
        cp for low, high in _NO_SPACE_BLOCKS for cp in range(low, min(high, sys.maxunicode) + 1)
        if chr(cp).isalnum()
    ]  # fmt: skip
    c, m, s = _char_class(no_space), _char_class(marks), _char_class(symbols)
    pattern = re.compile(f"[{c}][{m}]*|[{s}]|[^\\W{c}](?:[^\\W{c}]|[{m}])*")
    return pattern, dropped


def word_tokens(text: str, *, lowercase: bool = False) -> list[str]:
    r"""Cut text into runs of word characters: the `"words"` segmentation.

    This is `re.findall(r"\w+", text)`: letters, digits and `_`, in any script. A sentence
    of a script written without spaces is one token, and emoji are none.

    Args:
        text: Any text.
        lowercase: Lower-case it first.

    Returns:
        The tokens, in order, none empty.
    """
    return _WORD.findall(text.lower() if lowercase else text)


def unicode_tokens(text: str, *, lowercase: bool = False) -> list[str]:
    r"""Cut text into tokens for scripts with and without spaces and for emoji.

    The text is NFKC-normalised (full-width letters and digits become ASCII, half-width
    kana full-width), stripped of format characters (zero-width joiners, bidi marks),
    variation selectors and emoji skin tones, and lower-cased if asked. Then:

    - a run of word characters (`\w`: letters, digits, `_`) of a script written with
      spaces is one token, with the combining marks inside it (accents, Arabic harakat,
      Indic vowel signs);
    - each letter of a script written without spaces — Han, Hiragana, Katakana, Hangul,
      Thai, Lao, Khmer, Myanmar — is a token, with its combining marks (word n-grams of
      these tokens are character n-grams);
    - each non-ASCII symbol (emoji, ©, €, →: Unicode categories `So`, `Sm`, `Sc`, `Sk`) is a
      token;
    - everything else (spaces, punctuation, ASCII symbols) separates tokens.

    On ASCII text this is exactly the `"words"` segmentation, `re.findall(r"\w+", text)`.

    Args:
        text: Any text.
        lowercase: Lower-case it (after the normalisation, so that e.g. ℌ becomes h).

    Returns:
        The tokens, in order, none empty.
    """
    if text.isascii():
        return word_tokens(text, lowercase=lowercase)
    pattern, dropped = _unicode_tables()
    text = unicodedata.normalize("NFKC", text).translate(dropped)
    if lowercase:
        text = text.lower()
    # no token spans white space, and on ASCII the pattern is `\w+`: the long character
    # classes are only tried on the pieces that need them (~7x slower than `\w+`)
    tokens: list[str] = []
    for piece in text.split():
        tokens += _WORD.findall(piece) if piece.isascii() else pattern.findall(piece)
    return tokens
