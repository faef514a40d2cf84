"""The container files agree with the code: the volumes are the folders the bot writes by
default, the health check asks the endpoint the bot serves. (CI cannot run Docker.)"""

from __future__ import annotations

import re
from pathlib import Path

from bot.settings import DEFAULT_DATA_DIR

ROOT = Path(__file__).resolve().parent.parent
HOME = "/home/seebot"


def test_the_volumes_are_the_bots_default_folders_under_the_containers_home() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    compose = (ROOT / "compose.yaml").read_text()
    [volumes] = re.findall(r"^VOLUME (\[.*\])$", dockerfile, re.MULTILINE)
    data_dir = f"{HOME}/{DEFAULT_DATA_DIR.relative_to(Path.home())}"
    expected = {f"{HOME}/.cache/huggingface", f"{HOME}/.cache/seebot/torch-compile", data_dir}
    assert set(re.findall(r'"([^"]+)"', volumes)) == expected
    assert set(re.findall(r"^\s+- [\w-]+:(\S+)$", compose, re.MULTILINE)) == expected
    assert f"HF_HOME={HOME}/.cache/huggingface" in dockerfile
    assert "USER seebot" in dockerfile


def test_the_health_check_asks_the_port_compose_sets_and_the_bot_serves() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    compose = (ROOT / "compose.yaml").read_text()
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert 'METRICS_PORT: "9100"' in compose and "METRICS_HOST: 0.0.0.0" in compose
    assert '"127.0.0.1:9100:9100"' in compose
    assert "capabilities: [gpu]" in compose and "env_file: .env" in compose
