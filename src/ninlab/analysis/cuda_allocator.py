"""CUDA's caching allocator, simulated: what `torch.cuda.max_memory_allocated` and
`max_memory_reserved` will show for a step, from the allocations and frees a recording has.

An out-of-memory error on a GPU is decided by what the caching allocator has reserved from the
device (its `cudaMalloc`'d segments), not by the bytes of live tensors: freed blocks stay cached
in their segment, and a request that no cached block fits gets a new segment even when enough
bytes are free in pieces. `CachingAllocator` replays requests through the rules of
c10/cuda/CUDACachingAllocator.cpp in its default configuration (read against PyTorch 2.5 to 2.9;
the constants and the rules below have been the same since 1.x):

* every request is rounded up to a multiple of 512 bytes (`round_size`, kMinBlockSize); a request
  of 0 bytes allocates nothing;
* requests up to 1 MiB (kSmallSize) are served from the small pool, whose segments are 2 MiB
  (kSmallBuffer); larger ones from the large pool, where a request under 10 MiB (kMinLargeAlloc)
  gets a 20 MiB segment (kLargeBuffer) and a larger one a segment of its size rounded up to 2 MiB
  (kRoundLarge) (`get_allocation_size`);
* a request takes the smallest cached free block of its pool that fits, the lowest address first
  among equal sizes (`get_free_block`: the pool is a set ordered by (stream, size, address));
  only when none fits is a new segment allocated;
* the block taken is split when the rest is at least 512 bytes (small pool) or more than 1 MiB
  (large pool); otherwise the request holds the whole block, and `max_memory_allocated` counts it
  whole (`should_split`, `alloc_found_block`);
* a freed block merges with free neighbours in its segment (`free_block`, `try_merge_blocks`);
* segments are never returned to the device: only an out-of-memory retry or `empty_cache()` does
  that, so reserved memory only grows (the simulation has no memory limit);
* the default configuration: `max_split_size_mb` unlimited, so no block is "oversize" and none is
  refused for being too large for a small request; no `roundup_power2_divisions`; no expandable
  segments; one stream, no CUDA graphs.

`simulate_step` replays one step as `measure` runs it: a first, warm-up step that fills the cache,
then the steady second step, which `reset_peak_memory_stats()` isolates.

What a process needs beyond the reserved memory is not the allocator's: the CUDA context
(`CUDA_CONTEXT_BYTES`). cuDNN's workspace is not predicted: PyTorch takes it from this same
allocator while a convolution runs, sized by the algorithm cuDNN picks on that GPU, so a real step's
allocated and reserved peaks can exceed the prediction by it. cuBLAS's workspace (8 MiB + 128 KiB,
32 MiB on Hopper and later; CublasHandlePool.cpp) is allocated once at a model's first matrix
multiply and kept: not predicted either.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ninlab.analysis.trace import StepRecording

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "CUDA_CONTEXT_SOURCE",
    "CUDNN_WORKSPACE_NOTE",
    "CachingAllocator",
    "CudaLevels",
    "StepEvents",
    "cuda_pool",
    "cuda_round_size",
    "cuda_segment_bytes",
    "simulate_step",
    "step_events",
]

MIB = 1 << 20
CUDA_MIN_BLOCK_BYTES = 512  # kMinBlockSize: every request is rounded up to a multiple of this
CUDA_SMALL_BYTES = 1 * MIB  # kSmallSize: requests up to 1 MiB come from the small pool
CUDA_SMALL_BUFFER_BYTES = 2 * MIB  # kSmallBuffer: the small pool's segments
CUDA_LARGE_BUFFER_BYTES = 20 * MIB  # kLargeBuffer: the segment of a request of 1 to 10 MiB
CUDA_MIN_LARGE_ALLOC_BYTES = 10 * MIB  # kMinLargeAlloc: from here a request gets its own segment
CUDA_ROUND_LARGE_BYTES = 2 * MIB  # kRoundLarge: ... rounded up to a multiple of 2 MiB

# The CUDA context a process creates on its first CUDA call (kernels of PyTorch and its libraries,
# the driver's own structures), outside the caching allocator and so outside max_memory_reserved.
# PyTorch's PR #86509 (which made lazy module loading the default in 1.13) measured it with
# nvidia-smi: 287,047,680 bytes with CUDA_MODULE_LOADING=LAZY, 666,632,192 bytes eagerly. It grows
# with the kernels a run loads (cuDNN's and cuBLAS's on first use) and varies with the GPU and
# driver, so it is stated as a range: about 300 to 700 MiB; benchmarks/gpu_check.py measures it.
CUDA_CONTEXT_BYTES = (300 * MIB, 700 * MIB)
CUDA_CONTEXT_SOURCE = (
    "outside the caching allocator: about 300 MiB with lazy module loading "
    "(PyTorch's default since 1.13) to 700 MiB loading eagerly (pytorch/pytorch PR #86509 measured "
    "287 and 667 MB with nvidia-smi); it varies with the GPU, driver and the libraries a run loads"
)
CUDNN_WORKSPACE_NOTE = (
    "cuDNN's workspace is not predicted: PyTorch takes it from the caching allocator while a "
    "convolution runs, sized by the algorithm cuDNN picks on the GPU, so measured peaks can exceed "
    "these by it; cuBLAS's workspace (8 MiB + 128 KiB, 32 MiB on Hopper and later, kept after the "
    "first matrix multiply) is not predicted either"
)


def cuda_round_size(nbytes: int) -> int:
    """round_size(): the block size a request occupies, counted by max_memory_allocated."""
    return max(CUDA_MIN_BLOCK_BYTES, -(-nbytes // CUDA_MIN_BLOCK_BYTES) * CUDA_MIN_BLOCK_BYTES)


def cuda_pool(nbytes: int) -> str:
    """get_pool(): "small" for rounded requests up to 1 MiB, else "large"."""
    return "small" if cuda_round_size(nbytes) <= CUDA_SMALL_BYTES else "large"


def cuda_segment_bytes(nbytes: int) -> int:
    """get_allocation_size(): the segment a request needs when no cached block fits."""
    size = cuda_round_size(nbytes)
    if size <= CUDA_SMALL_BYTES:
        return CUDA_SMALL_BUFFER_BYTES
    if size < CUDA_MIN_LARGE_ALLOC_BYTES:
        return CUDA_LARGE_BUFFER_BYTES
    return -(-size // CUDA_ROUND_LARGE_BYTES) * CUDA_ROUND_LARGE_BYTES


@dataclass(eq=False)
class Block:
    """A piece of a segment, free or handed out; `prev`/`next` are its neighbours in the segment."""

    address: int
    size: int
    small: bool
    allocated: bool = False
    prev: Block | None = None
    next: Block | None = None


class CachingAllocator:
    """One device, one stream, the default configuration, no memory limit."""

    def __init__(self) -> None:
        # Each pool's free blocks ordered by (size, address), as the allocator's std::set.
        self._free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        self._free_blocks: dict[int, Block] = {}  # address -> free block
        self._next_address = 0  # segments get increasing addresses, as cudaMalloc mostly gives
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self.peak_allocated_bytes = 0
        self.peak_reserved_bytes = 0
        self.segments: list[tuple[bool, int]] = []  # (small pool, bytes) in allocation order

    def malloc(self, nbytes: int) -> Block | None:
        """Hand out a block for `nbytes` (None for 0 bytes, which allocates nothing)."""
        if nbytes == 0:
            return None
        size = cuda_round_size(nbytes)
        small = size <= CUDA_SMALL_BYTES
        block = self._take_free(small, size)
        if block is None:
            segment = cuda_segment_bytes(size)
            block = Block(self._next_address, segment, small)
            self._next_address += segment
            self.segments.append((small, segment))
            self.reserved_bytes += segment
            self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        remaining = block.size - size
        split = remaining >= CUDA_MIN_BLOCK_BYTES if small else remaining > CUDA_SMALL_BYTES
        if split:
            rest = Block(block.address + size, remaining, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._put_free(rest)
        block.allocated = True
        self.allocated_bytes += block.size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        return block

    def free(self, block: Block | None) -> None:
        """Return `block` to its pool, merged with free neighbours in its segment."""
        if block is None:
            return
        block.allocated = False
        self.allocated_bytes -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._take(neighbour)
                if neighbour is block.prev:
                    block.address, block.prev = neighbour.address, neighbour.prev
                    if block.prev is not None:
                        block.prev.next = block
                else:
                    block.next = neighbour.next
                    if block.next is not None:
                        block.next.prev = block
                block.size += neighbour.size
        self._put_free(block)

    def reset_peak(self) -> None:
        """reset_peak_memory_stats(): the peaks restart from the current levels."""
        self.peak_allocated_bytes = self.allocated_bytes
        self.peak_reserved_bytes = self.reserved_bytes

    def _take_free(self, small: bool, size: int) -> Block | None:
        pool = self._free[small]
        position = bisect_left(pool, (size, -1))
        if position == len(pool):
            return None
        return self._take(self._free_blocks[pool[position][1]])

    def _take(self, block: Block) -> Block:
        pool = self._free[block.small]
        del pool[bisect_left(pool, (block.size, block.address))]
        del self._free_blocks[block.address]
        return block

    def _put_free(self, block: Block) -> None:
        insort(self._free[block.small], (block.size, block.address))
        self._free_blocks[block.address] = block


@dataclass(frozen=True)
class StepEvents:
    """One step's storages as the caching allocator sees them.

    `persistent` are alive before the step and after it (parameters, buffers, the input batch,
    optimizer state, DDP's buckets), in allocation order; `replaced` are alive when the step
    starts and freed during it, replaced by storages the step makes that outlive it (the previous
    step's gradients, freed by `zero_grad`); `ops[i]` is (storages op i makes, storages freed
    after it). `lazy` persistent storages do not exist yet in the first step and are made at op
    `lazy_at` (optimizer state, made by the first `optimizer.step()`).
    """

    nbytes: Mapping[int, int]
    persistent: tuple[int, ...]
    replaced: tuple[int, ...]
    ops: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    lazy: frozenset[int] = frozenset()
    lazy_at: int = 0


@dataclass(frozen=True)
class CudaLevels:
    """The steady step through the caching allocator: `allocated_bytes[i]` is what
    `memory_allocated()` shows at op i's high point (its outputs made, nothing freed yet)."""

    allocated_bytes: tuple[int, ...]
    max_allocated_bytes: int  # max_memory_allocated() of the step, after reset_peak_memory_stats()
    max_reserved_bytes: int  # max_memory_reserved(): every segment the two steps needed
    small_segments: int  # of 2 MiB
    large_segments: int
    large_reserved_bytes: int


def simulate_step(events: StepEvents) -> CudaLevels:
    """A warm-up step and the steady step after it, as `measure` runs them: the peaks are the
    second step's, which starts with the segments the first one left cached."""
    allocator = CachingAllocator()
    blocks: dict[int, Block | None] = {}
    for key in events.persistent:
        if key not in events.lazy:
            blocks[key] = allocator.malloc(events.nbytes[key])
    survivors = _run(allocator, events, blocks, warm_up=True)
    # The storages the first step left (its gradients) are the ones the second step frees; one
    # the first step did not leave (a step that changes what it keeps) is allocated as it starts.
    for key in events.replaced:
        match = next((k for k in survivors if events.nbytes[k] == events.nbytes[key]), None)
        if match is None:
            blocks[key] = allocator.malloc(events.nbytes[key])
        else:
            survivors.remove(match)
            blocks[key] = blocks.pop(match)
    allocator.reset_peak()
    allocated = _run(allocator, events, blocks, warm_up=False)
    small = sum(1 for is_small, _ in allocator.segments if is_small)
    return CudaLevels(
        allocated_bytes=tuple(allocated),
        max_allocated_bytes=allocator.peak_allocated_bytes,
        max_reserved_bytes=allocator.peak_reserved_bytes,
        small_segments=small,
        large_segments=len(allocator.segments) - small,
        large_reserved_bytes=sum(size for is_small, size in allocator.segments if not is_small),
    )


def _run(
    allocator: CachingAllocator,
    events: StepEvents,
    blocks: dict[int, Block | None],
    *,
    warm_up: bool,
) -> list[int]:
    """Replay the step's ops. The warm-up returns the keys of what it made that outlives it; the
    steady step returns the allocated level at each op."""
    made: list[int] = []
    levels: list[int] = []
    absent = set(events.replaced) if warm_up else set()
    for index, (born, died) in enumerate(events.ops):
        if warm_up and index == events.lazy_at:
            for key in events.persistent:
                if key in events.lazy:
                    blocks[key] = allocator.malloc(events.nbytes[key])
        for key in born:
            blocks[key] = allocator.malloc(events.nbytes[key])
            made.append(key)
        levels.append(allocator.allocated_bytes)
        for key in died:
            if key not in absent:
                allocator.free(blocks.pop(key))
    return [key for key in made if key in blocks] if warm_up else levels


def step_events(
    step: StepRecording,
    at_start: Sequence[int],
    born: Mapping[int, Sequence[int]],
    died: Mapping[int, Sequence[int]],
    bucket_bytes: Sequence[int] = (),
) -> StepEvents:
    """The allocator's view of a recorded step, from the storage lives the replay uses (`at_start`,
    and by op index those `born` and those that `died` after it) and DDP's buckets.

    The recording ends with the step, so what lives on (parameters, input, optimizer state) is
    marked freed after its last op: such storages are persistent here. Adam's and AdamW's step
    counters are 0-d tensors kept on the host unless the optimizer is fused (torch/optim/adam.py),
    so they take no device memory.
    """
    storages = step.recording.storages
    first, last = step.step_start, len(step.recording.ops) - 1
    nbytes = {key: storages[key].nbytes for key in at_start}
    host: set[int] = set()
    if step.spec.optimizer.implementation != "fused":
        host = {key for key in step.optimizer_state_keys if not storages[key].shape}
    ends = {key: index for index, keys in died.items() for key in keys}
    replaced = tuple(k for k in sorted(at_start) if ends.get(k, last) < last and k not in host)
    buckets = tuple(range(-len(bucket_bytes), 0))
    nbytes.update(zip(buckets, bucket_bytes))
    persistent = buckets + tuple(
        key for key in sorted(at_start) if key not in host and key not in replaced
    )
    kept = host | set(persistent)  # never freed by the allocator during the step
    ops = []
    for index in range(first, last + 1):
        made = tuple(sorted(k for k in born.get(index, ()) if k not in host))
        nbytes.update((key, storages[key].nbytes) for key in made)
        gone = tuple(k for k in died.get(index, ()) if k not in kept)
        ops.append((made, gone))
    lazy = frozenset(step.optimizer_state_keys) - host
    phases = [op.phase for op in step.recording.ops[first:]]
    lazy_at = phases.index("optimizer") if "optimizer" in phases else 0
    return StepEvents(nbytes, persistent, replaced, tuple(ops), lazy, lazy_at)
