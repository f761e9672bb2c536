"""The bottom layer: what every other part of m3 shares.

`errors` (the `UserError` every user mistake raises), `registry` (components by kind and
their recorded identities), `values` (a recipe's values checked against annotations), the
containers that cross layers (`references.Reference`, `memories.SparseMemory` and
`memories.Memories`), small shared checks (`checks`), run folders (`runs`), plots
(`plots`), and lazy exports and old module paths (`lazy`).

May import: nothing else of m3. Everything else may import it.
"""
