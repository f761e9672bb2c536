"""Vector quantizers: every stored key/value vector compressed to a few bytes (paper §3.3).

The paper compresses each 80-dim key or value vector of its memory bank to 14 bytes with the
FAISS composite `OPQ20_80,Residual2x14,PQ8x10`, trained on the K/V vectors of uniformly
sampled references and decoded on the host before use: 450,560 bytes per reference become
39,424. This module offers four quantizers behind one small interface, all written in torch
(k-means runs on the device of the training vectors):

| quantizer | short name | code per `d`-dim vector |
|---|---|---|
| `RawQuantizer` | `raw` | the raw bytes of a dtype: `2·d` in bf16 |
| `Int8Quantizer` | `int8` | `d` int8 values + one 2-byte fp16 scale |
| `ProductQuantizer` | `product` | `ceil(subspaces·bits / 8)` bytes |
| `CompositeQuantizer` | `composite` | OPQ rotation, coarse codes, residual PQ: 14 bytes at d = 80 |

A quantizer turns `(n, d)` float vectors into `(n, code_bytes)` uint8 codes of a fixed size
and back, so a store can keep codes in fixed-size rows and decode on read. `describe()`
gives its settings as JSON (for `StoreInfo.quantizer`); `save`/`load` (or `to_bytes`/
`from_bytes`) keep its trained state in one file or blob.

In FAISS, `Residual2x14` in that string builds an inverted multi-index (each half of the
rotated vector gets its own 2^14-centroid codebook), not a two-level residual k-means.
`CompositeQuantizer` builds the same structure by default and offers the residual reading
too.

`MemoryQuantizer` applies quantizers to every key and value vector of a `SparseMemory`. Keys
and values get separately trained quantizers by default, since their distributions differ
(keys carry the rotary rotation, values do not); passing the same quantizer for both trains
one on both.

```python
quantizer = MemoryQuantizer(CompositeQuantizer(80))       # keys and values: the paper's codec
quantizer.fit(sample)                                      # SparseMemory of sampled references
codes = quantizer.encode(memory)                           # QuantizedMemory: uint8 codes
memory_back = quantizer.decode(codes, dtype=torch.bfloat16)
quantizer.save("bank.quantizer")
```

Codes are packed as one little-endian bit stream per group of fields: field `j` of width `b`
occupies bits `j·b … j·b + b − 1`, bit `i` of the stream being bit `i mod 8` of byte
`i div 8` (`pack_codes`, `unpack_codes`).

The package has one module per concept, and every name below imports from the package:

| module | what |
|---|---|
| `bits` | `pack_codes`, `unpack_codes`, `packed_bytes` |
| `kmeans` | `kmeans` and nearest-centroid search |
| `base` | the `VectorQuantizer` interface, its file (`FORMAT`), `relative_error` |
| `scalar` | `RawQuantizer` (`NoQuantizer`), `Int8Quantizer` |
| `product` | product codes and `ProductQuantizer` |
| `composite` | OPQ rotation and `CompositeQuantizer` |
| `memory` | `MemoryQuantizer`, `QuantizedMemory`, `memory_vectors` |

Quantizer files and store descriptions record a quantizer by its registered identity
(`quantizer:composite`, `m3.core.registry.identity`), so moving a module changes nothing
they hold; those written by m3 0.1, which recorded module paths, still load and match.
"""

from __future__ import annotations

from m3.memory.quantize.base import FORMAT, FORMAT_VERSION, VectorQuantizer, relative_error
from m3.memory.quantize.bits import MAX_BITS, pack_codes, packed_bytes, unpack_codes
from m3.memory.quantize.composite import CompositeQuantizer
from m3.memory.quantize.kmeans import kmeans
from m3.memory.quantize.memory import MemoryQuantizer, QuantizedMemory, memory_vectors
from m3.memory.quantize.product import ProductQuantizer
from m3.memory.quantize.scalar import (
    FloatDtype,
    Int8Quantizer,
    NoQuantizer,
    RawQuantizer,
    ScaleDtype,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_BITS",
    "CompositeQuantizer",
    "FloatDtype",
    "Int8Quantizer",
    "MemoryQuantizer",
    "NoQuantizer",
    "ProductQuantizer",
    "QuantizedMemory",
    "RawQuantizer",
    "ScaleDtype",
    "VectorQuantizer",
    "kmeans",
    "memory_vectors",
    "pack_codes",
    "packed_bytes",
    "relative_error",
    "unpack_codes",
]
