"""The web mask painter, wired to the bot: a personal link offered when /inpaint has no mask, and a submit that
creates the job in the channel like any other."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import discord

from cogs.flow import launch_job
from services.admission import Requester
from services.http_server import LoopServer
from services.images import IntakeLimits, normalized_image, prepare_inputs
from services.painter.app import PainterConfig, create_painter_app
from services.painter.tokens import new_session_id, sign
from services.store import PainterSession, PainterSessions

if TYPE_CHECKING:
    from bot import InpaintBot

log = logging.getLogger(__name__)


class Painter:
    def __init__(self, bot: InpaintBot) -> None:
        self.bot = bot
        settings = bot.settings
        self.sessions = PainterSessions(bot.store)
        secret = settings.painter_secret.get_secret_value() if settings.painter_secret else secrets.token_hex(32)
        self.secret = secret.encode()
        self.public_url = (settings.painter_public_url or "").rstrip("/")
        self.clock = time.time
        self._server: LoopServer | None = None

    async def start(self) -> str:
        settings = self.bot.settings
        config = PainterConfig(secret=self.secret, sessions=self.sessions, load_image=self.bot.store.get_blob,
                               on_submit=self.submit, secure_cookies=self.public_url.startswith("https://"),
                               clock=lambda: self.clock())
        self._server = LoopServer(create_painter_app(config), host=settings.painter_host,
                                  port=settings.painter_port)
        local = await self._server.start()
        self.public_url = self.public_url or local
        log.info("mask painter listening on %s (links point at %s)", local, self.public_url)
        return local

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()

    async def offer(self, interaction: discord.Interaction, image_bytes: bytes, params: dict[str, Any],
                    who: Requester) -> None:
        """Answer /inpaint (already deferred) with a personal link to paint the mask."""
        limits = IntakeLimits(max_bytes=self.bot.settings.max_image_bytes,
                              max_pixels=self.bot.settings.max_image_pixels)
        _, blob = await asyncio.to_thread(normalized_image, image_bytes, limits)
        ttl = self.bot.settings.painter_link_ttl_s
        session = await self.sessions.create(
            new_session_id(), user_id=who.user_id, guild_id=who.guild_id, channel_id=who.channel_id,
            image=(blob.data, blob.content_type), requester=dataclasses.asdict(who), params=params,
            expires_at=self.clock() + ttl)
        url = f"{self.public_url}/paint/{sign(self.secret, session)}"
        view = discord.ui.View(timeout=None)
        view.add_item(discord.ui.Button(style=discord.ButtonStyle.link, label="Paint the mask", emoji="🖌️", url=url))
        await interaction.followup.send(
            "No mask was attached and the image has no transparent area, so paint the area to change on this page. "
            f"The link is yours only and works once, for {ttl // 60} minutes.", view=view, ephemeral=True)

    async def submit(self, session: PainterSession, prompt: str, mask: bytes) -> int:
        """A painted mask arrived: admit, create and start the job in its channel; returns the job id."""
        bot = self.bot
        blob = await bot.store.get_blob(session.image_sha256)
        if blob is None:
            raise LookupError("the painter image is gone")
        limits = IntakeLimits(max_bytes=bot.settings.max_image_bytes, max_pixels=bot.settings.max_image_pixels)
        prepared = await asyncio.to_thread(prepare_inputs, blob.data, mask, limits=limits)
        who = Requester(**{**session.requester, "role_ids": tuple(session.requester.get("role_ids", ()))})
        admission = await bot.admissions.admit(who, {**session.params, "prompt": prompt})
        job = await bot.jobs.create(prepared, admission.params, user_id=who.user_id, guild_id=who.guild_id,
                                    channel_id=who.channel_id, age_restricted=who.age_restricted)
        await bot.store.add_event(job.id, "note", "mask painted in the web painter")
        await launch_job(bot, job, prepared)
        return job.id
