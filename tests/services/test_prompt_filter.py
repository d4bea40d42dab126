"""Prompt filters: the built-in list sees through tricks without false positives; server words and regexes;
catastrophic regexes are refused when they are set."""

from __future__ import annotations

import pytest

from services.errors import UserError
from services.prompt_filter import PromptFilter, normalize, validate_regex
from services.server_settings import ServerSettings


@pytest.mark.parametrize(
    ("prompt", "rule"),
    [("A NÜDE woman", "nude"), ("n u d e beach", "nude"), ("n.u.d.e", "nude"), ("N-U-D-E", "nude"),
     ("nud3 art", "nude"), ("p0rn", "porn"), ("s\u200bexy", "sexy"), ("NAKEDS", "naked"),
     ("expl1c1t", "explicit"), ("ｎｕｄｅ", "nude")],
)
def test_default_filter_sees_through_tricks(prompt: str, rule: str) -> None:
    hit = PromptFilter(ServerSettings()).check({"prompt": prompt})
    assert hit is not None and hit.rule == f"default word '{rule}'" and hit.field == "prompt"


@pytest.mark.parametrize("prompt", ["essex county fair", "sussex", "a landscape at 1024", "snakedance",
                                    "a scunthorpe sign", "the 3 musketeers", "glass of 7up"])
def test_no_false_positives_on_innocent_prompts(prompt: str) -> None:
    assert PromptFilter(ServerSettings()).check({"prompt": prompt}) is None


def test_server_words_regexes_and_the_negative_prompt() -> None:
    policy = ServerSettings(filter_words=["Clown"], filter_regexes=[r"\bspider\s*man\b"], use_default_filters=False)
    check = PromptFilter(policy).check
    assert check({"prompt": "a c.l.o.w.n at a party"}) == check({"prompt": "CLOWNS"})
    hit_word = check({"prompt": "clown"})
    assert hit_word is not None and hit_word.rule == "server word 'Clown'"
    hit = check({"prompt": "a hero", "negative_prompt": "SpiderMan"})
    assert hit is not None and hit.field == "negative_prompt" and hit.rule.startswith("server regex")
    assert check({"prompt": "nude"}) is None  # the built-in list is off for this server
    assert normalize("Crème Brûlée") == "creme brulee"


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(x+x+)+y", r"(a|aa)+$", r"^(\w+\s?)+$"])
def test_catastrophic_regexes_are_refused(pattern: str) -> None:
    with pytest.raises(UserError, match="catastrophic"):
        validate_regex(pattern)


def test_regex_validation() -> None:
    assert validate_regex(r"\bdragons?\b") == r"\bdragons?\b"
    for bad, why in (("(unclosed", "valid regular expression"), ("", "empty"), ("a" * 300, "at most")):
        with pytest.raises(UserError, match=why):
            validate_regex(bad)
