"""How jobs look in Discord: progress and result embeds, attachments within the upload limit."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Any

import discord
from PIL import Image

from cogs import fit
from cogs.fit import short
from services.blob import Blob
from services.job_state import Job, JobStatus
from services.progress import Progress
from services.schema import InpaintInput, InpaintOutput

COLOUR_RUNNING = discord.Colour.blurple()
COLOUR_DONE = discord.Colour.green()
COLOUR_FAILED = discord.Colour.red()
COLOUR_CANCELLED = discord.Colour.light_grey()
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
PREVIEW_NAME = "preview.jpg"

_STATUS_TEXT = {
    JobStatus.QUEUED: "⏳ Waiting in the bot's queue",
    JobStatus.SUBMITTED: "📨 Sent to the backend",
    JobStatus.RUNNING: "🎨 Painting",
    JobStatus.SUCCEEDED: "✅ Done",
    JobStatus.FAILED: "❌ Failed",
    JobStatus.CANCELLED: "🚫 Cancelled",
    JobStatus.BLOCKED: "⛔ Blocked",
}


def option(job: Job, name: str) -> Any:
    """One of the job's request options, or fal's default for it when the request left it out."""
    return job.input.get(name, InpaintInput.model_fields[name].default)


def _size_text(job: Job) -> str:
    """The picture's size, and the model's working size when it worked on a crop."""
    if job.plan is not None:
        (width, height), (sent_w, sent_h) = job.plan.image_size, job.plan.sent
        return f"{width}×{height} (model {sent_w}×{sent_h})"
    size = option(job, "image_size")
    return f"{size['width']}×{size['height']}" if isinstance(size, dict) else str(size)


def progress_embed(job: Job, progress: Progress | None, *, local_position: int | None = None) -> discord.Embed:
    status = progress.status if progress else job.status
    embed = discord.Embed(title=f"Inpainting job #{job.id}", colour=COLOUR_RUNNING,
                          description=short(job.input.get("prompt", ""), 300))
    text = _STATUS_TEXT[status]
    if local_position is not None:
        text += f" (position {local_position + 1})"
    elif progress and progress.queue_position is not None:
        text = f"⏳ In the backend's queue (position {progress.queue_position + 1})"
    embed.add_field(name="Status", value=text, inline=True)
    if progress and progress.bar():
        embed.add_field(name="Progress", value=progress.bar(), inline=True)
    if progress:
        embed.add_field(name="Elapsed", value=f"{progress.elapsed():.0f} s", inline=True)
    if progress and progress.logs:
        lines = "\n".join(short(line, 90) for line in progress.logs)
        embed.add_field(name="Log", value=f"```\n{short(lines, 900)}\n```", inline=False)
    embed.set_image(url=f"attachment://{PREVIEW_NAME}")
    embed.set_footer(text=f"{_size_text(job)} · {option(job, 'num_inference_steps')} steps · "
                          f"backend: {job.backend}")
    return fit.embed(embed)


def ended_embed(job: Job) -> discord.Embed:
    colour = {JobStatus.SUCCEEDED: COLOUR_DONE, JobStatus.CANCELLED: COLOUR_CANCELLED}.get(job.status, COLOUR_FAILED)
    embed = discord.Embed(title=f"Inpainting job #{job.id}", colour=colour,
                          description=short(job.input.get("prompt", ""), 300))
    embed.add_field(name="Status", value=_STATUS_TEXT[job.status], inline=True)
    if job.started_at and job.finished_at:
        embed.add_field(name="Took", value=f"{job.finished_at - job.created_at:.1f} s", inline=True)
    if job.error and job.status is not JobStatus.CANCELLED:
        embed.add_field(name="Why", value=short(job.error, 1000), inline=False)
    embed.set_image(url=f"attachment://{PREVIEW_NAME}")
    return fit.embed(embed)


def result_embed(job: Job, output: InpaintOutput, attached: ResultFiles, *, spoiler: bool = False) -> discord.Embed:
    """The result's embed, showing the first attachment as it was really attached (a JPEG re-encoding included)."""
    embed = discord.Embed(title=f"Inpainted · job #{job.id}", colour=COLOUR_DONE,
                          description=short(output.prompt or job.input.get("prompt", ""), 1000))
    inp = job.input
    negative = inp.get("negative_prompt")
    if negative:
        embed.add_field(name="Negative prompt", value=short(negative, 300), inline=False)
    embed.add_field(name="Seed", value=f"`{output.seed}`", inline=True)
    embed.add_field(name="Size", value=_size_text(job), inline=True)
    embed.add_field(name="Steps", value=str(option(job, "num_inference_steps")), inline=True)
    embed.add_field(name="Guidance", value=f"{option(job, 'guidance_scale'):g}", inline=True)
    embed.add_field(name="Strength", value=f"{option(job, 'strength'):g}", inline=True)
    embed.add_field(name="Backend", value=job.backend, inline=True)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in output.timings.items())
    if timings:
        embed.add_field(name="Timings", value=timings, inline=False)
    if any(output.has_nsfw_concepts):
        embed.add_field(name="Safety", value="The safety checker flagged this result: it is posted behind a spoiler "
                        "under this server's settings for age-restricted channels." if spoiler else
                        "The safety checker flagged this result; this server allows it in age-restricted channels.",
                        inline=False)
    if attached.note:
        embed.add_field(name="Note", value=attached.note, inline=False)
    if not spoiler and attached.encoded:  # an embed image would show a spoilered attachment unblurred
        embed.set_image(url=f"attachment://{attached.names[0]}")
    return fit.embed(embed)


