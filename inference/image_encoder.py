"""The image encoder stage: a prompt's images through the vision tower, beside the decode loop.

A picture question's vision tower (17 crops through CLIP at 16 crops) is the biggest single
piece of work a joiner brings. Run inside a step, every answer already streaming would stop
for it; here it runs on a thread of its own (on CUDA, on a stream of its own, so it overlaps
the decode steps), while the request holds its slot as ENCODING and the others go on. The
step loop takes the embeddings once they are ready (``done``) and prefills them in chunks.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping

import torch

Embed = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


class ImageEncoder:
    """``submit(inputs)``: a future of the prompt's embeddings (positions x hidden), made by
    ``embed`` on the encoder thread. One at a time, in the order submitted."""

    def __init__(self, embed: Embed, device: torch.device) -> None:
        self._embed = embed
        self._device = device
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference-images")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def submit(self, inputs: Mapping[str, torch.Tensor]) -> concurrent.futures.Future[torch.Tensor]:
        return self._pool.submit(self._run, inputs)

    def _run(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self._stream is None:
            return self._embed(inputs)
        with torch.cuda.stream(self._stream):
            embeds = self._embed(inputs)
        self._stream.synchronize()  # ready before the step loop reads it
        # Read and freed on the step loop's stream: its memory is not reused before that.
        embeds.record_stream(torch.cuda.default_stream(self._device))
        return embeds

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
