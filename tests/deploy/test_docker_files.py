"""The deployment files, read as Docker and Compose read them: the Dockerfile's stages and build arguments,
.dockerignore, compose.yaml and .env.example, checked against the repository and the settings classes.

No Docker engine is needed (none runs where these tests run): this checks what can go wrong without building,
the mistakes that broke `docker build -t inpaint-bot .` before (an ARG used in a FROM but declared inside a stage,
the worker as the default target), and that .env.example names exactly the settings the code reads.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

from services.config import BotConfig
from services.worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"

SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (BotConfig, WorkerConfig)


# --- reading the Dockerfile -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # everything after the keyword, continuation lines joined
    line: int

    def words(self) -> list[str]:
        """The arguments as a list: the JSON (exec) form as written, otherwise split as a shell would."""
        if self.args.startswith("["):
            value = json.loads(self.args)
            assert isinstance(value, list) and all(isinstance(item, str) for item in value), self
            return value
        return shlex.split(self.args)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name!r} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            values.update(env_pairs(instruction))
        return values


def read_instructions(path: Path) -> list[Instruction]:
    """The instructions, as Docker's parser sees them: comment lines dropped (inside continuations too), lines ending
    in a backslash joined to the next."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def env_pairs(instruction: Instruction) -> dict[str, str]:
    """`ENV A=1 B="2 3"` or the legacy `ENV A 1`."""
    words = instruction.words()
    if "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def split_stages(instructions: list[Instruction]) -> tuple[list[Instruction], list[Stage]]:
    """The instructions before the first FROM (global ARGs) and the stages, in order."""
    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.words() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"line {instruction.line}: FROM image [AS name], got {instruction.args!r}"
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            preamble.append(instruction)
    return preamble, stages


def global_args(preamble: list[Instruction]) -> dict[str, str | None]:
    """ARG NAME[=default] lines before the first FROM: the build arguments a FROM may use."""
    args: dict[str, str | None] = {}
    for instruction in preamble:
        assert instruction.keyword == "ARG", f"line {instruction.line}: only ARG may come before the first FROM"
        for word in instruction.words():
            name, sep, default = word.partition("=")
            args[name] = default if sep else None
    return args


def substitute(text: str, args: dict[str, str | None]) -> str:
    """`${NAME}`, `${NAME:-default}` and `$NAME` replaced by the build argument's default."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = args.get(name)
        return default if default else (match.group(2) or "")

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", value, text)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str | None], list[Stage]]:
    preamble, stages = split_stages(read_instructions(DOCKERFILE))
    return global_args(preamble), stages


def stage_named(stages: list[Stage], name: str) -> Stage:
    matches = [stage for stage in stages if stage.name == name]
    assert len(matches) == 1, f"expected one stage named {name!r}, found {[s.name for s in stages]}"
    return matches[0]


def exec_form(instruction: Instruction) -> list[str]:
    assert instruction.args.startswith("["), f"line {instruction.line}: use the exec (JSON) form, {instruction.args}"
    return instruction.words()


# --- the Dockerfile ---------------------------------------------------------------------------------------------

def test_every_variable_in_a_from_line_is_a_build_arg_declared_before_the_first_from(
        dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    args, stages = dockerfile
    assert stages, "the Dockerfile has no FROM"
    for stage in stages:
        used = {a or b for a, b in re.findall(r"\$\{(\w+)[^}]*\}|\$(\w+)", stage.base)}
        undeclared = sorted(used - set(args))
        assert not undeclared, f"FROM {stage.base} uses {undeclared}, not declared by an ARG before the first FROM"
        for name in used:
            assert args[name], f"build arg {name} has no default: a plain `docker build` would fail"


def test_the_default_target_is_the_bot(dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    """`docker build -t inpaint-bot .` builds the last stage: it must be the bot."""
    _, stages = dockerfile
    bot = stages[-1]
    assert bot.name == "bot"
    assert exec_form(bot.last("CMD")) == ["python", "bot.py"]
    assert not bot.all("ENTRYPOINT")


def test_the_worker_stage_runs_the_worker_module(dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    _, stages = dockerfile
    worker = stage_named(stages, "worker")
    interpreter, *rest = exec_form(worker.last("CMD"))
    assert interpreter in ("python", "python3") and rest == ["-m", "services.worker"]
    assert not worker.all("ENTRYPOINT")
    env = worker.env()
    assert env["HOST"] == "0.0.0.0"  # reachable from other containers
    assert env["PORT"] in {w for i in worker.all("EXPOSE") for w in i.words()}
    assert "/health" in worker.last("HEALTHCHECK").args


def test_the_worker_base_image_carries_the_torch_the_worker_extra_pins(
        dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    """The image's CUDA torch must satisfy the pin, or pip would install a second torch over it."""
    args, stages = dockerfile
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    torch_pin = next(p for p in pins["worker"] if p.startswith("torch=="))
    version = torch_pin.removeprefix("torch==")
    base = substitute(stage_named(stages, "worker").base, args)
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(version)}-cuda\d+\.\d+-cudnn\d+-runtime", base), base


