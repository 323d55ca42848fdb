"""Host buffers for the compressed store: exactly the bytes asked for, page-locked when a GPU reads them.

In:  a byte count, and whether a CUDA device will copy from the buffer.
Out: `HostArena.data`, one uint8 tensor of that many bytes.

torch's pinned allocator rounds every block up to a power of two (a 352 MB expert took 512 MB), so
pinned arenas are anonymous memory maps (page-aligned, exactly as large as asked, to the page) that
CUDA registers as page-locked for as long as the arena lives.
"""

from __future__ import annotations

import mmap
import weakref

import torch

from moeserve.errors import MoeServeError

_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context, not only the current one


class HostArena:
    def __init__(self, nbytes: int, pin: bool = False):
        if not pin:
            self.data = torch.zeros(nbytes, dtype=torch.uint8)
            return
        self._map = mmap.mmap(-1, max(nbytes, 1))
        self.data = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
        if nbytes:
            address = self.data.data_ptr()
            error = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, _PORTABLE))
            if error != 0:
                raise MoeServeError(
                    f"could not page-lock {nbytes} bytes of host memory for the expert store (CUDA error {error}); "
                    f"raise the locked-memory limit (ulimit -l) or serve a smaller policy's store."
                )
            weakref.finalize(self, _unregister, address)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def _unregister(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)
