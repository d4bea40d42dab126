"""The self-hosted worker: a fal-protocol HTTP server running SDXL inpainting (or a CPU fallback), and fal's NSFW
estimator (`fal-ai/imageutils/nsfw`) with its safety checker.

- `app`: the HTTP app (routes, handlers, the apps it serves, the lifespan that loads the models and runs the queue)
- `protocol`: fal's response bodies, request ids and the middleware
- `queue`: the request queue (inpainting in arrival order with batching, checks beside it, cancel, the runner and
  the reaper)
- `records`: one request's record (state, logs, change notification, result or error), a base with one subclass
  per app
- `inputs`: from a validated request to a pipeline job (checks, fetching, fitting, batch keys)
- `outputs`: from a pipeline's images to the output body (safety check, encoding, files)
- `checks`: one NSFW check, from its image URL to `nsfw_probability`
- `expander`: prompt expansion for `expand_prompt` (a local causal text-generation model)
- `pipelines/`: the `sdxl` and `classic` pipelines behind one interface; `safety`: the safety checker
- `preparation`: requests prepared (fetched, decoded, checked) ahead of the device, a bounded number at once
- `storage`: the data folder: waiting requests' sources, results' files and large output bodies
- `cost`: what a request costs (pixels × images × steps) and MAX_REQUEST_COST
- `idempotency`: the `Idempotency-Key` header of submits
- `memory`: freed memory handed back to the OS
- `config`: `WorkerConfig`, from the environment
"""
