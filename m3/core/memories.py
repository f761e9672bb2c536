"""The one container for explicit memories, shared by the model, encoder, stores and training.

A batch of sequences reads from a *pool* of `M` memories per sequence, and a *visibility
map* says which memories each chunk of the context may attend to. One layout serves both
ways the paper reads memories (paper §3.2, §3.5):

- inference: each 64-token chunk sees the 5 memories retrieved for it, so the pool holds
  `n_chunks × 5` memories and the map is block-diagonal (`Memories.per_chunk`);
- training: chunk `c` sees the references of chunks `c−4..c`, so the pool holds one slot per
  distinct reference and the map is a sliding window (`Memories.sliding_window`).

Shapes (`B` batch, `M` memories, `L_mem` memory layers, `H_kv` key/value heads, `k` kept
tokens per head, `d_h` head dimension, `C` chunks):

| field     | shape                            | meaning                                   |
|-----------|----------------------------------|-------------------------------------------|
| `keys`    | `(B, M, L_mem, H_kv, k, d_h)`    | post-RoPE keys of the kept tokens         |
| `values`  | `(B, M, L_mem, H_kv, k, d_h)`    | values of the kept tokens                 |
| `valid`   | `(B, M, k)` bool                 | kept token slot holds a real token        |
| `visible` | `(B, C, M)` bool                 | chunk `c` may attend to memory `m`        |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def sliding_window_visibility(slots: Tensor, count: int, *, window: int = 5) -> Tensor:
    """Which pool slots each chunk sees when chunk `c` reads the references of `c−window+1..c`.

    Args:
        slots: `(B, C)` long: the pool slot of the reference each chunk retrieved, −1 for none.
        count: Pool size `M`.
        window: How many chunks' references each chunk sees (the paper: 5).

    Returns:
        `(B, C, M)` bool visibility map.
    """
    batch, chunks = slots.shape
    hit = torch.zeros(batch, chunks, count + 1, dtype=torch.bool, device=slots.device)
    # index M stands for "no reference" and is dropped below
    hit.scatter_(2, torch.where(slots < 0, count, slots)[..., None], True)
    hit = hit[..., :count]
    # chunk c sees what chunks c-window+1..c retrieved: a cumulative OR over a window
    padded = torch.nn.functional.pad(hit.to(torch.int32), (0, 0, window - 1, 0))
    return padded.unfold(1, window, 1).sum(-1) > 0


@dataclass
class Memories:
    """A pool of explicit memories for a batch of sequences and which chunk sees which.

    Attributes:
        keys: Post-RoPE keys of the kept tokens, `(B, M, L_mem, H_kv, k, d_h)`.
        values: Values of the kept tokens, `(B, M, L_mem, H_kv, k, d_h)`.
        valid: Whether each kept-token slot holds a real token, `(B, M, k)` bool; a reference
            shorter than `k` tokens leaves slots invalid.
        visible: Whether chunk `c` of the context may attend to memory `m`, `(B, C, M)` bool.
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    visible: Tensor

    def __post_init__(self) -> None:
        if self.keys.dim() != 6:
            raise ValueError(
                "memory keys must be (B, M, L_mem, H_kv, k, d_h), "
                f"got shape {tuple(self.keys.shape)}"
            )
        if self.values.shape != self.keys.shape:
            raise ValueError(
                f"memory values {tuple(self.values.shape)} must have the keys' shape "
                f"{tuple(self.keys.shape)}"
            )
        batch, count, _, _, tokens, _ = self.keys.shape
        if self.valid.shape != (batch, count, tokens) or self.valid.dtype != torch.bool:
            raise ValueError(
                f"memory valid must be a bool tensor of shape (B, M, k) = "
                f"{(batch, count, tokens)}, "
                f"got {self.valid.dtype} {tuple(self.valid.shape)}"
            )
        if (
            self.visible.dim() != 3
            or self.visible.shape[0] != batch
            or self.visible.shape[2] != count
            or self.visible.dtype != torch.bool
        ):
            raise ValueError(
                f"memory visible must be a bool tensor of shape (B, C, M) with B={batch}, "
                f"M={count}, got {self.visible.dtype} {tuple(self.visible.shape)}"
            )

    @property
    def batch_size(self) -> int:
        """Number of sequences `B`."""
        return self.keys.shape[0]

    @property
    def num_memories(self) -> int:
        """Pool size `M` per sequence."""
        return self.keys.shape[1]

    @property
    def num_chunks(self) -> int:
        """Number of context chunks `C` the visibility map covers."""
        return self.visible.shape[1]

    @property
    def memory_tokens(self) -> int:
        """Kept tokens per memory layer and head, `k`."""
        return self.keys.shape[4]

    @classmethod
    def per_chunk(cls, keys: Tensor, values: Tensor, valid: Tensor) -> Memories:
        """Memories retrieved separately for every chunk (the inference layout).

        Args:
            keys: `(B, C, m, L_mem, H_kv, k, d_h)`: the `m` memories of each of `C` chunks.
            values: Same shape as `keys`.
            valid: `(B, C, m, k)` bool.

        Returns:
            A pool of `M = C·m` memories where chunk `c` sees exactly its own `m`.
        """
        batch, chunks, per_chunk = keys.shape[:3]
        owner = torch.arange(chunks, device=keys.device).repeat_interleave(per_chunk)
        visible = owner[None, None, :] == torch.arange(chunks, device=keys.device)[None, :, None]
        return cls(
            keys=keys.flatten(1, 2),
            values=values.flatten(1, 2),
            valid=valid.flatten(1, 2),
            visible=visible.expand(batch, chunks, chunks * per_chunk),
        )

    @classmethod
    def sliding_window(
        cls, keys: Tensor, values: Tensor, valid: Tensor, slots: Tensor, *, window: int = 5
    ) -> Memories:
        """Memories of references retrieved one per chunk (the training layout, paper §3.5, §5).

        Chunk `c` sees the memories of the references retrieved by chunks `c−window+1..c`.
        A reference retrieved by several chunks takes one slot of the pool.

        Args:
            keys: `(B, M, L_mem, H_kv, k, d_h)`: one memory per distinct reference.
            values: Same shape as `keys`.
            valid: `(B, M, k)` bool.
            slots: `(B, C)` long: the pool slot of the reference retrieved by each chunk, or
                −1 where a chunk retrieved nothing.
            window: How many chunks' references each chunk sees (the paper: 5).

        Returns:
            The pool with its sliding-window visibility map `(B, C, M)`.
        """
        visible = sliding_window_visibility(slots, keys.shape[1], window=window)
        return cls(keys=keys, values=values, valid=valid, visible=visible)

    @classmethod
    def from_references(
        cls, memory: SparseMemory, index: Tensor, visible: Tensor | None = None
    ) -> Memories:
        """Arrange references' sparse memories into a pool for a batch of sequences.

        Args:
            memory: `N` references' memories.
            index: `(B, M)` long: which of the `N` references fills each pool slot; −1 leaves
                a slot empty (invalid).
            visible: `(B, C, M)` bool visibility map; every chunk sees every slot when None
                (`C = 1`).

        Returns:
            The pool.
        """
        empty = index < 0
        safe = index.clamp(min=0)
        valid = memory.valid[safe] & ~empty[..., None]
        if visible is None:
            visible = torch.ones(index.shape[0], 1, index.shape[1], dtype=torch.bool)
        return cls(
            keys=memory.keys[safe],
            values=memory.values[safe],
            valid=valid,
            visible=visible.to(valid.device),
        )

    @classmethod
    def empty(
        cls,
        batch_size: int,
        num_chunks: int,
        *,
        memory_shape: tuple[int, int, int, int, int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Memories:
        """A pool with no memories: memory mode (prefix, positions) with nothing to read.

        Args:
            batch_size: `B`.
            num_chunks: `C`.
            memory_shape: `(L_mem, 2, H_kv, k, d_h)` of one memory (`Config.memory_shape`).
            device: Where to allocate.
            dtype: Dtype of keys and values.

        Returns:
            Memories with `M = 0`.
        """
        layers, _, heads, tokens, dim = memory_shape
        shape = (batch_size, 0, layers, heads, tokens, dim)
        return cls(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            valid=torch.zeros(batch_size, 0, tokens, dtype=torch.bool, device=device),
            visible=torch.zeros(batch_size, num_chunks, 0, dtype=torch.bool, device=device),
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Memories:
        """Move keys and values (and masks) to a device and/or cast keys and values.

        Args:
            device: Target device; unchanged when None.
            dtype: Target dtype of keys and values; unchanged when None.

        Returns:
            A new container (or this one when nothing changes).
        """
        return Memories(
            keys=self.keys.to(device=device, dtype=dtype),
            values=self.values.to(device=device, dtype=dtype),
            valid=self.valid.to(device=device),
            visible=self.visible.to(device=device),
        )

    def visible_index(self) -> tuple[Tensor, Tensor]:
        """Compact per-chunk lists of the memories each chunk sees.

        Returns:
            `(index, present)`, both `(B, C, M_c)` where `M_c` is the largest number of memories
            any chunk sees: `index` holds pool indices (visible ones first, in pool order) and
            `present` says which entries are real rather than padding.
        """
        most = int(self.visible.sum(-1).max()) if self.visible.numel() else 0
        order = torch.sort(self.visible.to(torch.uint8), dim=-1, descending=True, stable=True)
        index = order.indices[..., :most]
        return index, order.values[..., :most].bool()

    def take_rows(self, rows: Tensor) -> Memories:
        """The memories of chosen rows (a row may be taken several times).

        Args:
            rows: `(R,)` long indices into the pool's `B` rows.

        Returns:
            The pool of `R` rows.
        """
        return Memories(self.keys[rows], self.values[rows], self.valid[rows], self.visible[rows])

    def for_chunks(self, chunks: Tensor) -> Memories:
        """The memories one chunk of each sequence sees, as a compact one-chunk pool.

        Args:
            chunks: `(B,)` long: the chunk of each sequence.

        Returns:
            Memories with `C = 1` holding only the memories visible to those chunks.
        """
        rows = torch.arange(self.batch_size, device=self.keys.device)
        visible = self.visible[rows, chunks][:, None, :]
        picked = Memories(self.keys, self.values, self.valid, visible)
        index, present = picked.visible_index()
        index, present = index[:, 0], present[:, 0]
        return Memories(
            keys=self.keys[rows[:, None], index],
            values=self.values[rows[:, None], index],
            valid=self.valid[rows[:, None], index] & present[..., None],
            visible=present[:, None, :],
        )

    def with_pool_size(self, count: int) -> Memories:
        """Pad the pool with invisible, invalid memories up to `count` slots.

        Args:
            count: New pool size `M`, at least the current one.

        Returns:
            The padded container.
        """
        extra = count - self.num_memories
        if extra < 0:
            raise ValueError(f"cannot shrink a pool of {self.num_memories} memories to {count}")
        if extra == 0:
            return self

        def pad(tensor: Tensor, dim: int) -> Tensor:
            shape = list(tensor.shape)
            shape[dim] = extra
            return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)

        return Memories(
            keys=pad(self.keys, 1),
            values=pad(self.values, 1),
            valid=pad(self.valid, 1),
            visible=pad(self.visible, 2),
        )


@dataclass
class SparseMemory:
    """The sparse memories of `N` references: what the encoder writes and a store returns.

    `Memories.from_references` arranges them into a pool for a batch of sequences.

    Attributes:
        keys: Post-RoPE keys of the kept tokens, `(N, L_mem, H_kv, k, d_h)`.
        values: Values of the kept tokens, `(N, L_mem, H_kv, k, d_h)`.
        valid: Whether each kept-token slot holds a real token, `(N, k)` bool; a reference
            shorter than `k` tokens fills only its first slots.
        positions: Which token of the reference (0 = first token after the prefix) each slot
            kept, `(N, L_mem, H_kv, k)` long, −1 in invalid slots; with the reference's token
            ids it shows a memory back as text.
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    positions: Tensor

    def __post_init__(self) -> None:
        if self.keys.dim() != 5 or self.values.shape != self.keys.shape:
            raise ValueError(
                "sparse memory keys and values must both be (N, L_mem, H_kv, k, d_h), got "
                f"{tuple(self.keys.shape)} and {tuple(self.values.shape)}"
            )
        count, layers, heads, tokens, _ = self.keys.shape
        if self.valid.shape != (count, tokens) or self.valid.dtype != torch.bool:
            raise ValueError(
                f"sparse memory valid must be bool (N, k) = {(count, tokens)}, "
                f"got {self.valid.dtype} {tuple(self.valid.shape)}"
            )
        if self.positions.shape != (count, layers, heads, tokens):
            raise ValueError(
                f"sparse memory positions must be (N, L_mem, H_kv, k) = "
                f"{(count, layers, heads, tokens)}, got {tuple(self.positions.shape)}"
            )

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one memory, `(L_mem, 2, H_kv, k, d_h)` (as `Config.memory_shape`)."""
        layers, heads, tokens, dim = self.keys.shape[1:]
        return (layers, 2, heads, tokens, dim)

    def __getitem__(self, index: Tensor | slice | int) -> SparseMemory:
        """Select references (a long index tensor, a slice or one position)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return SparseMemory(
            self.keys[index], self.values[index], self.valid[index], self.positions[index]
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SparseMemory:
        """Move to a device and/or cast keys and values.

        Args:
            device: Target device; unchanged when None.
            dtype: Target dtype of keys and values; unchanged when None.

        Returns:
            A new container.
        """
        return SparseMemory(
            keys=self.keys.to(device=device, dtype=dtype),
            values=self.values.to(device=device, dtype=dtype),
            valid=self.valid.to(device=device),
            positions=self.positions.to(device=device),
        )

    @classmethod
    def cat(cls, parts: list[SparseMemory]) -> SparseMemory:
        """Concatenate the references of several containers.

        Args:
            parts: Containers with equal memory shapes.

        Returns:
            One container with all their references, in order.
        """
        return cls(
            keys=torch.cat([p.keys for p in parts]),
            values=torch.cat([p.values for p in parts]),
            valid=torch.cat([p.valid for p in parts]),
            positions=torch.cat([p.positions for p in parts]),
        )
