"""The worker as a Ray Serve application: `serve run services.worker.serve.app:build_app` (or `serve deploy` of
`deploy/serve.yaml`).

Two deployments (https://docs.ray.io/en/latest/serve/key-concepts.html):

- `WorkerIngress` (`services.worker.serve.ingress`): one replica serving fal's queue protocol on Serve's HTTP
  proxy, with the request queue, the safety checker and the prompt expander;
- `InpaintModel` (`services.worker.serve.model`): the pipeline on `model_replicas` replicas (or autoscaled
  between `min_replicas` and `max_replicas` on ongoing requests), each with `model_num_gpus` GPUs
  (`model_num_cpus` CPUs), batching with `@serve.batch` and routing LoRA sets with `@serve.multiplexed`.

The worker's own settings (MODEL_PATH, PIPELINE, WORKER_KEY, SAFETY_CHECKER_PATH, … as for
`python -m services.worker`) are read from the environment of the process that builds the application (`serve run`,
or, for `serve deploy`, the cluster: set them in the config's `runtime_env.env_vars`), and can be overridden by the
`worker` argument. The builder's arguments (`ServeArgs`) come from `serve run … key=value` or the config's `args`.
"""

from __future__ import annotations

import json
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve import Application, Deployment

from services.worker.config import WorkerConfig


class Autoscaling(BaseModel):
    """Serve's autoscaling on ongoing requests per replica
    (https://docs.ray.io/en/latest/serve/autoscaling-guide.html)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=300.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is more than max_replicas")
        return self


class ServeArgs(BaseModel):
    """The application's arguments."""

    model_config = ConfigDict(extra="forbid")

    model_replicas: int = Field(default=1, ge=1, description="Model replicas (without autoscaling)")
    autoscaling: Autoscaling | None = Field(default=None, description="Autoscale the model replicas instead")
    model_num_gpus: float = Field(default=0.0, ge=0, description="GPUs per model replica (1 on a GPU machine)")
    model_num_cpus: float = Field(default=1.0, ge=0, description="CPUs per model replica")
    ingress_num_cpus: float = Field(default=1.0, ge=0, description="CPUs of the ingress replica")
    ingress_num_gpus: float = Field(default=0.0, ge=0,
                                    description="GPU share of the ingress (its safety checker and prompt expander)")
    batch_wait_s: float = Field(default=0.05, ge=0, le=5, description="How long a Serve batch waits to fill")
    in_flight: int | None = Field(default=None, ge=1, description="Requests the ingress sends to the model "
                                  "replicas at once (default: enough to fill every replica's batch)")
    attempts: int = Field(default=3, ge=1, le=10, description="Sends of a request whose model replica died")
    replica_wait_s: float = Field(default=300.0, gt=0, description="How long a request waits for a model replica "
                                  "to take it (none running: e.g. all failed to start) before it fails")
    worker: dict[str, Any] = Field(default_factory=dict, description="Worker settings over the environment's")

    @field_validator("worker", "autoscaling", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        """`serve run … key=value` passes every argument as text: JSON objects are read as such."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not a JSON object: {value[:80]!r}") from exc
        return value

    def max_model_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.model_replicas


def build_app(args: dict[str, Any]) -> Application:
    """The application `serve run` / `serve deploy` start (an application builder: Serve calls it with the
    arguments)."""
    from services.worker.serve import ingress as ingress_module
    from services.worker.serve import model as model_module

    settings = ServeArgs.model_validate(args)
    config = WorkerConfig(**settings.worker)
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.model_num_cpus, "num_gpus": settings.model_num_gpus}}
    if settings.autoscaling is not None:
        model_options["autoscaling_config"] = settings.autoscaling.model_dump()
    else:
        model_options["num_replicas"] = settings.model_replicas
    per_replica = max(config.max_batch_images, model_module.MAX_IMAGES_PER_REQUEST)
    in_flight = settings.in_flight or settings.max_model_replicas() * per_replica
    # the decorated classes are Serve `Deployment`s at run time (typed as the classes)
    model_deployment: Deployment = cast(Deployment, model_module.InpaintModel)
    ingress_deployment: Deployment = cast(Deployment, ingress_module.WorkerIngress)
    model = model_deployment.options(**model_options).bind(config, settings.batch_wait_s)
    ingress = ingress_deployment.options(
        ray_actor_options={"num_cpus": settings.ingress_num_cpus, "num_gpus": settings.ingress_num_gpus})
    return ingress.bind(model, config, in_flight, settings.attempts, settings.replica_wait_s)
