"""The image encoder stage: a prompt's images through the vision tower, beside the decode loop.

A picture question's vision tower (17 crops through CLIP at 16 crops) is the biggest single
piece of work a joiner brings. Run inside a step, every answer already streaming would stop
for it; here it runs on a thread of its own (on CUDA, on a stream of its own, so it overlaps
the decode steps), while the request holds its slot as ENCODING and the others go on. The
step loop takes the result once it is ready (``done``): the embeddings, which it prefills
in chunks, or on the CPU the prompt already prefilled here (core.py), so that the step loop
(one core) only decodes while this thread's core reads the prompt.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class ImageEncoder:
    """``submit(work)``: a future of ``work()`` (a prompt's embeddings, or more), run on the
    encoder thread. One at a time, in the order submitted."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference-images")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def submit(self, work: Callable[[], T]) -> concurrent.futures.Future[T]:
        return self._pool.submit(self._run, work)

    def _run(self, work: Callable[[], T]) -> T:
        if self._stream is None:
            return work()
        with torch.cuda.stream(self._stream):
            result = work()
        self._stream.synchronize()  # ready before the step loop reads it
        if isinstance(result, torch.Tensor):
            # Read and freed on the step loop's stream: its memory is not reused before that.
            result.record_stream(torch.cuda.default_stream(self._device))
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
