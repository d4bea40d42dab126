"""`/inpaint` and the "Inpaint this image" message command: check the attachments, then launch the job
(`services/launch.py`: admission, then the download and intake, then the job). Offers the mask painter when there
is no mask, and shows a refused mask as a picture. Everything past the Discord glue lives in `services/`."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from cogs import fit
from cogs.drafts import draft_message
from cogs.errors import report_error
from cogs.interactions import requester_of, services_of
from cogs.items import view_of
from cogs.permissions import require_posting
from services.errors import UserError
from services.images import ImageInputError, MaskOptions, PreparedInputs, prepare_inputs_async
from services.launch import DraftOffered, Launched, NewImages, expanded_upload
from services.outpaint import Expansion, outpaint_options
from services.painter.links import PainterLink
from services.preview import parse_colour, understood_jpeg

#: The model's working resolution: what counts is the preset's pixel count (the crop decides the shape, and the
#: result always comes back at the picture's own size).
SIZE_CHOICES = [
    app_commands.Choice(name="About 1 megapixel (SDXL's best)", value="auto"),
    app_commands.Choice(name="About 0.6 megapixel (faster)", value="landscape_16_9"),
    app_commands.Choice(name="About 0.25 megapixel (fastest)", value="square"),
]
FORMAT_CHOICES = [app_commands.Choice(name="JPEG", value="jpeg"), app_commands.Choice(name="PNG", value="png")]
AREA_CHOICES = [app_commands.Choice(name="Around the mask, at full detail (default)", value="masked"),
                app_commands.Choice(name="The whole picture (for restyling it all)", value="whole")]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".avif")


def check_attachment(attachment: discord.Attachment, role: str, max_bytes: int) -> None:
    """Refuse an attachment by its declared type and size, before downloading a byte of it."""
    if attachment.size > max_bytes:
        raise UserError(f"The {role} `{attachment.filename}` is {attachment.size / 1048576:.1f} MiB; the limit is "
                        f"{max_bytes / 1048576:.0f} MiB.")
    declared = (attachment.content_type or "").split(";")[0].strip().lower()
    if declared and not declared.startswith("image/"):
        raise UserError(f"The {role} `{attachment.filename}` isn't an image ({declared}). Send a PNG, JPEG or WebP.")
    if not declared and not attachment.filename.lower().endswith(IMAGE_SUFFIXES):
        raise UserError(f"The {role} `{attachment.filename}` doesn't look like an image. Send a PNG, JPEG or WebP.")


def first_image(message: discord.Message) -> discord.Attachment:
    for attachment in message.attachments:
        declared = (attachment.content_type or "").lower()
        if declared.startswith("image/") or attachment.filename.lower().endswith(IMAGE_SUFFIXES):
            return attachment
    raise UserError("That message has no image attachment to inpaint.")


class Inpaint(commands.Cog):
    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot
        self.context_menu = app_commands.ContextMenu(name="Inpaint this image", callback=self.inpaint_message)
        self.context_menu.guild_only = True

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.context_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.context_menu.name, type=self.context_menu.type)

    @app_commands.command(name="inpaint", description="Repaint part of an image with SDXL")
    @app_commands.guild_only()
    @app_commands.describe(
        image="The picture to change",
        prompt="What to paint in the masked area",
        mask="Mask: white = repaint, black = keep. Leave empty to use the image's transparent area",
        negative_prompt="What to avoid",
        size="The model's working resolution (the result keeps your picture's size)",
        steps="Denoising steps (1-65, default 25)",
        guidance="How closely to follow the prompt (0-20, default 7.5)",
        strength="How much to change the masked area (0.01-1, default 0.95)",
        seed="Seed for a repeatable result (default: random)",
        num_images="How many images (1-8, default 1)",
        format="Output format for JPEG uploads (default JPEG; PNG uploads come back as PNG)",
        invert_mask="Swap the mask's colours (if you painted what to keep)",
        feather="Blend the new pixels into the old over this many pixels (0-64, default 4)",
        area="What the model sees: the area around the mask (default) or the whole picture",
        padding="Context around the mask, in pixels (default: a quarter of the mask's size)",
        keep_unmasked="With the whole picture: keep the unmasked pixels as they were (default yes)",
        expand_prompt="Let the backend enrich your prompt (hosted fal; workers with a prompt expander)",
        mask_colour="No mask? The colour you painted over the image with (a name or #hex), e.g. magenta",
    )
    @app_commands.choices(size=SIZE_CHOICES, format=FORMAT_CHOICES, area=AREA_CHOICES)
    async def inpaint(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: app_commands.Range[str, 1, fit.PROMPT],
        mask: discord.Attachment | None = None,
        negative_prompt: app_commands.Range[str, 0, fit.PROMPT] | None = None,
        size: str | None = None,
        steps: app_commands.Range[int, 1, 65] | None = None,
        guidance: app_commands.Range[float, 0.0, 20.0] | None = None,
        strength: app_commands.Range[float, 0.01, 1.0] | None = None,
        seed: app_commands.Range[int, 0, 2**53 - 1] | None = None,
        num_images: app_commands.Range[int, 1, 8] | None = None,
        format: str | None = None,
        invert_mask: bool = False,
        feather: app_commands.Range[int, 0, 64] | None = None,
        mask_colour: app_commands.Range[str, 1, 20] | None = None,
        area: str | None = None,
        padding: app_commands.Range[int, 0, 4096] | None = None,
        keep_unmasked: bool | None = None,
        expand_prompt: bool | None = None,
    ) -> None:
        # options left empty fall back to the server's defaults, then fal's (and crop and stitch's)
        options: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative_prompt or None, "image_size": size,
                                   "num_inference_steps": steps, "guidance_scale": guidance, "strength": strength,
                                   "seed": seed, "num_images": num_images, "format": format, "area": area,
                                   "padding": padding, "feather": feather, "keep_unmasked": keep_unmasked,
                                   "expand_prompt": expand_prompt}
        colour = parse_colour(mask_colour) if mask_colour else None
        await self.start(interaction, image, mask, options, MaskOptions(invert=invert_mask, paint_colour=colour))

    @app_commands.command(name="outpaint", description="Extend a picture beyond its edges with SDXL")
    @app_commands.guild_only()
    @app_commands.describe(
        image="The picture to extend",
        left="Pixels to add on the left (0-4096)", right="Pixels to add on the right (0-4096)",
        top="Pixels to add at the top (0-4096)", bottom="Pixels to add at the bottom (0-4096)",
        prompt="What to paint in the new area (default: more of the same)",
        negative_prompt="What to avoid",
        seed="Seed for a repeatable result (default: random)",
        num_images="How many images (1-8, default 1)",
    )
    async def outpaint(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        left: app_commands.Range[int, 0, 4096] = 0,
        right: app_commands.Range[int, 0, 4096] = 0,
        top: app_commands.Range[int, 0, 4096] = 0,
        bottom: app_commands.Range[int, 0, 4096] = 0,
        prompt: app_commands.Range[str, 0, fit.PROMPT] | None = None,
        negative_prompt: app_commands.Range[str, 0, fit.PROMPT] | None = None,
        seed: app_commands.Range[int, 0, 2**53 - 1] | None = None,
        num_images: app_commands.Range[int, 1, 8] | None = None,
    ) -> None:
        services = services_of(self.bot)
        limits = services.intake_limits
        require_posting(interaction)
        check_attachment(image, "image", limits.max_bytes)
        expansion = Expansion(left=left, right=right, top=top, bottom=bottom)
        if expansion.empty:
            raise UserError("Give a number of pixels to add on at least one side.")
        upload = _Upload(image, None)
        await interaction.response.defer(ephemeral=True, thinking=True)  # answered: the rest can take its time

        async def read() -> bytes:
            return (await upload.read())[0]

        options = outpaint_options({"prompt": prompt or "", "negative_prompt": negative_prompt or None, "seed": seed,
                                    "num_images": num_images})
        outcome = await services.launcher.launch(requester_of(interaction), options,
                                                 expanded_upload(read, expansion, limits))
        assert isinstance(outcome, Launched)
        await interaction.followup.send(f"Queued as job #{outcome.job.id}: progress is in the channel.",
                                        ephemeral=True)

    async def inpaint_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        image = first_image(message)
        require_posting(interaction)
        check_attachment(image, "image", services_of(self.bot).intake_limits.max_bytes)
        await interaction.response.send_modal(InpaintModal(self, image))

    async def start(self, interaction: discord.Interaction, image: discord.Attachment,
                    mask: discord.Attachment | None, options: dict[str, Any], mask_options: MaskOptions) -> None:
        """Check the attachments, answer, then launch: admission first, and only then the download and intake."""
        services = services_of(self.bot)
        limits = services.intake_limits
        require_posting(interaction)
        check_attachment(image, "image", limits.max_bytes)
        if mask is not None:
            check_attachment(mask, "mask", limits.max_bytes)
        who = requester_of(interaction)
        upload = _Upload(image, mask)
        await interaction.response.defer(ephemeral=True, thinking=True)  # answered: the rest can take its time

        async def prepare() -> PreparedInputs:
            image_bytes, mask_bytes = await upload.read()
            return await prepare_inputs_async(image_bytes, mask_bytes, limits=limits,
                                              options=mask_options)

        try:
            outcome = await services.launcher.launch(who, options, NewImages(prepare))
        except ImageInputError as exc:
            if exc.code == "no_mask" and services.painter is not None and services.painter.reachable:
                link = await services.painter.offer(who, upload.image_bytes, options)
                await offer_painter(interaction, link)
                return
            if exc.code == "no_mask":
                raise UserError(NO_MASK_WAYS + painter_missing(services.painter is not None)) from exc
            if exc.code in ("empty_mask", "full_mask"):  # show what was understood, so the mistake is visible
                picture = await asyncio.to_thread(understood_jpeg, upload.image_bytes, upload.mask_bytes, limits,
                                                  mask_options)
                await interaction.followup.send(f"{exc.message}\nLeft: your image with the mask as read (red = "
                                                "repaint). Right: the mask (white = repaint).", ephemeral=True,
                                                file=discord.File(io.BytesIO(picture), filename="understood.jpg"))
                return
            raise
        if isinstance(outcome, DraftOffered):
            shown = draft_message(outcome)
            await interaction.followup.send(embed=shown.embed, view=shown.view, file=shown.file, ephemeral=True)
            return
        note = " (mask taken from the image's transparent area)" if outcome.mask_source == "alpha" else ""
        await interaction.followup.send(f"Queued as job #{outcome.job.id}{note}: progress is in the channel.",
                                        ephemeral=True)


class _Upload:
    """The attachments of one interaction, downloaded once (the interaction already answered: downloads take
    time)."""

    def __init__(self, image: discord.Attachment, mask: discord.Attachment | None) -> None:
        self.image, self.mask = image, mask
        self.image_bytes = b""
        self.mask_bytes: bytes | None = None

    async def read(self) -> tuple[bytes, bytes | None]:
        self.image_bytes, self.mask_bytes = await asyncio.gather(
            self.image.read(), self.mask.read() if self.mask else _none())
        return self.image_bytes, self.mask_bytes


NO_MASK_WAYS = ("No mask was attached and the image has no transparent area. To mark what to repaint:\n"
                "• attach a mask to `/inpaint` (white = repaint, black = keep), or\n"
                "• erase that area to transparency and send the picture as a PNG, or\n"
                "• paint over it in one solid colour and give that colour as `mask_colour` (e.g. magenta).")


def painter_missing(enabled: bool) -> str:
    """Why the web mask painter isn't offered, and who can change that."""
    if not enabled:
        return "\n(The web mask painter is turned off on this bot.)"
    return ("\n(The web mask painter isn't set up on this bot: its operator sets `PAINTER_PUBLIC_URL` to an address "
            "people can open.)")


