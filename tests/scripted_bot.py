"""`python -m tests.scripted_bot`: the real bot (`python -m bot`'s main) over the real
engine, with scripted replies for end-to-end tests.

The engine is the real ``LocalEngine`` on the model in MODEL_ID, handed
``tests.scripted.ScriptedReplies`` as its steering, with the rules of the JSON file named
by SEEBOT_TEST_SCRIPT (tests/bot_process.py writes tests/conftest.py's SCRIPT there). A
model directory made by ``tests.tiny_model.copy_with_load_gate`` holds loading until the
test writes to its gate (a named pipe), as a big model keeps a bot starting for minutes.
ENGINE=openai runs the bot's own engine, unscripted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bot.__main__ import main
from inference import Engine, InferenceSettings, create_engine
from inference.loading import LoadedModel, load_model
from tests.scripted import ScriptedReplies

SCRIPT_ENV = "SEEBOT_TEST_SCRIPT"


def _load_after_the_gate(settings: InferenceSettings) -> LoadedModel:
    from tests.tiny_model import wait_for_load_gate

    wait_for_load_gate(Path(settings.model_id))
    return load_model(settings)


def scripted_engine(settings: InferenceSettings) -> Engine:
    if settings.engine != "local":
        return create_engine(settings)
    from inference.local_engine import LocalEngine

    path = os.environ.get(SCRIPT_ENV)
    script = json.loads(Path(path).read_text()) if path else []
    steering = ScriptedReplies(script, settings.model_id)
    return LocalEngine(settings, loader=_load_after_the_gate, steering=steering)


if __name__ == "__main__":
    sys.exit(main(scripted_engine))
