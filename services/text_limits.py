"""How much text a user may give the bot, wherever they type it (a slash command, the Edit form, the mask painter's
page): one limit, so a prompt accepted anywhere fits everywhere the bot shows prompts back (the result embed and
the Edit form, whose text inputs hold at most 4,000 characters)."""

from __future__ import annotations

#: The longest prompt (or negative prompt, or server default) a user can give.
PROMPT_MAX_CHARS = 1000