NO_MASK = "No mask was attached and the image has no transparent area, so paint the area to change on this page."


async def offer_painter(interaction: discord.Interaction, link: PainterLink, intro: str = NO_MASK) -> None:
    """Answer an interaction (already deferred) with a personal link to paint the mask."""
    button = discord.ui.Button[discord.ui.View](style=discord.ButtonStyle.link, label="Paint the mask", emoji="🖌️",
                                                url=link.url)
    await interaction.followup.send(
        f"{intro} The link is yours only and works once, for {link.ttl_s // 60} minutes.", view=view_of(button),
        ephemeral=True)


async def _none() -> None:
    return None


class InpaintModal(discord.ui.Modal):
    """Asks for the prompt (and a mask upload) for an image already in the channel."""

    def __init__(self, cog: Inpaint, image: discord.Attachment) -> None:
        super().__init__(title="Inpaint this image", timeout=900)
        self.cog = cog
        self.image = image
        self.prompt: discord.ui.TextInput[InpaintModal] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, max_length=fit.PROMPT,
            placeholder="What to paint in the masked area")
        self.negative: discord.ui.TextInput[InpaintModal] = discord.ui.TextInput(
            label="Negative prompt", style=discord.TextStyle.paragraph, required=False, max_length=fit.PROMPT)
        self.mask_upload: discord.ui.FileUpload[InpaintModal] = discord.ui.FileUpload(
            required=False, min_values=0, max_values=1)
        self.add_item(self.prompt)
        self.add_item(self.negative)
        self.add_item(discord.ui.Label(text="Mask (white = repaint)", component=self.mask_upload,
                                       description="Optional if the image has a transparent area"))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        uploads = list(self.mask_upload.values)
        options: dict[str, Any] = {"prompt": self.prompt.value, "negative_prompt": self.negative.value or None}
        await self.cog.start(interaction, self.image, uploads[0] if uploads else None, options, MaskOptions())

    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:  # type: ignore[override]
        await report_error(interaction, error)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Inpaint(bot))
