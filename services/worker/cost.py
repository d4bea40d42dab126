"""What one inpainting request costs the worker, and the limit on it (MAX_REQUEST_COST).

A request's cost is output pixels × `num_images` × steps: the work a diffusion pipeline does grows with each. A
pipeline whose work grows otherwise says how many steps a request counts for with a `cost_steps(width, height,
steps)` method: the classic pipeline (an OpenCV fill) runs no steps, but the time of its fill grows with the
square of the pixels (0.06 s for a 512² image, 0.9 s for 1024², 17 s for 2048² on a 2-core CPU), so it counts 25
steps per megapixel (1024×1024 counts as 25 steps, 2048×2048 as 100). A pipeline without the method counts the
request's `num_inference_steps`.

A request over the limit is refused at submit with a 422 in fal's `detail` shape (the `loc`/`msg`/`type` entries
its endpoints answer invalid input with) naming the fields that make up its cost, so nobody waits in the queue for
a refusal and one request can't hold the queue for minutes.

The default limit, 1024×1024 × 8 images × 65 steps, admits every request at fal's preset sizes (the largest is
1024×1024) whatever its images and steps (the schema allows 8 and 65 at most); on the classic pipeline that is
about 20 s of work on a 2-core CPU. It refuses what made the worker hold its queue: 2048×2048 × 8 images (75 s on
the classic pipeline; 4× the work of the largest preset request on SDXL).
"""

from __future__ import annotations

from collections.abc import Callable

from services.schema import InpaintInput
from services.worker.inputs import RequestError, output_size
from services.worker.pipelines.base import Pipeline

COST_ERROR_TYPE = "value_error.request_cost"


def cost_steps(inp: InpaintInput, pipeline: Pipeline) -> int:
    """The steps a request counts for on `pipeline`: what its `cost_steps` says when it has one, else the
    request's `num_inference_steps`."""
    width, height = output_size(inp)
    counted: Callable[[int, int, int], int] | None = getattr(pipeline, "cost_steps", None)
    return inp.num_inference_steps if counted is None else counted(width, height, inp.num_inference_steps)


def request_cost(inp: InpaintInput, pipeline: Pipeline) -> int:
    """Output pixels × images × steps."""
    width, height = output_size(inp)
    return width * height * inp.num_images * cost_steps(inp, pipeline)


def check_cost(inp: InpaintInput, pipeline: Pipeline, limit: int) -> None:
    """Raise `RequestError` (a 422 naming image_size, num_images and, where they count, num_inference_steps) when
    the request costs more than `limit`."""
    cost = request_cost(inp, pipeline)
    if cost <= limit:
        return
    width, height = output_size(inp)
    steps = cost_steps(inp, pipeline)
    counted = "" if getattr(pipeline, "cost_steps", None) is None else \
        f" (the {pipeline.name} pipeline counts a {width}×{height} request as {steps} steps)"
    error = RequestError(
        "image_size", f"{width}×{height} pixels × {inp.num_images} image(s) × {steps} steps{counted} cost "
        f"{cost:,}, more than this worker's limit of {limit:,} per request (MAX_REQUEST_COST): ask for a smaller "
        "image_size, fewer num_images or fewer num_inference_steps", COST_ERROR_TYPE)
    error.detail.append({"loc": ["body", "num_images"], "msg": f"{inp.num_images} image(s): part of the request's "
                         "cost (see image_size)", "type": COST_ERROR_TYPE})
    if counted == "":
        error.detail.append({"loc": ["body", "num_inference_steps"], "msg": f"{steps} steps: part of the "
                             "request's cost (see image_size)", "type": COST_ERROR_TYPE})
    raise error
