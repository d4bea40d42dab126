"""One base for every persistent button (job, draft and mod-log buttons), after discord.py's
`examples/views/dynamic_counter.py`: the custom id carries what the button acts on, so a button keeps working
after a restart; state is read when it is pressed.

    class RerollButton(JobButton, DynamicButton, action="reroll"):
        label = "Reroll"

A family (`JobButton`, …) names its custom-id prefix and the ids that follow the action; the class statement's
`action=` completes the template (`inpaint:reroll:(?P<job_id>\\d+)`). Who may press a button is decided in
`authorize` (called from discord.py's `interaction_check`); what it does is `run`. Either one's user errors are
answered privately, and nothing else runs.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Self

import discord

from cogs.errors import report_error

DynamicButton = discord.ui.DynamicItem[discord.ui.Button[Any]]

_PATTERNS: dict[type, str] = {int: r"\d+", str: r"[\w-]+"}


class PersistentButton:
    """Mixin for `DynamicItem[Button]` subclasses: custom id `<prefix>:<action>:<id>[:<id>…]`."""

    prefix: ClassVar[str] = ""
    #: the ids after the action, in order, with their types (`int` or `str`)
    fields: ClassVar[tuple[tuple[str, type[int] | type[str]], ...]] = ()
    action: ClassVar[str] = ""
    label: ClassVar[str] = ""
    emoji: ClassVar[str | None] = None
    style: ClassVar[discord.ButtonStyle] = discord.ButtonStyle.secondary

    def __init_subclass__(cls, *, action: str | None = None, **kwargs: Any) -> None:
        if action is None:  # a family (JobButton, …), not a button yet
            super().__init_subclass__(**kwargs)
            return
        cls.action = action
        groups = ":".join(f"(?P<{name}>{_PATTERNS[kind]})" for name, kind in cls.fields)
        super().__init_subclass__(template=f"{cls.prefix}:{action}:{groups}", **kwargs)  # type: ignore[call-arg]

    def __init__(self, *ids: int | str, row: int | None = None) -> None:
        if len(ids) != len(self.fields):
            raise TypeError(f"{type(self).__name__} takes {len(self.fields)} id(s), got {len(ids)}")
        self.ids = ids
        custom_id = ":".join((self.prefix, self.action, *map(str, ids)))
        button: discord.ui.Button[Any] = discord.ui.Button(label=self.label, emoji=self.emoji, style=self.style,
                                                           custom_id=custom_id)
        super().__init__(button, row=row)  # type: ignore[call-arg]  # DynamicItem.__init__

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[discord.Client], item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> Self:
        return cls(*(kind(match[name]) for name, kind in cls.fields))

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        try:
            await self.authorize(interaction)
        except Exception as exc:
            await report_error(interaction, exc)
            return False
        return True

    async def authorize(self, interaction: discord.Interaction) -> None:
        """Raise a user error when this person may not press this button. Anyone may, by default."""

    async def callback(self, interaction: discord.Interaction) -> None:
        try:
            await self.run(interaction)
        except Exception as exc:
            await report_error(interaction, exc)

    async def run(self, interaction: discord.Interaction) -> None:
        raise NotImplementedError


def view_of(*items: discord.ui.Item[Any]) -> discord.ui.View:
    """A view (without a timeout: the buttons are persistent) holding `items`."""
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    return view
