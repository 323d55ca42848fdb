"""The codec interface: what every codec implements, and the one error type codecs raise.

A codec turns a finite, contiguous CPU tensor into a payload (uint8 numpy array) and writes a payload back
into a caller-owned tensor. The Blob (blob.py) carries everything else (dtype, shape, bound), so a codec
never sees bytes it did not write. Bound modes are resolved before a codec runs (bounds.py): `eb` here is
always absolute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from moeserve.errors import MoeServeError

if TYPE_CHECKING:
    from moeserve.codecs.blob import Blob


class CodecError(MoeServeError):
    """A tensor, bound or blob that a codec cannot encode or decode (one sentence, shown as is)."""


class NativeDecoder(ABC):
    """Decodes into CPU tensors on native threads that never take the GIL, so background decoding does not
    stall the model's Python thread (offload/decode_pool.py).

    The pool `start_pool` returns takes `submit(jobs, urgent)`, one job per (blob, out) as `job` makes it
    from their `source` and `target`,
    and answers a handle with done(), wait() (raises ValueError for a malformed payload: translate it with
    `error`) and seconds; `close()` finishes every submitted unit, then stops its threads."""

    name: ClassVar[str]

    @abstractmethod
    def start_pool(self, threads: int, spare_cores: bool = True):
        """A new pool of `threads` native decode threads; `spare_cores`: whether the machine has cores beyond
        the compute threads and these (without, a decode something waits for may run on the waiting thread)."""

    @abstractmethod
    def source(self, blob: Blob) -> object:
        """What the pool reads for `blob` (a caller that submits the same blob again may keep it)."""

    @abstractmethod
    def target(self, out: torch.Tensor) -> object:
        """What the pool writes for `out` (checked, contiguous, CPU; a caller may keep it as long as `out`)."""

    @abstractmethod
    def job(self, source: object, target: object) -> object:
        """The pool's argument for decoding a `source` into a `target` of the same shape."""

    @abstractmethod
    def error(self, error: ValueError) -> CodecError:
        """The CodecError a waiting caller gets for the pool's ValueError."""


class Codec(ABC):
    """One compression method. Stateless: instances live in the registry and are shared."""

    name: ClassVar[str]
    bounded: ClassVar[bool]  # True: takes an error bound and guarantees max |decode(encode(x)) - x| <= eb
    encodes_on_cuda: ClassVar[bool] = False  # True: encode() accepts a CUDA tensor and encodes it there
    # True: every decoded value is one the blob's stored dtype holds exactly (the decoder rounds to it before
    # writing any output dtype), so an output in the stored dtype loses nothing (offload/cache.py slot_dtype).
    decodes_in_stored_dtype: ClassVar[bool] = False

    @abstractmethod
    def encode(self, x: torch.Tensor, eb: float | None) -> np.ndarray:
        """x: contiguous, finite, fp32/fp16/bf16, numel > 0, on the CPU (or CUDA if encodes_on_cuda).
        eb: absolute bound (None for unbounded codecs). Returns the payload as a 1-D uint8 array."""

    @abstractmethod
    def decode_cpu(self, blob: Blob, out: torch.Tensor) -> None:
        """Writes blob's values into out: contiguous CPU tensor of blob.shape, any float dtype."""

    def native_decoder(self) -> NativeDecoder | None:
        """This codec's GIL-free background decoder, or None: the decode pool then runs `decode_cpu`
        on Python threads."""
        return None

    def decode_cuda(self, blob: Blob, out: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """Writes into a CUDA tensor, ordered on `stream`. Default: decode on the CPU, then one copy."""
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        self.decode_cpu(blob, host)
        with torch.cuda.stream(stream):
            # Safe to drop `host` afterwards: torch's pinned allocator holds the block until the copy is done.
            out.copy_(host, non_blocking=True)
