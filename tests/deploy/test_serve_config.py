"""deploy/serve.yaml, read as Ray Serve reads it: a valid Serve config whose application arguments the builder
accepts, and the builder's refusals of bad arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

pytest.importorskip("ray.serve", reason="the Serve config needs the [cluster] extra")

from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from services.worker.serve.app import ServeArgs, build_app

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml"


def _config() -> dict[str, Any]:
    loaded = yaml.safe_load(CONFIG.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_the_config_is_a_valid_serve_deploy_config() -> None:
    schema = ServeDeploySchema.model_validate(_config())
    [app] = schema.applications
    assert app.import_path == "services.worker.serve.app:build_app" and app.route_prefix == "/"
    assert schema.http_options.port == 8000 and schema.http_options.host == "0.0.0.0"


def test_its_arguments_build_the_application() -> None:
    [app] = _config()["applications"]
    args = ServeArgs.model_validate(app["args"])
    assert args.autoscaling is not None and args.autoscaling.max_replicas == 4
    # one whole GPU's worth per node is shared out: model replicas and the ingress's share fit one GPU together
    assert args.model_num_gpus + args.ingress_num_gpus <= 1
    assert isinstance(build_app(app["args"]), Application)


@pytest.mark.parametrize("args", [
    {"model_replicas": 0},
    {"autoscaling": {"min_replicas": 3, "max_replicas": 2}},
    {"attempts": 0},
    {"model_num_gpus": -1},
    {"replicas": 2},  # a misspelt argument is refused, not ignored
    {"worker": {"pipeline": "nope"}},
])
def test_bad_arguments_are_refused(args: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        build_app(args)


def test_command_line_arguments_arrive_as_text_and_are_read() -> None:
    """`serve run services.worker.serve.app:build_app model_replicas=2 'worker={"pipeline": "classic"}'`"""
    args = ServeArgs.model_validate({"model_replicas": "2", "worker": '{"pipeline": "classic"}',
                                     "autoscaling": '{"max_replicas": 3}'})
    assert args.model_replicas == 2 and args.worker == {"pipeline": "classic"}
    assert args.autoscaling is not None and args.autoscaling.max_replicas == 3
    with pytest.raises(ValidationError):
        ServeArgs.model_validate({"worker": "pipeline=classic"})
