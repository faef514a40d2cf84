"""Streamed answer text: the pieces joined are exactly the answer, and they come as it grows."""

from __future__ import annotations

import copy

from hypothesis import example, given, settings
from hypothesis import strategies as st

from inference.pieces import TextPieces
from tests.tiny_model.builder import build_tokenizer

TOKENIZER = build_tokenizer()  # byte-level: a character of several bytes spans several tokens


def stream(tokenizer, ids: list[int]) -> list[str]:
    pieces: list[str] = []
    streamer = TextPieces(tokenizer, pieces.append)
    for token in ids:
        streamer.put(token)
    streamer.end()
    return pieces


def ids_of(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
@example("a trailing \ufffd")  # held back as a maybe-unfinished character until the end
def test_joined_pieces_are_the_whole_answer(text: str) -> None:
    ids = ids_of(text)
    assert "".join(stream(TOKENIZER, ids)) == TOKENIZER.decode(ids, skip_special_tokens=True)


def test_special_tokens_never_reach_the_user() -> None:
    end = TOKENIZER.convert_tokens_to_ids("<|end|>")
    ids = [*ids_of("The chart"), end, *ids_of(" shows sales.")]
    assert "".join(stream(TOKENIZER, ids)) == "The chart shows sales."


def test_text_arrives_as_it_is_generated_and_characters_are_never_cut() -> None:
    pieces: list[str] = []
    streamer = TextPieces(TOKENIZER, pieces.append)
    for token in ids_of("Die Grafik zeigt Umsätze 😀"):
        streamer.put(token)
        assert "\ufffd" not in "".join(pieces)  # half an emoji is held back, never shown
    assert "".join(pieces) == "Die Grafik zeigt Umsätze 😀"
    assert len(pieces) > 3


class SlowTokenizer:
    """A tokenizer without a fast backend (as a Python-only sentencepiece one)."""

    def decode(self, ids, **options) -> str:
        return TOKENIZER.decode(ids, **options)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
@example("a trailing \ufffd")
def test_tokenizers_without_a_fast_backend_stream_the_same_text(text: str) -> None:
    ids = ids_of(text)
    assert "".join(stream(SlowTokenizer(), ids)) == TOKENIZER.decode(ids, skip_special_tokens=True)


def test_spaces_are_never_cleaned_up_so_sent_text_never_changes() -> None:
    cleaning = copy.deepcopy(TOKENIZER)
    cleaning.clean_up_tokenization_spaces = True  # its decode would turn "a ," into "a,"
    assert "".join(stream(cleaning, ids_of("a , b ! c"))) == "a , b ! c"
