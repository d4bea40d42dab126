"""Prompt filters: a built-in list plus each server's words and regular expressions, applied to the prompt and the
negative prompt after normalisation (case, accents, look-alike letters, leetspeak, invisible characters, letters
spaced or dotted apart). Server regexes run with a timeout (the `regex` package), and a pattern that can blow up
(catastrophic backtracking) is refused when it is set.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import regex

from services.errors import UserError
from services.server_settings import ServerSettings

#: The built-in list for every server (a server may turn it off with `use_default_filters`).
DEFAULT_WORDS: tuple[str, ...] = (
    "nude", "nudes", "naked", "nsfw", "porn", "porno", "pornographic", "sex", "sexy", "hentai", "loli", "lolicon",
    "shota", "shotacon", "nipple", "nipples", "genitals", "genitalia", "penis", "vagina", "boobs", "topless",
    "undressed", "explicit", "xxx", "gore", "gory", "dismembered", "decapitated", "beheading", "rape",
)
MAX_RULES = 200
MAX_REGEX_LENGTH = 200
REGEX_TIMEOUT_S = 0.05


# --- normalisation ------------------------------------------------------------------------------------

_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s",
                       "!": "i", "|": "i", "€": "e"})
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
# letters split apart by punctuation: "n.u.d.e", "n-u-d-e", "n_u_d_e", "n*u*d*e"
_DOTTED = re.compile(r"\b[a-z](?:[._\-*+~'`,]+[a-z]){2,}\b")
_DOT_SEPARATORS = re.compile(r"[._\-*+~'`,]+")
# letters split apart by spaces: "n u d e" (a run of three or more single letters)
_SPACED = re.compile(r"\b[a-z](?: +[a-z]){2,}\b")


def _canonical(text: str) -> str:
    """Lower case, accents and invisible characters gone, look-alikes folded, leetspeak undone."""
    text = unicodedata.normalize("NFKD", text.translate(_INVISIBLE))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    return " ".join(_leet(word) for word in text.split())


def variants(text: str) -> list[str]:
    """The ways a prompt may be read: as written, with split-apart letters joined, and with a leading one-letter
    word ("a", "i") kept apart from a spaced-out word that follows it ("a n u d e")."""
    base = _DOTTED.sub(lambda m: _DOT_SEPARATORS.sub("", m.group(0)), _canonical(text))
    joined = _SPACED.sub(lambda m: m.group(0).replace(" ", ""), base)
    apart = _SPACED.sub(lambda m: _keep_article(m.group(0)), base)
    return list(dict.fromkeys((base, joined, apart)))


def _keep_article(run: str) -> str:
    letters = run.split()
    if letters[0] in ("a", "i") and len(letters) > 3:
        return letters[0] + " " + "".join(letters[1:])
    return "".join(letters)


def normalize(text: str) -> str:
    """The prompt with every trick undone (its last reading: split-apart letters joined)."""
    return variants(text)[-1]


def _leet(word: str) -> str:
    """Undo leetspeak inside words that have letters (so "1024" stays a number)."""
    return word.translate(_LEET) if any(c.isalpha() for c in word) else word


# --- the filter ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FilterHit:
    rule: str  # e.g. "default word 'nude'", "server regex 'foo.*bar'"
    field: str  # "prompt" or "negative_prompt"


class PromptFilter:
    def __init__(self, settings: ServerSettings) -> None:
        words: list[tuple[str, str]] = []
        if settings.use_default_filters:
            words += [(w, f"default word '{w}'") for w in DEFAULT_WORDS]
        words += [(normalize(w), f"server word '{w}'") for w in settings.filter_words if w.strip()]
        self._words = [(re.compile(rf"\b{re.escape(w)}(?:s|es)?\b"), label) for w, label in words if w]
        self._regexes = [(regex.compile(p, regex.IGNORECASE), f"server regex '{p}'") for p in settings.filter_regexes]

    def check(self, fields: dict[str, str]) -> FilterHit | None:
        """The first rule any field breaks, or None."""
        for name, text in fields.items():
            if not text:
                continue
            readings = variants(text)
            for pattern, label in self._words:
                if any(pattern.search(reading) for reading in readings):
                    return FilterHit(label, name)
            for compiled, label in self._regexes:
                try:
                    if any(compiled.search(reading, timeout=REGEX_TIMEOUT_S) for reading in (*readings, text)):
                        return FilterHit(label, name)
                except TimeoutError:
                    return FilterHit(f"{label} (took too long: treated as a match)", name)
        return None


_PROBES = ("a" * 3000 + "!", "x" * 3000 + "y", " " * 3000 + "!", "ab" * 1500 + "!", "a a " * 800 + "!",
           "0" * 3000 + "!", "aaa.bbb." * 400 + "!")


def validate_regex(pattern: str) -> str:
    """Refuse a pattern that doesn't compile, is too long, or backtracks catastrophically on hostile input."""
    if not pattern.strip():
        raise UserError("The pattern is empty.")
    if len(pattern) > MAX_REGEX_LENGTH:
        raise UserError(f"Patterns can be at most {MAX_REGEX_LENGTH} characters long.")
    try:
        compiled = regex.compile(pattern, regex.IGNORECASE)
    except regex.error as exc:
        raise UserError(f"That isn't a valid regular expression: {exc}.") from exc
    literals = sorted({ch for ch in pattern if ch.isalnum()})[:12]
    probes = [*_PROBES, *(ch * 3000 + "!" for ch in literals), *(ch * 3000 + "\n" for ch in literals)]
    for probe in probes:
        try:
            compiled.search(probe, timeout=REGEX_TIMEOUT_S)
        except TimeoutError as exc:
            raise UserError("That pattern can take exponential time on some prompts (catastrophic "
                            "backtracking, e.g. nested repeats like `(a+)+`). Please simplify it.") from exc
    return pattern
