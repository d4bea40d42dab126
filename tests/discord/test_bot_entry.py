"""`python bot.py` without a token explains what to set; settings never show secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.backend_select import choose_backend
from services.config import BotConfig

ROOT = Path(__file__).resolve().parents[2]


def test_missing_token_prints_setup_and_exits_nonzero(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "FAL_KEY", "WORKER_URL")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "bot.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "DISCORD_TOKEN is not set" in proc.stderr and "DISCORD_TOKEN=your-token-here" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_settings_from_env_file_hide_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("DISCORD_TOKEN=discord-secret-token\nFAL_KEY=abc:fal-secret-value\n")
    monkeypatch.chdir(tmp_path)
    for name in ("DISCORD_TOKEN", "FAL_KEY", "WORKER_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = BotConfig()
    assert settings.discord_token is not None
    assert settings.discord_token.get_secret_value() == "discord-secret-token"
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert "discord-secret-token" not in shown and "fal-secret-value" not in shown
    choice = choose_backend(settings)
    assert (choice.name, choice.base_url, choice.key) == ("fal", "https://queue.fal.run", settings.fal_key)


def test_worker_url_selects_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    settings = BotConfig(_env_file=None, worker_url="http://127.0.0.1:8000")
    choice = choose_backend(settings)
    assert (choice.name, choice.base_url) == ("worker", "http://127.0.0.1:8000")
    bare = choose_backend(BotConfig(_env_file=None))
    assert bare.name == "embedded" and not bare.safety_checker
