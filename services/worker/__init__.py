"""The self-hosted worker: a fal-protocol HTTP server running SDXL inpainting (or a CPU fallback).

- `app`: the HTTP app (routes, handlers, the lifespan that loads the models and runs the queue)
- `protocol`: fal's response bodies, request ids and the middleware
- `queue`: the request queue (arrival order, batching, cancel, the runner and the reaper)
- `records`: one request's record (state, logs, change notification, result or error)
- `inputs`: from a validated request to a pipeline job (checks, fetching, fitting, batch keys)
- `outputs`: from a pipeline's images to the output body (safety check, encoding, files)
- `pipelines/`: the `sdxl` and `classic` pipelines behind one interface; `safety`: the safety checker
- `config`: `WorkerConfig`, from the environment
"""