def test_the_bot_image_serves_the_painter_on_all_interfaces_and_exposes_its_port(
        dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    _, stages = dockerfile
    bot = stage_named(stages, "bot")
    env = bot.env()
    assert env["PAINTER_HOST"] == "0.0.0.0"
    port = env.get("PAINTER_PORT", str(BotConfig.model_fields["painter_port"].default))
    exposed = {w.split("/")[0] for i in bot.all("EXPOSE") for w in i.words()}
    assert port in exposed


def test_the_bot_keeps_its_database_on_the_data_volume(dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    _, stages = dockerfile
    bot = stage_named(stages, "bot")
    assert bot.env()["DATABASE_PATH"].startswith("/data/")
    assert "/data" in {w for i in bot.all("VOLUME") for w in i.words()}


def test_both_images_run_as_a_non_root_user(dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    _, stages = dockerfile
    for name in ("bot", "worker"):
        user = stage_named(stages, name).last("USER").args.split(":")[0]
        assert user not in ("root", "0"), name


# --- the build context: COPY sources and .dockerignore ----------------------------------------------------------

def ignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus `**`), anchored at the context's root."""
    pattern = os.path.normpath(pattern.lstrip("/"))
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Whether `path` (relative to the context) is left out: a pattern matching it or a folder above it excludes it,
    the last matching pattern wins, `!pattern` brings it back."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = pattern_regex(pattern[1:] if negate else pattern)
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negate
    return ignored


def test_the_ignore_matcher_reads_patterns_as_docker_does() -> None:
    patterns = [".venv", "**/__pycache__", "*.sqlite3", "data", "!data/keep"]
    assert is_ignored(".venv/bin/python", patterns)
    assert is_ignored("services/__pycache__/x.pyc", patterns) and is_ignored("__pycache__/x.pyc", patterns)
    assert is_ignored("bot.sqlite3", patterns) and not is_ignored("data2/bot.sqlite3", patterns)
    assert is_ignored("data/x", patterns) and not is_ignored("data/keep", patterns)
    assert not is_ignored("services/store/migrations/V1__init.sql", patterns)


@pytest.mark.parametrize("path", [".venv", ".git", ".env", "tests", "data", "bench", ".pytest_cache"])
def test_dockerignore_keeps_local_state_and_secrets_out_of_the_build_context(path: str) -> None:
    assert is_ignored(path, ignore_patterns())
    assert is_ignored(f"{path}/anything", ignore_patterns())


def test_every_copy_source_exists_and_reaches_the_build(dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    """A COPY source must be in the repository and not left out by .dockerignore, nor any file under it (bytecode
    caches excepted), or the build fails or the image misses files (the painter's page, the migrations)."""
    _, stages = dockerfile
    patterns = ignore_patterns()
    copied: set[str] = set()
    for stage in stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            words = instruction.words()
            if any(word.startswith("--from") for word in words):
                continue
            sources = [word for word in words if not word.startswith("--")][:-1]
            assert sources, f"line {instruction.line}: COPY with no source"
            copied.update(sources)
    assert {"pyproject.toml", "bot.py", "services", "cogs"} <= copied
    for source in sorted(copied):
        assert not any(ch in source for ch in "*?["), f"COPY {source}: name files, not patterns"
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        assert not is_ignored(source, patterns), f"COPY {source}: left out by .dockerignore"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in file.parts or file.suffix == ".pyc" or ".egg-info" in relative:
                continue
            assert not is_ignored(relative, patterns), f"{relative} is under COPY {source} but .dockerignore drops it"


# --- compose.yaml -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    services = compose["services"]
    assert name in services, f"compose.yaml has no service {name!r}: {sorted(services)}"
    value = services[name]
    assert isinstance(value, dict)
    return value


def environment(svc: dict[str, Any]) -> dict[str, str]:
    """`environment:` as a mapping (compose accepts a mapping or a list of NAME=value)."""
    env = svc.get("environment", {})
    if isinstance(env, list):
        return dict(str(item).split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def env_files(svc: dict[str, Any]) -> list[str]:
    files = svc.get("env_file", [])
    files = [files] if isinstance(files, str) else files
    return [f if isinstance(f, str) else f["path"] for f in files]


def build_target(svc: dict[str, Any]) -> str | None:
    build = svc.get("build")
    assert build is not None, "the service must be built from this repository's Dockerfile"
    if isinstance(build, str):
        return None
    assert build.get("context", ".") == "." and build.get("dockerfile", "Dockerfile") == "Dockerfile"
    target = build.get("target")
    return None if target is None else str(target)


def container_ports(svc: dict[str, Any]) -> set[str]:
    """The container side of each published port: "8765:8765", "127.0.0.1:8765:8765/tcp" or the long form."""
    ports: set[str] = set()
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            ports.add(str(entry["target"]))
        else:
            ports.add(str(entry).split("/")[0].rsplit(":", 1)[-1])
    return ports


def mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only), from the short ("src:dst:ro") or long volume syntax."""
    found: dict[str, tuple[str, bool]] = {}
    for entry in svc.get("volumes", []):
        if isinstance(entry, dict):
            found[entry["target"]] = (str(entry.get("source", "")), bool(entry.get("read_only", False)))
        else:
            source, target, *mode = str(entry).split(":")
            found[target] = (source, "ro" in ",".join(mode).split(","))
    return found


def setting_names(cls: type[BaseSettings]) -> set[str]:
    return {name.upper() for name in cls.model_fields}


def image_env(stages: list[Stage], target: str | None) -> dict[str, str]:
    return (stages[-1] if target is None else stage_named(stages, target)).env()


def test_compose_builds_the_bot_from_the_default_target_and_the_worker_from_its_stage(
        compose: dict[str, Any], dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    _, stages = dockerfile
    assert build_target(service(compose, "bot")) in (None, stages[-1].name)
    assert build_target(service(compose, "worker")) == "worker"


def test_the_bot_reaches_the_worker_by_its_service_name(
        compose: dict[str, Any], dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    _, stages = dockerfile
    bot, worker = service(compose, "bot"), service(compose, "worker")
    url = urlsplit(environment(bot)["WORKER_URL"])
    assert url.scheme == "http" and url.hostname == "worker"
    worker_env = {**image_env(stages, "worker"), **environment(worker)}
    assert worker_env["HOST"] == "0.0.0.0"
    assert str(url.port) == worker_env.get("PORT", str(WorkerConfig.model_fields["port"].default))
    depends = bot["depends_on"]
    assert isinstance(depends, dict) and depends["worker"]["condition"] == "service_healthy"


def test_the_bot_publishes_the_painter_port_and_keeps_its_database_on_a_volume(
        compose: dict[str, Any], dockerfile: tuple[dict[str, str | None], list[Stage]]) -> None:
    _, stages = dockerfile
    bot = service(compose, "bot")
    env = {**image_env(stages, build_target(bot)), **environment(bot)}
    assert env["PAINTER_HOST"] == "0.0.0.0"
    assert env["PAINTER_PORT"] in container_ports(bot)
    assert "PAINTER_PUBLIC_URL" in environment(bot)  # links must not point at http://0.0.0.0:8765
    assert env["DATABASE_PATH"].startswith("/data/") and "/data" in mounts(bot)


def test_the_worker_gets_a_gpu_the_models_read_only_and_a_health_check(compose: dict[str, Any]) -> None:
    worker = service(compose, "worker")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert mounts(worker)["/models"][1], "the models must be mounted read-only"
    env = environment(worker)
    for name in ("MODEL_PATH", "SAFETY_CHECKER_PATH"):
        assert env[name].startswith("/models/"), name
    test = worker["healthcheck"]["test"]
    assert "/health" in (" ".join(test) if isinstance(test, list) else test)


def test_both_services_share_the_env_file_and_set_only_real_settings(compose: dict[str, Any]) -> None:
    """WORKER_KEY reaches both through .env; an `environment:` name that no setting reads would do nothing."""
    for name, cls in (("bot", BotConfig), ("worker", WorkerConfig)):
        svc = service(compose, name)
        assert ".env" in env_files(svc), name
        unknown = set(environment(svc)) - setting_names(cls)
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of {cls.__name__}"


# --- .env.example -----------------------------------------------------------------------------------------------

EXAMPLE_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


def example_lines() -> list[tuple[str, str, bool]]:
    """(name, value, set): every `NAME=value` line, set, or shown commented out (`# NAME=value`)."""
    found = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = EXAMPLE_LINE.match(line.strip())
        if match:
            found.append((match.group(2), match.group(3), match.group(1) is None))
    return found


def write_env(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in pairs), encoding="utf-8")
    return path


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting comes from the test process's environment."""
    for cls in SETTINGS_CLASSES:
        assert not cls.model_config.get("env_prefix"), "the tests assume variables named after the fields"
        for name in setting_names(cls):
            monkeypatch.delenv(name, raising=False)


def test_env_example_names_exactly_the_settings_of_the_bot_and_the_worker() -> None:
    named = [name for name, _, _ in example_lines()]
    duplicates = sorted({name for name in named if named.count(name) > 1})
    assert not duplicates, f"named more than once: {duplicates}"
    settings = setting_names(BotConfig) | setting_names(WorkerConfig)
    assert not set(named) - settings, f"not settings: {sorted(set(named) - settings)}"
    assert not settings - set(named), f"missing from .env.example: {sorted(settings - set(named))}"


def test_env_example_says_where_env_is_read_from() -> None:
    header = ENV_EXAMPLE.read_text(encoding="utf-8").split("\n\n\n")[0].lower()
    assert "working directory" in header


@pytest.mark.usefixtures("clean_environment")
def test_env_example_copied_as_is_is_a_valid_configuration_that_picks_no_backend(tmp_path: Path) -> None:
    """`cp .env.example .env` starts the bot with only the token to fill in; no placeholder selects a backend."""
    env = write_env(tmp_path / ".env", [(name, value) for name, value, is_set in example_lines() if is_set])
    bot = BotConfig(_env_file=env)
    WorkerConfig(_env_file=env)
    assert bot.discord_token is not None
    assert bot.fal_key is None and bot.worker_url is None and bot.worker_key is None


@pytest.mark.usefixtures("clean_environment")
def test_every_value_shown_in_env_example_is_valid(tmp_path: Path) -> None:
    """Uncommenting any line gives a value the settings accept (the right type, within its bounds)."""
    env = write_env(tmp_path / ".env", [(name, value) for name, value, _ in example_lines()])
    BotConfig(_env_file=env)
    WorkerConfig(_env_file=env)


@pytest.mark.usefixtures("clean_environment")
def test_a_commented_out_setting_with_a_default_shows_that_default(tmp_path: Path) -> None:
    commented = [(name, value) for name, value, is_set in example_lines() if not is_set]
    env = write_env(tmp_path / ".env", commented)
    shown = {name for name, _ in commented}
    for cls in SETTINGS_CLASSES:
        loaded = cls(_env_file=env)
        for name, info in cls.model_fields.items():
            if name.upper() in shown and info.default is not None:
                assert getattr(loaded, name) == info.default, f"{name.upper()}: .env.example shows another default"
