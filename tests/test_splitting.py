"""Tests for bot.splitting: size limit, code fences, losslessness, prefix stability, speed."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.splitting import MIN_LIMIT, split_message, split_stream

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FENCE_LINE = re.compile(r"[ \t]*(```|~~~)")

# ---------------------------------------------------------------------------------------------
# Checkers


def fences_balanced(chunk: str) -> bool:
    """Every block opened in the chunk is closed in it (same fence model as the splitter)."""
    open_char = ""
    for line in chunk.split("\n"):
        match = FENCE_LINE.match(line)
        if not match:
            continue
        char = match.group(1)[0]
        if not open_char:
            open_char = char
        elif char == open_char:
            open_char = ""
    return not open_char


def _bodies(chunk: str) -> list[tuple[int, str]]:
    """(offset, body): the chunk with and without each marker the splitter may add: a reopening
    fence line at the start, a closing fence (or the completion of a half-typed one) at the end."""
    heads = [0]
    head = re.match(r"(?:```|~~~)[^\n]*\n", chunk)
    if head:
        heads.append(head.end())
    tails = [0] + [len(t) for t in ("\n```", "\n~~~", "``", "`", "~~", "~") if chunk.endswith(t)]
    bodies = [(h, chunk[h : len(chunk) - t]) for h in heads for t in tails]
    return [(h, body) for h, body in bodies if body.strip()]


def assert_lossless(original: str, chunks: list[str]) -> list[tuple[int, int, int]]:
    """Walk the original: each chunk, less its synthetic fences, must occur next, after nothing but
    whitespace, and nothing but whitespace may remain at the end. Several readings of the markers
    can be possible, so all positions reachable so far are tracked. Returns, per chunk, (offset of
    its body in the chunk, position of the body in the original, its length) for one reading."""
    # Per chunk: end position in the original -> (start position, offset in chunk, previous end).
    steps: list[dict[int, tuple[int, int, int]]] = []
    reachable = [0]
    for index, chunk in enumerate(chunks):
        after: dict[int, tuple[int, int, int]] = {}
        for pos in reachable:
            stop = len(original) - len(original[pos:].lstrip())  # first non-blank from pos
            for offset, body in _bodies(chunk):
                for at in range(pos, stop + 1):
                    if original.startswith(body, at):
                        after.setdefault(at + len(body), (at, offset, pos))
        assert after, f"chunk {index} {chunk!r} is not the next part of the original"
        steps.append(after)
        reachable = list(after)
    ends = [pos for pos in reachable if not original[pos:].strip()]
    assert ends, "text after the last chunk was lost"
    placed: list[tuple[int, int, int]] = []
    pos = ends[0]
    for after in reversed(steps):
        end = pos
        at, offset, pos = after[end]
        placed.append((offset, at, end - at))
    return placed[::-1]


def kinds(text: str) -> str:
    """Per character: "f" on a fence line, "c" inside a code block, "p" in prose."""
    out = []
    open_char = ""
    for line in text.split("\n"):
        match = FENCE_LINE.match(line)
        kind = "c" if open_char else "p"
        if match and (not open_char or match.group(1)[0] == open_char):
            open_char = "" if open_char else match.group(1)[0]
            kind = "f"
        out.append(kind * (len(line) + 1))
    return "".join(out)[: len(text)]


def check_all(text: str, limit: int) -> list[str]:
    chunks = split_message(text, limit)
    for chunk in chunks:
        assert len(chunk) <= limit
        assert chunk.strip()
        assert not chunk[0].isspace() and not chunk[-1].isspace()
    assert (not chunks) == (not text.strip())
    assert_lossless(text, chunks)
    return chunks


# ---------------------------------------------------------------------------------------------
# Strategies: Markdown-ish answers, and a chaos mix of the characters that matter.

word = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz.,:()'", min_size=1, max_size=10),
    st.text(alphabet="xyz", min_size=20, max_size=300),  # longer than small limits
)
gap = st.sampled_from([" ", " ", " ", "  ", "\n", "\t"])
block_gap = st.sampled_from(["\n", "\n\n", "\n\n\n", "\n \n", "\r\n\r\n", "\n  \n\t"])


@st.composite
def prose(draw: st.DrawFn) -> str:
    words = draw(st.lists(word, min_size=1, max_size=40))
    return "".join(w + draw(gap) for w in words).rstrip(" \t\n") or "x"


@st.composite
def code_block(draw: st.DrawFn) -> str:
    fence = draw(st.sampled_from(["```", "```", "~~~", "````"]))
    language = draw(st.sampled_from(["", "python", "js", "c++", "python title"]))
    indent = " " * draw(st.integers(0, 3))
    lines = [indent + fence + language]
    for _ in range(draw(st.integers(0, 12))):
        lines.append(" " * draw(st.integers(0, 8)) + draw(prose()).replace("\n", " "))
        if draw(st.booleans()) and draw(st.booleans()):
            lines.append("")
    if draw(st.integers(0, 5)):  # sometimes the answer ends inside the block
        lines.append(indent + fence[:3] + draw(st.sampled_from(["", "", " "])))
    return "\n".join(lines)


@st.composite
def markdown(draw: st.DrawFn) -> str:
    blocks = draw(st.lists(st.one_of(prose(), code_block()), min_size=1, max_size=8))
    return "".join(b + draw(block_gap) for b in blocks)


chaos = st.lists(
    st.sampled_from(
        [
            "a",
            "bc",
            "word",
            " ",
            "  ",
            "\n",
            "\n\n",
            "\t",
            "\r\n",
            "    ",
            "`",
            "``",
            "```",
            "```py\n",
            "\n```\n",
            "~~~",
            "~",
            "x" * 30,
            "y" * 90,
            "\u2028",
            "\xa0",
            "\x1c",
            "é",
        ]
    ),
    max_size=80,
).map("".join)

limits = st.one_of(st.integers(MIN_LIMIT, 60), st.integers(61, 200), st.just(2000))


# ---------------------------------------------------------------------------------------------
# Properties


@FAST
@given(text=st.one_of(markdown(), chaos), limit=limits)
def test_fits_nonblank_and_lossless(text: str, limit: int) -> None:
    check_all(text, limit)


@FAST
@given(text=markdown(), limit=limits)
def test_fences_balanced_and_code_stays_code(text: str, limit: int) -> None:
    """Every chunk closes the blocks it opens, and each non-blank character shows in its chunk as
    what it was in the whole answer: code, prose or part of a fence line. So cut blocks are
    reopened, and nothing else is. (That second part from limit 40 up: below, the strategy's fence
    lines may not fit a message whole, and a fence line cut in two cannot stay one.)"""
    chunks = split_message(text, limit)
    for chunk in chunks:
        assert fences_balanced(chunk), chunk
    if limit < 40:
        return
    original = kinds(text)
    for chunk, (offset, at, length) in zip(chunks, assert_lossless(text, chunks), strict=True):
        shown = kinds(chunk)
        for i in range(length):
            if not text[at + i].isspace():
                assert shown[offset + i] == original[at + i], (chunk, i)


def assert_prefix_stable(text: str, limit: int, cuts: list[int]) -> None:
    full = split_message(text, limit)
    for cut in cuts:
        part = split_message(text[:cut], limit)
        sent = part[:-1]
        assert full[: len(sent)] == sent, (cut, text[:cut])
        finals, tail = split_stream(text[:cut], limit)
        assert finals == sent and tail == (part[-1] if part else "")


@FAST
@given(text=st.one_of(markdown(), chaos), limit=st.integers(MIN_LIMIT, 80), data=st.data())
def test_prefix_stable(text: str, limit: int, data: st.DataObject) -> None:
    """Chunks of a prefix, except the last, are chunks of the whole text: what a streaming bot has
    sent never needs an edit. Small limits give many chunks, so many chances to break it."""
    if len(text) <= 160:
        cuts = list(range(len(text) + 1))
    else:
        cuts = data.draw(st.lists(st.integers(0, len(text)), min_size=1, max_size=40))
    assert_prefix_stable(text, limit, cuts)


@settings(max_examples=30, deadline=None)
@given(text=markdown())
def test_prefix_stable_at_discord_limit(text: str) -> None:
    text = text * (1 + 4000 // max(len(text), 1))  # several messages at 2000
    cuts = list(range(0, len(text), 97)) + list(range(1900, min(len(text), 2200)))
    assert_prefix_stable(text, 2000, cuts)


# ---------------------------------------------------------------------------------------------
# Examples a user would recognise


def sentence(i: int) -> str:
    return f"This is sentence number {i} of the explanation, which goes on a bit."


def test_short_answer_is_one_message() -> None:
    assert split_message("Hello!") == ["Hello!"]
    assert split_message("  \n Hello,\n  world.  \n\n") == ["Hello,\n  world."]


def test_blank_text_gives_no_messages() -> None:
    assert split_message("") == []
    assert split_message(" \n\n\t ") == []
    assert split_stream("  ") == ([], "")


def test_exactly_at_the_limit() -> None:
    assert split_message("a" * 2000) == ["a" * 2000]
    assert split_message("a" * 2001) == ["a" * 2000, "a"]


def test_code_block_across_the_limit_is_closed_and_reopened() -> None:
    intro = " ".join(sentence(i) for i in range(5)) + "\nHere is the code:\n```python\n"
    code = "".join(f"def f{i}(x):\n    return x * {i} + 12345\n" for i in range(80))
    outro = "```\n\n" + " ".join(sentence(i) for i in range(20))
    text = intro + code + outro
    assert 4500 < len(text) < 5500
    chunks = check_all(text, 2000)
    assert len(chunks) == 3
    assert chunks[0].startswith("This is sentence number 0")
    assert chunks[0].endswith("\n```") and chunks[0].count("```") == 2
    assert chunks[1].startswith("```python\n")
    assert chunks[1].endswith("\n```")  # the original closing fence, not a synthetic one
    assert chunks[2].startswith("This is sentence number 0")
    assert all(len(c) <= 2000 for c in chunks)


def test_indentation_of_code_is_kept_at_a_cut() -> None:
    code = "```py\n" + "".join(f"    line_{i} = {i}\n" for i in range(400)) + "```"
    chunks = check_all(code, 2000)
    assert len(chunks) > 1
    for chunk in chunks[1:]:
        assert chunk.startswith("```py\n    line_")


def test_paragraphs_are_preferred_over_lines_and_words() -> None:
    first = "\n".join(sentence(i) for i in range(12))  # about 850 characters, line breaks only
    second = " ".join(sentence(i) for i in range(20))  # about 1400 characters
    text = first + "\n\n" + second
    assert split_message(text) == [first, second]


def test_lines_then_words() -> None:
    assert split_message("aaaa bbbb\ncccc dddd eeee", 20) == ["aaaa bbbb", "cccc dddd eeee"]
    assert split_message("aaaa bbbb cccc dddd eeee", 20) == ["aaaa bbbb cccc dddd", "eeee"]


def test_a_huge_word_is_hard_cut() -> None:
    assert split_message("z" * 4500) == ["z" * 2000, "z" * 2000, "z" * 500]
    assert split_message("see " + "z" * 2500 + " ok") == ["see", "z" * 2000, "z" * 500 + " ok"]


def test_half_typed_closing_fence_is_completed_not_doubled() -> None:
    assert split_message("```py\nx = 1\n``") == ["```py\nx = 1\n```"]
    assert split_message("```py\nx = 1\n`") == ["```py\nx = 1\n```"]
    assert split_message("```py\nx = 1\n```") == ["```py\nx = 1\n```"]
    assert split_message("```py\nx = 1") == ["```py\nx = 1\n```"]


def test_tilde_fences_and_long_info_strings() -> None:
    text = "~~~text\n" + "word " * 1000 + "\n~~~"
    chunks = check_all(text, 2000)
    assert all(fences_balanced(c) for c in chunks)
    assert chunks[1].startswith("~~~text\n")
    long_info = "```" + "q" * 300 + "\n" + "code\n" * 800 + "```"
    chunks = check_all(long_info, 2000)
    assert chunks[1].startswith("```\ncode")  # too long to repeat: reopened bare
    assert all(fences_balanced(c) for c in chunks)


def test_fence_line_longer_than_the_limit_terminates() -> None:
    text = "```" + "p" * 5000 + "\nprint(1)\n```\nafter"
    chunks = check_all(text, 100)
    assert all(fences_balanced(c) for c in chunks)
    assert chunks[-1].endswith("print(1)\n```\nafter")


def test_stream_finals_never_change() -> None:
    text = " ".join(sentence(i) for i in range(100)) + "\n```python\n" + "x = 1\n" * 500 + "```\nbye"
    sent: list[str] = []
    for end in range(0, len(text) + 1, 37):
        finals, tail = split_stream(text[:end])
        assert finals[: len(sent)] == sent
        sent = finals
        assert len(tail) <= 2000
    assert [*sent, split_stream(text)[1]] == split_message(text)


def test_no_message_is_an_empty_code_block() -> None:
    """Wherever the limit falls around a block, the closing fence goes along with the code and
    the opening fence with some code: no message is just "```py\n```"."""
    empty = re.compile(r"(```|~~~)[^\n]*\n[ \t]*(```|~~~)[^\n]*")
    for limit in (16, 24, 40, 80):
        for size in range(1, 100):
            intro = " ".join(["word"] * (size // 5)) + "a" * (size % 5)
            for before_close in ("\n", "\n\n"):
                text = intro + "\n```py\n" + "x = 1\n" * 3 + "y = 2" + before_close + "```\nafter words here"
                for chunk in check_all(text, limit):
                    assert not empty.fullmatch(chunk), (limit, text)


def test_inline_fences_do_not_start_a_message() -> None:
    """A word cut just before a mid-line ``` would make it open a block in the next message."""
    assert split_message("one two three ```not a fence``` four five", 20) == [
        "one two three ```not",
        "a fence``` four five",
    ]


