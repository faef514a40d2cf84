"""One answer's tokens, turned into text pieces as they are generated.

transformers' ``TextStreamer`` decodes the whole line so far again for every token, through
``tokenizer.decode``, which checks every id of a Python list one by one: about 5 µs per id
held, so a 300-token paragraph costs 1.6 ms per token, per answer. With 16 answers decoding
at once that is more than the GPU's whole decode step. The ``tokenizers`` library's
``DecodeStream`` does the job in constant time per token (it keeps a few tokens of context
and holds back incomplete UTF-8); Phi-3's tokenizer is a fast one, so it has one. A
tokenizer without a fast backend decodes the whole answer again per token, from a tensor
(one conversion, not one check per id). Either way the answer is decoded once more at its
end, for what was held back. Spaces are never "cleaned up" (Phi-3 does not): a
clean-up can change text already sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tokenizers.decoders import DecodeStream


class TextPieces:
    """Feed it an answer's token ids one by one; it calls ``emit`` with each new piece of text.

    The pieces joined are the answer decoded in one go (special tokens skipped, no clean-up).
    """

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._emit = emit
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._ids: list[int] = []  # the answer so far
        self._sent = 0  # how many characters of it went out

    def put(self, token: int) -> None:
        self._ids.append(token)
        if self._stream is not None:
            piece = self._stream.step(self._backend, token)
        else:
            text = self._decode()
            if text.endswith("\ufffd"):  # the middle of a character: wait for the rest
                return
            piece = text[self._sent :]
        self._send(piece)

    def end(self) -> None:
        """The answer is over: what was held back (a last ``\ufffd``) goes out."""
        if self._ids:
            self._send(self._decode()[self._sent :])

    def _decode(self) -> str:
        # From a tensor: transformers converts it in one call, a list id by id.
        return self._tokenizer.decode(
            torch.tensor(self._ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _send(self, piece: str | None) -> None:
        if piece:
            self._sent += len(piece)
            self._emit(piece)
