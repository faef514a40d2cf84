"""`python -m inference`: ask the model about local image files from a terminal.

The cookbook's notebook as a tool (analyse an image, read its text, compare two images),
on the same engine the bot uses; the answer streams to stdout as it is generated.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .conversation import Conversation
from .engine import EngineError, GenerationRequest
from .settings import InferenceSettings, SettingsError, check_device

log = logging.getLogger("inference")


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit code 1 or 2."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m inference",
        description="Answer a question about zero or more images with a Phi-3-vision model.",
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files, in order")
    parser.add_argument("-q", "--question", help="what to ask about the images")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer, in tokens")
    parser.add_argument("--model", help="hub id or local directory (default: MODEL_ID)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: DEVICE)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return parser.parse_args(argv)


def read_images(paths: Sequence[str]) -> list[Image.Image]:
    """Open every image before the (slow) model load, so a typo fails in a second."""
    images = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise CliError(f"image not found: {name}")
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise CliError(f"cannot read image {name}: {error}") from error
    return images


def build_settings(args: argparse.Namespace) -> InferenceSettings:
    settings = InferenceSettings.from_env()
    if args.model:
        settings = replace(settings, model_id=args.model)
    if args.device:
        settings = replace(settings, device=check_device(args.device))
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise CliError("--max-new-tokens must be at least 1", exit_code=2)
        settings = replace(settings, max_new_tokens=args.max_new_tokens)
    return settings


async def answer(settings: InferenceSettings, question: str, images: list[Image.Image]) -> None:
    from . import create_engine

    engine = create_engine(settings)
    try:
        await engine.start()
    except EngineError as error:  # a model that cannot be loaded, or (ENGINE=openai) no server
        raise CliError(str(error)) from error
    try:
        request = GenerationRequest(Conversation.single(question, images))
        async for piece in engine.stream(request):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except EngineError as error:
        raise CliError(str(error)) from error
    finally:
        await engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True))
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        question = (args.question or "").strip()
        if not question:
            raise CliError("no question: pass --question TEXT", exit_code=2)
        settings = build_settings(args)
        images = read_images(args.images)
        asyncio.run(answer(settings, question, images))
    except SettingsError as error:
        print_error(str(error))
        return 2
    except CliError as error:
        print_error(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


def print_error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