def test_limit_too_small_is_rejected() -> None:
    with pytest.raises(ValueError):
        split_message("hello", MIN_LIMIT - 1)


def test_100_kb_answer_is_split_losslessly() -> None:
    rng = random.Random(0)
    parts = []
    while sum(map(len, parts)) < 100_000:
        if rng.random() < 0.2:
            code = "".join(f"    x{rng.randint(0, 99)} = {i}\n" for i in range(40))
            parts.append("```python\n" + code + "```")
        else:
            parts.append(" ".join(sentence(rng.randint(0, 99)) for _ in range(rng.randint(1, 30))))
    text = "\n\n".join(parts)
    assert len(text) >= 100_000
    chunks = split_message(text)
    assert_lossless(text, chunks)
    assert all(len(chunk) <= 2000 for chunk in chunks)


def test_a_closing_fence_line_is_never_cut_in_two() -> None:
    # Found by hypothesis: the closer "```python title" did not fit, and the cut fell at its space.
    text = ":\n:\n:\n```python title\n: : : : : : : : : " + "x" * 30 + "\n```python title\n:\n"
    chunks = split_message(text, 61)
    assert_lossless(text, chunks)
    assert all(chunk.count("```") % 2 == 0 for chunk in chunks)
    assert not any(chunk.endswith("```python") for chunk in chunks)