def params_json(job: Job) -> str:
    """What the user asked (after the server's defaults), where the model worked (the crop and its working size),
    and the request the backend got."""
    shown: dict[str, Any] = {"job": job.id, "parent": job.parent_job_id, "status": job.status.value,
                             "backend": job.backend, "asked": job.options()}
    if job.plan is not None:
        shown["picture"] = list(job.plan.image_size)
        shown["crop"], shown["sent"] = list(job.plan.crop), list(job.plan.sent)
    shown["request"] = {k: v for k, v in job.input.items() if k not in ("image_url", "mask_url")}
    if job.result:
        shown["seed"] = job.result.get("seed")
        shown["timings"] = job.result.get("timings")
    return json.dumps(shown, indent=2)


def _extension(content_type: str) -> str:
    return {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}.get(content_type, "png")


@dataclass(frozen=True)
class ResultFiles:
    """The result images as they will be attached, and what was done to fit them under the upload limit (empty:
    nothing). `prefix` tells apart the files of several jobs posted in one message."""

    encoded: list[tuple[bytes, str]]  # (data, content type)
    note: str = ""
    spoiler: bool = False
    prefix: str = ""

    @property
    def names(self) -> list[str]:
        return [f"{'SPOILER_' if self.spoiler else ''}{self.prefix}result_{i}.{_extension(content_type)}"
                for i, (_, content_type) in enumerate(self.encoded)]

    @property
    def files(self) -> list[discord.File]:
        """New `discord.File`s each time (a file is read when it is sent)."""
        return [discord.File(io.BytesIO(data), filename=name)
                for (data, _), name in zip(self.encoded, self.names, strict=True)]

    @property
    def size(self) -> int:
        return sum(len(data) for data, _ in self.encoded)

    def prefixed(self, prefix: str) -> ResultFiles:
        return replace(self, prefix=prefix)


def result_files(images: list[Blob], limit: int, *, spoiler: bool = False) -> ResultFiles:
    """The result images as attachments that fit the upload limit (re-encoded as JPEG, then smaller, if needed);
    as spoilers (blurred until clicked) when the server's settings say so."""
    budget = int(limit * 0.95)
    encoded = [(blob.data, blob.content_type) for blob in images]
    note = ""
    for quality, scale in ((None, 1.0), (90, 1.0), (85, 0.75), (80, 0.5), (75, 0.35)):
        if sum(len(d) for d, _ in encoded) <= budget:
            break
        encoded = [_reencode(blob.data, quality or 90, scale) for blob in images]
        note = (f"Re-encoded as JPEG{'' if scale == 1.0 else f' at {scale:.0%} of its size'} to fit this server's "
                f"{limit / 1048576:.0f} MiB upload limit.")
    return ResultFiles(encoded, note, spoiler)


def _reencode(data: bytes, quality: int, scale: float) -> tuple[bytes, str]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "image/jpeg"


def upload_limit(guild: discord.Guild | None) -> int:
    return guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT

