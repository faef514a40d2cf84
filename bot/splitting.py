"""Split a (streamed) Markdown answer into Discord messages of at most `limit` characters.

Why the rules are what they are:

* Greedy, best boundary last: each message is filled as far as the window allows, cutting at the
  last blank line in it, else the last line break, else the last space; a "word" longer than a
  whole message is hard-cut.
* Code fences survive: a line whose first non-blank characters (after spaces/tabs) are three
  backticks or tildes opens a block, and the next such line of the same character closes it (Discord
  closes on any ```, so no CommonMark length/info-string rules). A block cut in two gets "\\n```"
  appended and the next message starts with the opening fence again ("```python\\n"), so it keeps
  its highlighting. Room for both is reserved, so every message still fits.
* Lossless: strip those synthetic fences and each message is an exact slice of the text, in order,
  with only whitespace between slices.
* Prefix-stable: for any text t and extension t + s, all messages of split_message(t) but the last
  are messages of split_message(t + s). A streaming bot can therefore send a message for good as
  soon as another one follows it, and only ever edit the last one (see `split_stream`).

Whitespace at a cut: the whole whitespace run at the cut belongs to no message. Exception: when
the cut is inside a code block and the run ends with a line's indentation (spaces after its last
newline, fewer than limit // 4 of them), that indentation is kept, so the next message's first code
line stays indented. Leading whitespace of the text and trailing whitespace of the text are dropped
(Discord trims them anyway). Whitespace inside a message is never touched.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterator

__all__ = ["DISCORD_LIMIT", "MIN_LIMIT", "split_message", "split_stream"]

DISCORD_LIMIT = 2000
# Below this there is no room for a reopened fence, a closing fence and some text.
MIN_LIMIT = 16

_FENCE_TOKEN = re.compile(r"^[ \t]*(?:```|~~~)", re.MULTILINE)
_WS_RUN = re.compile(r"\s+")
_FENCE_CHARS = "`~"
_CLOSE_LEN = 4  # "\n```" or "\n~~~"

_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
# Verdicts on a cut (see _Splitter.judge).
_NO, _POOR, _AWKWARD, _GOOD = 0, 1, 2, 3


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Split `text` into non-empty messages of at most `limit` characters (rules: module docstring).

    Raises ValueError if `limit` < MIN_LIMIT.
    """
    return _Splitter(text, limit).split()


def split_stream(text: str, limit: int = DISCORD_LIMIT) -> tuple[list[str], str]:
    """Split a text that is still growing: (final messages, live tail).

    The final messages will not change however the text continues, so they can be sent once and
    forgotten; the tail ("" for blank text) is the message to keep editing. It may later shrink
    (when it has to be split) and its fence may close differently, so never treat it as final
    until the stream ends, at which point it is simply the last message.
    """
    chunks = split_message(text, limit)
    if not chunks:
        return [], ""
    return chunks[:-1], chunks[-1]


class _Splitter:
    """One split of one text: fence positions are found once, then messages are cut left to right.

    Every decision for a message looks only at the text up to a little past where the message ends
    (never at how long the rest is, except to ask "does all of it fit?", which only ever turns from
    yes to no as the text grows); that is what makes the split prefix-stable.
    """

    def __init__(self, text: str, limit: int) -> None:
        if limit < MIN_LIMIT:
            raise ValueError(f"limit must be at least {MIN_LIMIT}, got {limit}")
        self.text = text
        self.limit = limit
        # A long info string would eat every reopened message; then reopen with the bare fence.
        self.max_header = min(limit // 4, 100)
        self.max_indent = limit // 4 - 1
        # Fence lines that open or close a block: position of their first fence character, and the
        # index (into these lists) of the block's opening fence after that line, or -1 if none is open.
        self.fence_pos: list[int] = []
        self.open_after: list[int] = []
        open_index = -1
        for match in _FENCE_TOKEN.finditer(text):
            pos = match.end() - 3
            if open_index < 0:
                open_index = len(self.fence_pos)
            elif text[self.fence_pos[open_index]] == text[pos]:
                open_index = -1
            else:
                continue  # ~~~ inside a ``` block (or vice versa) is just code
            self.fence_pos.append(pos)
            self.open_after.append(open_index)
        self.fence_set = set(self.fence_pos)

    def open_at(self, pos: int) -> int:
        """Index of the opening fence of the block open just before `pos` (a fence line counts as
        soon as its first fence character is behind), or -1 outside any block."""
        i = bisect_left(self.fence_pos, pos) - 1
        return self.open_after[i] if i >= 0 else -1

    def inside_fence(self, pos: int) -> bool:
        """True if `pos` falls strictly within a fence's three characters (never cut there)."""
        i = bisect_left(self.fence_pos, pos) - 1
        return i >= 0 and pos < self.fence_pos[i] + 3

    def fence_char(self, opener: int) -> str:
        return self.text[self.fence_pos[opener]]

    def reopen(self, opener: int, start: int) -> str:
        """Fence line that reopens block `opener` in a message starting at `start`.

        Keeps the language only if the opening line ended before `start` (so later text cannot
        change it) and is short; otherwise the bare fence.
        """
        text = self.text
        pos = self.fence_pos[opener]
        char = text[pos]
        bare = char * 3
        newline = text.find("\n", pos, start)
        if newline < 0:
            return bare + "\n"
        info = text[pos:newline].lstrip(char).strip()
        header = bare + info
        if char in info or len(header) > self.max_header:
            return bare + "\n"
        return header + "\n"

    def final_close(self, start: int, end: int) -> str:
        """What the last message (text[start:end]) needs appended to close an open block.

        If the text ends in a half-typed closing fence ("``" while streaming), complete it instead
        of adding a new line: the message then already equals what the full fence will give.
        """
        opener = self.open_at(end)
        if opener < 0:
            return ""
        char = self.fence_char(opener)
        if end == len(self.text):
            line_start = max(self.text.rfind("\n", 0, end) + 1, start)
            partial = self.text[line_start:end].lstrip(" \t")
            if 0 < len(partial) < 3 and partial == char * len(partial):
                return char * (3 - len(partial))
        return "\n" + char * 3

    def split(self) -> list[str]:
        text = self.text
        end = len(text.rstrip())
        if end == 0:
            return []
        start = len(text) - len(text.lstrip())
        chunks: list[str] = []
        while True:
            opener = self.open_at(start)
            prefix = self.reopen(opener, start) if opener >= 0 else ""
            room = self.limit - len(prefix)
            close = self.final_close(start, end)
            if end - start + len(close) <= room:
                chunks.append(prefix + text[start:end] + close)
                return chunks
            cut, resume = self.find_cut(start, end, room)
            opener = self.open_at(cut)
            close = "\n" + self.fence_char(opener) * 3 if opener >= 0 else ""
            chunks.append(prefix + text[start:cut] + close)
            start = resume

    def find_cut(self, start: int, end: int, room: int) -> tuple[int, int]:
        """Where the message text[start:...] ends and where the next one starts.

        `room` is what the message may hold besides its reopening fence; a cut inside a block also
        pays for the closing fence. The cut is the first _GOOD one of `candidates`, else the latest
        _AWKWARD one, else a hard cut, else the latest _POOR one (see `judge`).
        """
        text = self.text
        last = min(start + room, end - 1)  # no message can end later than this
        first_text = _run_end(text, start)  # a message must hold some non-blank text
        fallback = {_POOR: (-1, -1), _AWKWARD: (-1, -1)}  # latest such (cut, resume)
        for cut, resume in self.candidates(first_text, last):
            verdict = self.judge(start, room, last, cut, resume)
            if verdict == _GOOD:
                return self.resume_at(cut, resume)
            if verdict != _NO and cut > fallback[verdict][0]:
                fallback[verdict] = (cut, resume)
        if fallback[_AWKWARD][0] >= 0:
            return self.resume_at(*fallback[_AWKWARD])
        cut, poor_cut = self.hard_cut(start, first_text, last, room)
        if cut < 0 and fallback[_POOR][0] >= 0:
            return self.resume_at(*fallback[_POOR])
        if cut < 0:
            cut = max(poor_cut, first_text + 1)  # first_text + 1: unreachable for limit >= MIN_LIMIT
        return cut, cut

    def candidates(self, first_text: int, last: int) -> Iterator[tuple[int, int]]:
        """Whitespace runs (start, end) that start in (first_text, last]: those with a blank line,
        then those with one line break, then the others, each kind latest first. Searching
        backwards from the window's end, best kind first, means a typical message looks at only a
        few of them."""
        text = self.text
        scan_end = _run_end(text, last + 1)  # see a run that starts by `last` whole
        previous = -1
        for blank in reversed([m.start() for m in _BLANK_LINE.finditer(text, first_text, scan_end)]):
            cut = self.run_start(first_text, blank)
            if cut != previous:  # one run can hold several blank lines
                previous = cut
                yield cut, _run_end(text, cut)
        newline = text.rfind("\n", first_text, scan_end)
        while newline >= 0:
            cut = self.run_start(first_text, newline)
            resume = _run_end(text, newline)
            if text.count("\n", cut, resume) == 1:  # more is a blank line, given above
                yield cut, resume
            newline = text.rfind("\n", first_text, cut)
        cut = self.last_run_start(first_text, last)
        while cut > first_text:
            resume = _run_end(text, cut)
            if text.find("\n", cut, resume) < 0:  # line breaks were given above
                yield cut, resume
            cut = self.last_run_start(first_text, cut - 1)

    def judge(self, start: int, room: int, last: int, cut: int, resume: int) -> int:
        """Whether the message may end at `cut` (whitespace run up to `resume`): _NO if it does not
        fit, _AWKWARD if it leaves something ugly (taken only if nothing _GOOD fits), _POOR if the
        message would end in an empty block (taken only if not even a hard cut is possible)."""
        if cut > last:
            return _NO
        opener = self.open_at(cut)
        if cut - start + (_CLOSE_LEN if opener >= 0 else 0) > room:
            return _NO
        text = self.text
        if opener >= 0 and self.on_last_line(self.fence_pos[opener], start, cut):
            # Just after the opening fence line: this message would end in an empty block.
            return _POOR
        if text.find("\n", cut, resume) < 0:  # a space within a line
            if text[resume] in _FENCE_CHARS:
                # The next message would start a line with it; ``` there would open a block.
                return _AWKWARD
            fence = bisect_left(self.fence_pos, cut) - 1
            if fence >= 0 and self.on_last_line(self.fence_pos[fence], start, cut):
                # Within a fence line: its rest would turn into code or prose. Never; a fence
                # line longer than a whole message is hard-cut instead.
                return _NO
        if opener >= 0 and resume in self.fence_set and resume + 3 - start <= room:
            # Just before the closing fence, while the fence itself still fits: take it along
            # rather than leave the next message an empty block.
            return _AWKWARD
        return _GOOD

    def on_last_line(self, pos: int, start: int, cut: int) -> bool:
        """True if `pos` is on the last line of the message text[start:cut]."""
        return start <= pos < cut and self.text.find("\n", pos, cut) < 0

    def resume_at(self, cut: int, resume: int) -> tuple[int, int]:
        """(cut, where the next message starts): after the whitespace run, except that inside a
        code block the indentation of the next line is kept when it is not too long."""
        line_start = self.text.rfind("\n", cut, resume) + 1
        if line_start and resume - line_start <= self.max_indent and self.open_at(cut) >= 0:
            return cut, line_start
        return cut, resume

    def run_start(self, floor: int, pos: int) -> int:
        """Start of the whitespace run holding `pos` (text[floor] is not blank)."""
        return floor + len(self.text[floor:pos].rstrip())

    def last_run_start(self, floor: int, pos: int) -> int:
        """Start of the last whitespace run that starts in (floor, pos], or -1 (text[floor] is not
        blank). Looks back a little first, further only if needed, so stepping back over many
        candidates stays linear."""
        text = self.text
        span = 64
        while True:
            low = max(floor, pos + 1 - span)
            window = text[low : pos + 1]
            body = window.rstrip()
            if body and len(body) < len(window):
                return low + len(body)
            if body:
                head = window.rsplit(None, 1)  # [text before the last run, last word]
                if len(head) == 2:
                    return low + len(head[0])
            if low == floor:
                return -1
            span *= 4

    def hard_cut(self, start: int, first_text: int, last: int, room: int) -> tuple[int, int]:
        """Cut a word too long for the window: as late as fits, within a word (not inside a fence)
        and preferably not just before a backtick or tilde (which would then start the next
        message's line). Returns (cut, poor cut): the first is -1 if every cut that fits would end
        the message on its opening fence line (an empty block); the second is the latest of those.
        """
        text = self.text
        preferred = fallback = poor = -1
        for cut in range(last, first_text, -1):
            opener = self.open_at(cut)
            if cut - start + (_CLOSE_LEN if opener >= 0 else 0) > room:
                continue
            if text[cut].isspace() or text[cut - 1].isspace() or self.inside_fence(cut):
                continue
            if opener >= 0 and self.on_last_line(self.fence_pos[opener], start, cut):
                poor = max(poor, cut)
                continue
            if text[cut] not in _FENCE_CHARS:
                preferred = cut
                break
            if fallback < 0:
                fallback = cut
            elif fallback - cut > 8:
                break
        return (preferred if preferred >= 0 else fallback), poor


def _run_end(text: str, pos: int) -> int:
    """End of the whitespace run starting at `pos` (`pos` itself if text[pos] is not blank)."""
    run = _WS_RUN.match(text, pos)
    return run.end() if run else pos
