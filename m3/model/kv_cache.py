"""The decoding cache: keys and values of the prefix and context, behind a memory region.

Every layer has one key and one value buffer of shape `(B, H_kv, R + b + capacity, d_h)`:

```text
buffer slot   0 … R−1                 R … R+b−1          R+b …
              memory region           <s>Reference:      context tokens of the row …
              (read by memory layers) (memory mode)
```

- The **memory region** holds, in each memory layer, the current memories of every row laid
  out as `R = M·k` extra slots, with a mask of the valid ones (`KVCache.memory_mask`). A
  decoding step of a memory layer attends over the region and the context in one call, as it
  would over a slightly longer context: that is the paper's one softmax over memory and
  context (paper §3.2) with no gather and no merge per step. Other layers start their window
  at slot `R`. `swap_memories` rewrites the region when a row starts a new chunk; it grows
  (once) when a row's memories need more slots. The context is never recomputed.
- Slots are counted from the **prefix** (`input_pos` below): slot 0 is the prefix's first
  token in memory mode, the context's `<s>` in warmup mode.

Create a cache with `Memory3.new_cache`, fill it with `Memory3.prefill`, then call
`Memory3.decode` (or `Memory3.extend`) (docs: The model and explicit-memory attention,
"Cached decoding with memory swaps").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from m3.core.memories import Memories


class KVCache:
    """Decoding state: cached keys/values of the prefix and context, plus the memory region.

    Rows hold prompts of different lengths (right padded); each row keeps its own length and
    chunk boundaries. In memory mode the memory region holds, for every row, the memories its
    current chunk reads; swap them with `swap_memories` when a row starts a new chunk
    (`starts_chunk`).

    Args:
        keys: Per layer `(B, H_kv, b + capacity, d_h)` buffers.
        values: Same shapes.
        prefix: The reference prefix ids `(b,)` in memory mode, None in warmup mode.
        chunk_length: Tokens per context chunk.
        memory_layers: Indices of the layers that read memories, in the order of the
            memories' `L_mem` axis.
    """

    def __init__(
        self,
        keys: list[Tensor],
        values: list[Tensor],
        *,
        prefix: Tensor | None,
        chunk_length: int,
        memory_layers: Sequence[int] = (),
    ) -> None:
        self.keys = keys
        self.values = values
        self.prefix = prefix
        self.chunk_length = chunk_length
        self.memory_layers = tuple(memory_layers)
        #: `(B,)` context tokens each row holds.
        self.lengths = torch.zeros(keys[0].shape[0], dtype=torch.long, device=keys[0].device)
        #: The memories every row reads now (one chunk), or None before the first.
        self.memories: Memories | None = None
        #: Leading buffer slots of the memory region, `R`.
        self.memory_slots = 0
        #: `(B, R)` bool: the region's slots that hold a memory token of the row.
        self.memory_mask: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of rows `B`."""
        return self.keys[0].shape[0]

    @property
    def prefix_length(self) -> int:
        """Tokens of the reference prefix `b` (0 in warmup mode)."""
        return 0 if self.prefix is None else self.prefix.numel()

    @property
    def capacity(self) -> int:
        """Most context tokens a row can hold."""
        return self.keys[0].shape[2] - self.memory_slots - self.prefix_length

    @property
    def starts_chunk(self) -> Tensor:
        """`(B,)` bool: rows whose next token opens a new chunk."""
        return (self.lengths > 0) & (self.lengths % self.chunk_length == 0)

    def update(
        self, layer: int, k: Tensor, v: Tensor, input_pos: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Store one layer's new keys and values; return what a decoding step of it reads.

        Args:
            layer: Index of the layer.
            k: `(B, H_kv, T, d_h)` keys of the new tokens, after RoPE.
            v: Same shape: their values.
            input_pos: `(B, T)` long slots of the new tokens, counted from the prefix (see the
                module docstring); None for a prompt, which fills slots `0..T−1`.

        Returns:
            `(keys, values)`: the layer's buffers from the first slot a decoding step of it
            may attend to, `(B, H_kv, S_max, d_h)` — the memory region's first slot in a
            memory layer, the prefix's first slot otherwise. A step reads the first `S` of
            them, `S` the width of its mask (`with_memory_region` for a memory layer).
        """
        keys, values = self.keys[layer], self.values[layer]
        start = self.memory_slots
        if input_pos is None:
            keys[:, :, start : start + k.shape[2]] = k
            values[:, :, start : start + v.shape[2]] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            # advanced indices first: the indexed view is (B, T, H_kv, d_h)
            keys[rows, :, start + input_pos] = k.transpose(1, 2)
            values[rows, :, start + input_pos] = v.transpose(1, 2)
        first = 0 if layer in self.memory_layers else start
        return keys[:, :, first:], values[:, :, first:]

    def take_rows(self, rows: Tensor) -> KVCache:
        """A new cache of chosen rows (a row may be taken several times), e.g. one per option.

        Several continuations of one prompt then share its prefill: the prompt is read once
        and each copy decodes its own continuation.

        Args:
            rows: `(R,)` long indices into this cache's rows.

        Returns:
            A cache of `R` rows with their keys, values, lengths and memories (copies).
        """
        rows = rows.to(self.lengths.device)
        taken = KVCache(
            [buffer[rows] for buffer in self.keys],
            [buffer[rows] for buffer in self.values],
            prefix=self.prefix,
            chunk_length=self.chunk_length,
            memory_layers=self.memory_layers,
        )
        taken.lengths = self.lengths[rows]
        taken.memory_slots = self.memory_slots
        if self.memory_mask is not None:
            taken.memory_mask = self.memory_mask[rows]
        if self.memories is not None:
            taken.memories = self.memories.take_rows(rows)
        return taken

    def with_memory_region(self, mask: Tensor) -> Tensor:
        """A decoding step's mask for a memory layer: the memory region's valid slots in front.

        Args:
            mask: `(B, 1, T, S)` bool: the prefix and context slots each new token may see.

        Returns:
            `(B, 1, T, R + S)` bool; `mask` itself when the cache holds no memories (warmup
            mode).
        """
        if self.memory_mask is None:
            return mask
        region = self.memory_mask[:, None, None, :].expand(-1, 1, mask.shape[2], -1)
        return torch.cat([region, mask], dim=-1)

    def swap_memories(self, memories: Memories, rows: Tensor | None = None) -> None:
        """Replace the memories that some rows read from their next token on.

        Args:
            memories: One-chunk memories (`C = 1`) for the rows being swapped.
            rows: `(R,)` long indices of those rows; all rows when None.
        """
        if self.prefix is None:
            raise ValueError("this cache was created without a prefix: it is in warmup mode")
        if memories.num_chunks != 1:
            raise ValueError(
                f"swap_memories takes one-chunk memories, got {memories.num_chunks} chunks"
            )
        batch = self.batch_size
        if rows is None:
            rows = torch.arange(batch, device=self.lengths.device)
        if memories.batch_size != rows.numel():
            raise ValueError(f"got memories for {memories.batch_size} rows, {rows.numel()} to swap")
        memories = memories.to(device=self.keys[0].device, dtype=self.keys[0].dtype)
        current = self.memories
        if current is None:
            if rows.numel() != batch:
                raise ValueError("the first memories of a cache must be given for every row")
            layers, heads, tokens, dim = memories.keys.shape[2:]
            current = Memories.empty(
                batch,
                1,
                memory_shape=(layers, 2, heads, tokens, dim),
                device=memories.keys.device,
                dtype=memories.keys.dtype,
            )
        size = max(memories.num_memories, current.num_memories)
        current, memories = current.with_pool_size(size), memories.with_pool_size(size)
        # own the tensors before writing rows in place: they may be views of the caller's
        fields = ("keys", "values", "valid", "visible")
        current = Memories(*(getattr(current, name).clone() for name in fields))
        for name in fields:
            getattr(current, name)[rows] = getattr(memories, name)
        self.hold_memories(current)

    def hold_memories(self, memories: Memories) -> None:
        """Make `memories` the ones every row reads, and lay them out in the memory region.

        Args:
            memories: One-chunk memories (`C = 1`) for every row, in the cache's dtype.
        """
        batch, count, _, heads, tokens, dim = memories.keys.shape
        size = count * tokens
        if size > self.memory_slots:  # grow the region in front: a one-off copy
            grow = (0, 0, size - self.memory_slots, 0)
            self.keys = [F.pad(buffer, grow) for buffer in self.keys]
            self.values = [F.pad(buffer, grow) for buffer in self.values]
            self.memory_slots = size
        mask = memories.valid & memories.visible[:, 0, :, None]  # (B, M, k)
        self.memory_mask = F.pad(mask.flatten(1), (0, self.memory_slots - size))
        for j, layer in enumerate(self.memory_layers):
            # (B, M, H_kv, k, d) -> (B, H_kv, M·k, d)
            layout = (0, 2, 1, 3, 4)
            keys = memories.keys[:, :, j].permute(layout).reshape(batch, heads, size, dim)
            values = memories.values[:, :, j].permute(layout).reshape(batch, heads, size, dim)
            self.keys[layer][:, :, :size] = keys
            self.values[layer][:, :, :size] = values
        self.memories = memories
