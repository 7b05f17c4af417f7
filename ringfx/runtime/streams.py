"""The CUDA streams of a rank program and the order between them: block kernels on two
alternating compute streams, float32 accumulation on a side stream, the rest on the
caller's stream. On the CPU everything runs inline.
"""

from __future__ import annotations

import contextlib

import torch


# B·H·S_local² of a ring step from which block kernels alternate between two streams:
# they only pay when each kernel is long (below it the launch overhead of the extra
# stream waits costs more than the overlapped tails: BENCHMARKS.md; H100, bf16, D=128:
# two streams helped at 8K x 8K x 32 heads = 2.1e9 and up, and cost at 4K x 4K x 32 = 5.4e8)
TWO_STREAMS_MIN_WORK = 2**30


class Streams:
    """The CUDA streams of a rank program; on the CPU everything runs inline.

    * Block kernels alternate between two compute streams, so that one kernel's last,
      partly empty wave of thread blocks overlaps the next kernel's first (a 16K x 16K
      block is 31.03 waves of cuDNN tiles on 132 SMs: without the overlap ~3% of each
      call idles). Consecutive block kernels never depend on each other.
    * The memory-bound float32 work (merges, dQ/dK/dV accumulation, the dK/dV
      transfers) runs on a side stream (the scheme of TransformerEngine's p2p context
      parallelism), after the kernels whose blocks it folds.
    * The main stream keeps the rest (inputs, masks, K/V transfers) and waits for all
      of them at the end.

    The streams are per device and shared by every (virtual) rank in the process (the
    compute streams' turn too), so that a dK/dV buffer handed between loopback ranks
    stays in stream order and consecutive kernels of different loopback ranks overlap.
    Never yield to the ring driver inside ``with streams:`` or ``streams.kernel()``:
    another rank program would run on them.
    """

    _side: dict = {}
    _compute: dict = {}
    _turn: dict = {}

    def __init__(self, device: torch.device, *, side: bool, two: bool):
        """``side``: use the side stream; ``two``: alternate two compute streams (worth it
        from TWO_STREAMS_MIN_WORK)."""
        self.stream = None
        self.compute = ()
        if device.type != "cuda":
            return
        self.main = torch.cuda.current_stream(device)
        self.key = (device.index, self.main.stream_id)
        if side:
            if self.key not in Streams._side:
                Streams._side[self.key] = torch.cuda.Stream(device)
            self.stream = Streams._side[self.key]
        if two:
            # (a higher priority for these streams than the side stream's measured no
            # faster on an H100: BENCHMARKS.md)
            if self.key not in Streams._compute:
                Streams._compute[self.key] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
            self.compute = Streams._compute[self.key]

    @contextlib.contextmanager
    def kernel(self, *inputs):
        """Run a block kernel on the next compute stream, after the main stream's work;
        ``inputs`` made elsewhere are not reused before it is done with them."""
        if not self.compute:
            yield
            return
        turn = Streams._turn.get(self.key, 0)
        Streams._turn[self.key] = 1 - turn
        stream = self.compute[turn]
        stream.wait_stream(self.main)
        with torch.cuda.stream(stream):
            yield
        for t in inputs:
            if t is not None:
                t.record_stream(stream)

    def __enter__(self):
        """Enter the side stream after everything queued so far on the main and the
        compute streams (without a side stream, the main stream waits for the compute
        streams and the work runs there)."""
        if self.stream is not None:
            self.stream.wait_stream(self.main)
            for c in self.compute:
                self.stream.wait_stream(c)
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        else:
            for c in self.compute:
                self.main.wait_stream(c)
        return self

    def __exit__(self, *exc):
        if self.stream is not None:
            self._ctx.__exit__(*exc)

    def keep(self, *tensors):
        """Tensors made on another stream and read inside ``with streams:``: do not reuse
        their memory before that stream is done with them."""
        reader = self.stream if self.stream is not None else (self.main if self.compute else None)
        if reader is not None:
            for t in tensors:
                t.record_stream(reader)

    def join(self):
        """The main stream waits for all side-stream and compute-stream work."""
        for c in (self.stream, *self.compute):
            if c is not None:
                self.main.wait_stream(c)
