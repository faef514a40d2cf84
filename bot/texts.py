"""Sentences people see from the bot (besides the model's answers), in one place.

Each is a plain sentence; the bot shows notices with the notice prefix (``⚠️ ``). Those
that carry details (a file's name, a limit) are functions.
"""

from __future__ import annotations

from collections.abc import Sequence

# --- asking ---------------------------------------------------------------------------------
NO_QUESTION = "Mention me with a question, and attach the image(s) it is about."
NOT_ALLOWED = "You can't use me here."
NO_IMAGE = "I found no image in that message (attachments, embedded images, stickers or PDFs)."

# --- the bot's state ------------------------------------------------------------------------
def starting_up_status(progress: str) -> str:
    """The bot's status while the model starts ("loading the model", "warming up: 3 of 24...")."""
    return f"Starting up: {progress}…"[:128]  # Discord's longest custom status


STARTING_UP_STATUS = starting_up_status("loading the model")
CUT_OFF = "The bot is restarting, so this answer was cut off. Please ask again in a minute."
DISCORD_FAILED = "Discord kept failing while I was answering this, so I had to stop. Please ask again."

# --- Ask about this… ------------------------------------------------------------------------
MODAL_TITLE = "Ask about this message"
QUESTION_LABEL = "Your question"
QUESTION_PLACEHOLDER = "What do you want to know about the image(s)?"

# --- prefixes: a notice (errors, hints) and a status (place in line) ---------------------------
# Bot messages that start with these are not answers. Which of the bot's messages are answers
# is known by their ids (bot/questions.py); the prefixes only sort messages written before the
# bot's current run.
NOTICE_PREFIX = "⚠️"
WAITING_PREFIX = "⏳"


def notice(text: str) -> str:
    return f"{NOTICE_PREFIX} {text}"


# --- answering -------------------------------------------------------------------------------
EMPTY_ANSWER = f"{NOTICE_PREFIX} The model gave an empty answer. Try asking another way."
STARTING_UP = (
    f"{WAITING_PREFIX} Just a moment: I'm starting up (loading and warming up the model). "
    "I'll answer as soon as I'm ready."
)
MODEL_STOPPED = "The model stopped working, so I'm restarting. Please ask again in a minute."
TOO_LONG = (
    "This answer reached the length limit, so it stops here. Ask me to go on, or ask a narrower question."
)
ONLY_REQUESTER = f"{NOTICE_PREFIX} Only the person who asked (or a moderator) can cancel this answer."
QUESTION_DELETED = "Your question was deleted, so I stopped answering it."


def waiting_status(place: int) -> str:
    ahead = "1 question is" if place == 1 else f"{place} questions are"
    return f"{WAITING_PREFIX} Waiting in line: {ahead} ahead of yours."


def out_of_gpu_memory(error_id: str) -> str:
    return (
        f"The GPU ran out of memory on this question (error id `{error_id}`). "
        "Try fewer or smaller images, or ask again when the bot is less busy."
    )


def went_wrong(error_id: str) -> str:
    return f"Something went wrong on my side (error id `{error_id}`)."


def cancelled_by(mention: str) -> str:
    return f"Cancelled by {mention}."


def too_slow(seconds: float) -> str:
    return f"I stopped this answer: it took longer than {seconds:g} seconds."


def could_not_answer(reason: object) -> str:
    return f"Sorry, I could not answer: {reason}"


def end_missing(characters: int) -> str:
    return (
        f"{NOTICE_PREFIX} Discord kept failing, so the end of this answer could not be shown "
        f"(about {characters} characters are missing). Please ask again."
    )


def ack_failed(mention: str, command: str) -> str:
    return f"{NOTICE_PREFIX} Discord did not take {mention}'s /{command} in time, so I'm answering here."


# --- fair use (bot/limits.py) ------------------------------------------------------------------


def already_waiting(pending: int) -> str:
    waiting = "a question" if pending == 1 else f"{pending} questions"
    return f"You already have {waiting} waiting. Please wait for an answer before asking more."


def slow_down(seconds: int) -> str:
    return f"Slow down a little: you can ask again in {seconds} s."


def busy(in_line: int) -> str:
    return f"I'm busy right now ({in_line} questions in line). Please try again in a minute."


# --- images and PDFs (bot/images.py, bot/pdf.py, bot/sources.py) -------------------------------
KINDS = "PNG, JPEG, WebP, GIF or BMP"


def not_an_image(name: str) -> str:
    return f"`{name}` is not an image ({KINDS})."


def skipped_not_an_image(name: str) -> str:
    return f"Skipped `{name}`: not an image."


def too_many_images(max_images: int, left_out: Sequence[str], *, earlier: bool = False) -> str:
    names = ", ".join(f"`{name}`" for name in left_out)
    if earlier:
        return (
            f"I look at {max_images} images at a time, "
            f"so this answer leaves out {names} from earlier in this thread."
        )
    return f"I look at {max_images} images at a time, so I left out {names}."


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")


def _bytes_text(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{_number(size / (1024 * 1024))} MB"
    return f"{_number(size / 1024)} KB"


def too_many_bytes(name: str, max_bytes: int, size: int | None = None, kind: str = "image") -> str:
    actual = f" ({_bytes_text(size)})" if size is not None else ""
    per = "PDF" if kind == "pdf" else "image"
    return f"`{name}` is too large{actual}: the limit is {_bytes_text(max_bytes)} per {per}."


def too_many_pixels(name: str, max_pixels: int, pixels: int | None = None) -> str:
    actual = f" ({_number(pixels / 1_000_000)} megapixels)" if pixels is not None else ""
    return f"`{name}` has too many pixels{actual}: the limit is {_number(max_pixels / 1_000_000)} megapixels."


def unreadable_image(name: str) -> str:
    return f"I could not read `{name}` as an image."


def not_on_discord(name: str) -> str:
    return f"I only download files from Discord's own servers, so I skipped `{name}`."


def download_failed(name: str, status: int | None = None) -> str:
    if status is None:
        return f"I could not download `{name}`. Try sending it again."
    return f"I could not download `{name}` (HTTP {status}). Try sending it again."


def download_too_slow(name: str, seconds: float) -> str:
    return f"Downloading `{name}` took too long (over {seconds:g} s). Try again in a moment."


def _megapixels(pixels: float) -> str:
    value = pixels / 1_000_000
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")


def encrypted_pdf(name: str) -> str:
    return f"`{name}` is a password-protected PDF, which I can't open. Send it without the password."


def unreadable_pdf(name: str) -> str:
    return f"I could not read `{name}` as a PDF."


def pages_left_out(name: str, read: int, total: int) -> str:
    return f"`{name}` has {total} pages; I read the first {read}."


def page_too_large(name: str, page: int, pixels: float, max_pixels: int) -> str:
    return (
        f"Page {page} of `{name}` is too large ({_megapixels(pixels)} megapixels at 72 dpi): "
        f"the limit is {_megapixels(max_pixels)} megapixels."
    )


def no_pages(name: str) -> str:
    return f"`{name}` has no pages."


def foreign_embed(host: str) -> str:
    where = f" from `{host}`" if host else ""
    return f"Skipped an embedded image{where}: I only download images from Discord's own servers."


def lottie_sticker(name: str) -> str:
    return f"Skipped the sticker `{name}`: it is an animated Lottie sticker, which I can't read as an image."
