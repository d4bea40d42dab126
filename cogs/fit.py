"""One place that fits text to Discord's limits, used by every message, embed and modal the bot builds.

The limits are Discord's (https://discord.com/developers/docs/resources/message#embed-object-embed-limits and the
component and message references): a message's content 2,000 characters; an embed's title 256, description 4,096,
field names 256 and values 1,024, footer 2,048, author name 256, at most 25 fields and 6,000 characters in all;
button labels 80; custom ids 100; a modal's title 45, its text inputs' labels 45 and values 4,000. Long text is
shortened visibly (it ends in "…"); where the whole text matters, the caller attaches it as a file.
"""

from __future__ import annotations

from collections.abc import Sequence

import discord

from services.text_limits import PROMPT_MAX_CHARS

CONTENT = 2000
EMBED_TITLE = 256
EMBED_DESCRIPTION = 4096
FIELD_NAME = 256
FIELD_VALUE = 1024
FOOTER = 2048
AUTHOR_NAME = 256
EMBED_FIELDS = 25
EMBED_TOTAL = 6000
BUTTON_LABEL = 80
CUSTOM_ID = 100
MODAL_TITLE = 45
INPUT_LABEL = 45
INPUT_VALUE = 4000
ELLIPSIS = "…"
#: The longest prompt (or negative prompt, or server default) a user can give: what the result embed and the Edit
#: form can show back in full (the painter's page takes the same).
PROMPT = PROMPT_MAX_CHARS


def short(text: str, limit: int) -> str:
    """`text`, or its first `limit` - 1 characters and "…"."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + ELLIPSIS


def content(text: str) -> str:
    return short(text, CONTENT)


def listing(items: Sequence[str], limit: int, *, separator: str = ", ", empty: str = "none") -> str:
    """As many of `items` as fit in `limit` characters, then "and N more" for the rest."""
    if not items:
        return empty
    shown: list[str] = []
    for i, item in enumerate(items):
        rest = len(items) - i - 1
        tail = f"{separator}and {rest} more" if rest else ""
        candidate = separator.join([*shown, item])
        if len(candidate) + len(tail) > limit:
            more = f"and {len(items) - i} more"
            return short(f"{separator.join(shown)}{separator if shown else ''}{more}", limit)
        shown.append(item)
    return separator.join(shown)


def prefill(text: str, max_length: int) -> str:
    """A text input's pre-filled value: Discord refuses a modal whose value is longer than the input allows."""
    return short(text, min(max_length, INPUT_VALUE))


def embed(shown: discord.Embed) -> discord.Embed:
    """Fit every part of an embed to its limit, keep at most 25 fields, and keep the whole within 6,000 characters
    (shortening the description first, then the longest fields). Returns the same embed, fitted."""
    if shown.title:
        shown.title = short(shown.title, EMBED_TITLE)
    if shown.description:
        shown.description = short(shown.description, EMBED_DESCRIPTION)
    if shown.footer.text:
        shown.set_footer(text=short(shown.footer.text, FOOTER), icon_url=shown.footer.icon_url)
    if shown.author.name:
        shown.set_author(name=short(shown.author.name, AUTHOR_NAME), url=shown.author.url,
                         icon_url=shown.author.icon_url)
    fields = shown.fields[:EMBED_FIELDS]
    shown.clear_fields()
    for field in fields:
        shown.add_field(name=short(field.name or "\u200b", FIELD_NAME),
                        value=short(field.value or "\u200b", FIELD_VALUE), inline=bool(field.inline))
    excess = len(shown) - EMBED_TOTAL
    if excess > 0 and shown.description:
        shown.description = short(shown.description, max(1, len(shown.description) - excess))
        excess = len(shown) - EMBED_TOTAL
    while excess > 0 and shown.fields:
        longest = max(range(len(shown.fields)), key=lambda i: len(shown.fields[i].value or ""))
        field = shown.fields[longest]
        value = field.value or ""
        shown.set_field_at(longest, name=field.name or "\u200b", value=short(value, max(1, len(value) - excess)),
                           inline=bool(field.inline))
        excess = len(shown) - EMBED_TOTAL
    return shown
