"""One job without Discord, through the very same services path as the bot (intake → admission → crop → backend →
stitch → checks), for operators smoke-testing a backend and for benchmarks:

    python -m services.cli inpaint --image IN --mask MASK --prompt TEXT --out OUT [--area masked|whole]
        [--feather PX] [--padding PX] [--seed N] [--format png|jpeg] [--no-keep-unmasked] [--steps N] [--size S]
    python -m services.cli outpaint --image IN [--prompt TEXT] --left PX --right PX --top PX --bottom PX --out OUT

The backend comes from the bot's own configuration (FAL_KEY, WORKER_URL, or the embedded worker when neither is
set). Jobs go into a throwaway database, never the bot's. The image is written to OUT, and one line of JSON is
printed: {"width", "height", "crop": [x, y, w, h], "sent": [w, h], "seed", "backend", "seconds"}. Errors are one
line on stderr, with exit code 2 for bad input (a job blocked by moderation included) and 1 for a backend failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from services.blob import Blob
from services.config import BotConfig, load_config
from services.container import build_services
from services.dispatch import QuietListener
from services.errors import UserError, validation_problems
from services.images import ImageInputError, IntakeLimits, PreparedInputs, prepare_inputs
from services.job_state import Job, JobStatus
from services.launch import Launched, NewImages, expanded_upload
from services.outpaint import Expansion, outpaint_options
from services.refusals import Refused
from services.requester import Requester
from services.schema import IMAGE_SIZE_PRESETS, InpaintOutput

BAD_INPUT, BACKEND_FAILED = 2, 1


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _OneJob(QuietListener):
    """The dispatcher's listener for one job: it only waits for the end."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()

    async def job_succeeded(self, job: Job, output: InpaintOutput, images: list[Blob], *,
                            spoiler: bool = False) -> None:
        self.ended.set()

    async def job_ended(self, job: Job) -> None:
        self.ended.set()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m services.cli", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    inpaint = commands.add_parser("inpaint", help="repaint the masked area of a picture")
    inpaint.add_argument("--image", type=Path, required=True)
    inpaint.add_argument("--mask", type=Path, required=True, help="white = repaint")
    inpaint.add_argument("--prompt", required=True)
    inpaint.add_argument("--area", choices=("masked", "whole"))
    inpaint.add_argument("--feather", type=int)
    inpaint.add_argument("--padding", type=int)
    inpaint.add_argument("--seed", type=int)
    inpaint.add_argument("--format", choices=("png", "jpeg"))
    inpaint.add_argument("--no-keep-unmasked", dest="keep_unmasked", action="store_false", default=None,
                         help="with --area whole: keep the model's whole output, unmasked pixels included")
    outpaint = commands.add_parser("outpaint", help="extend a picture beyond its edges")
    outpaint.add_argument("--image", type=Path, required=True)
    outpaint.add_argument("--prompt", default="")
    for side in ("left", "right", "top", "bottom"):
        outpaint.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    outpaint.add_argument("--seed", type=int)
    for command in (inpaint, outpaint):
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--steps", type=int, help="denoising steps (fal's default when not given)")
        command.add_argument("--size", choices=("auto", *IMAGE_SIZE_PRESETS),
                             help="the model's working resolution: the preset's pixel count (default about 1 MP)")
    return top


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"can't read {path}: {exc.strerror or exc}", BAD_INPUT) from exc


def _job(args: argparse.Namespace, limits: IntakeLimits) -> tuple[dict[str, Any], NewImages]:
    """The options and the images of the job the command line asks for."""
    image = _read(args.image)
    common = {"prompt": args.prompt, "seed": args.seed, "num_inference_steps": args.steps, "image_size": args.size}
    if args.command == "inpaint":
        mask = _read(args.mask)

        async def inpaint() -> PreparedInputs:
            return await asyncio.to_thread(prepare_inputs, image, mask, limits=limits)

        return {**common, "area": args.area, "feather": args.feather, "padding": args.padding, "format": args.format,
                "keep_unmasked": args.keep_unmasked}, NewImages(inpaint, may_draft=False)
    if min(args.left, args.right, args.top, args.bottom) < 0:
        raise CliError("--left, --right, --top and --bottom can't be negative", BAD_INPUT)

    async def read() -> bytes:
        return image

    expansion = Expansion(left=args.left, right=args.right, top=args.top, bottom=args.bottom)
    return outpaint_options(common), expanded_upload(read, expansion, limits)


async def run(args: argparse.Namespace, config: BotConfig) -> dict[str, Any]:
    """Run the job; returns the summary line (and writes the image to `args.out`)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="inpaint-cli-") as tmp:
        config = config.model_copy(update={"database_path": Path(tmp) / "cli.sqlite3", "painter_enabled": False})
        async with build_services(config) as services:
            options, source = _job(args, services.intake_limits)
            listener = _OneJob()
            await services.dispatcher.start(listener)
            try:
                outcome = await services.launcher.launch(Requester(guild_id=None, channel_id=None, user_id=0),
                                                         options, source)
            except (Refused, UserError, ImageInputError) as exc:
                raise CliError(_message(exc), BAD_INPUT) from exc
            assert isinstance(outcome, Launched)
            limit = config.backend_total_timeout_s + 60
            try:
                await asyncio.wait_for(listener.ended.wait(), limit)
            except TimeoutError as exc:
                raise CliError(f"the backend did not finish the job within {limit:g} s", BACKEND_FAILED) from exc
            job = await services.store.jobs.get(outcome.job.id)
            if job.status is JobStatus.BLOCKED:  # what was sent, or what came back, was refused
                raise CliError(f"the job was blocked: {job.error}", BAD_INPUT)
            if job.status is not JobStatus.SUCCEEDED:
                raise CliError(f"the job {job.status.value}: {job.error}", BACKEND_FAILED)
            result = (await services.store.jobs.blobs(job.id))["output_0"]
    try:
        args.out.write_bytes(result.data)
    except OSError as exc:
        raise CliError(f"can't write {args.out}: {exc.strerror or exc}", BAD_INPUT) from exc
    plan = job.plan
    assert plan is not None and job.result is not None
    return {"width": plan.image_size[0], "height": plan.image_size[1], "crop": list(plan.crop),
            "sent": list(plan.sent), "seed": job.result.get("seed"), "backend": job.backend,
            "seconds": round(time.perf_counter() - started, 3)}


def _message(exc: Exception) -> str:
    if isinstance(exc, Refused):
        return exc.reason.plain()
    if isinstance(exc, UserError | ImageInputError):
        return exc.message
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config()
    except ValidationError as exc:
        print(f"error: the configuration isn't valid: {'; '.join(validation_problems(exc))}", file=sys.stderr)
        return BAD_INPUT
    try:
        summary = asyncio.run(run(args, config))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
