"""`m3 build-memory`: encode a knowledge base into a memory bank (paper §3.3, warm start).

The knowledge base (`data.knowledge` sources) is tokenized and cut into references; a
reference's id is its position in that list, the same ids the continual stage uses, so a
retriever maps ids back to token ids. The weights named by `training.init_weights` encode
every reference through Lightning's `Trainer.predict`, in length-sorted batches;
`BankWriter`, a prediction writer, appends each batch to its rank's HDF5 shard. Then each
rank embeds its own references with the recipe's embedder (its fit split across the ranks)
into embedding shards (`m3.bank.embeddings`), and the rank that finds every shard written
builds the index from them (`m3.bank.vectors`). The folder's files are listed in
`m3.bank.layout` (and the embedding shards' in `m3.bank.embeddings`).

`m3.bank.open.open_bank(folder)` opens the shards as one store (`ShardedStore`, read-only)
with the index and the embedder. An interrupted build resumes: each shard is reopened in
append mode and only the references it lacks are encoded; a shard is marked complete after
its last write.

The recipe's `bank:` section sets the stored dtype, the batch size, the index and the vector
quantizer. A quantized bank's shards keep codes and decode on read (`HDF5Store(quantizer=)`):
the quantizer is trained before encoding starts, on the memories of `bank.train_references`
references sampled uniformly with the recipe's seed (paper §3.3), or read from
`bank.quantizer_file`; it is saved as `quantizer.pt` first, so that a resumed build and every
rank (Lightning's launcher starts the other ranks after it is saved) use the same one.

Cold start (memories encoded when first retrieved, then kept) is
`m3.backends.cold_start.ColdStartStore`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import torch
from torch import nn

from m3.backends.base import MemoryIndex, StoreInfo
from m3.backends.hdf5_store import HDF5Store
from m3.core import registry
from m3.core.errors import UserError
from m3.core.references import Reference
from m3.data.chunking import iter_references
from m3.memory.encoder import MemoryEncoder, encode_references
from m3.model.memory3 import Memory3

if TYPE_CHECKING:
    from m3.data.chunking import Chunker
    from m3.data.tokenizer import Tokenizer
    from m3.memory.quantize import MemoryQuantizer
    from m3.recipes import Recipe
    from m3.retrieval.embedders import Embedder

from m3.backends.hdf5_salvage import interrupted_writer
from m3.bank.embeddings import embed_references, fit_embedder
from m3.bank.inputs import (
    BuildInputs,
    bank_problems,
    knowledge_fingerprint,
    open_shard,
    read_manifest,
    shard_problem,
)
from m3.bank.knowledge import KnowledgeBase, KnowledgeDocuments, empty_knowledge
from m3.bank.layers import collect_garbage, edited_ids, replay_edits
from m3.bank.layout import (
    EDIT_JOURNAL,
    EDIT_LAYERS,
    MANIFEST,
    QUANTIZER,
    TABLE,
    layered_edits,
    shard_name,
)
from m3.bank.table import TABLE_MANIFEST, ReferenceTable, write_table
from m3.bank.vectors import EMBEDDINGS, finish_embeddings, index_from_shards, new_index
from m3.bank.writer import BankEncoder, BankWriter, PendingReferences
from m3.recipes.defaults import default_spec


def _folder_bytes(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def build_index(
    references: Sequence[Reference],
    tokenizer: Tokenizer,
    embedder: Embedder,
    *,
    batch_size: int = 1024,
    progress: bool = True,
    index: Any = None,
) -> MemoryIndex:
    """Fit the embedder on the references' texts, embed them and build an index, in one process.

    The continual stage's pairing builds its index this way; `m3 build-memory` embeds per
    rank instead (`m3.bank.embeddings`) and builds the same index from the shards.

    Args:
        references: Every reference (id = position).
        tokenizer: Decodes each reference's token ids to its text.
        embedder: Fitted here on the texts, then embeds them.
        batch_size: Texts embedded at a time.
        progress: Show tqdm progress bars.
        index: The index's component spec (kind `index`, `dim` set to the embedder's), e.g.
            a recipe's `bank.index`; None for the default.

    Returns:
        The index, built: by default an `ExactIndex` (or a `ScannIndex` above
        `SCANN_ABOVE` references).
    """
    from tqdm.auto import tqdm

    # texts are decoded a batch at a time, never all at once: the fit streams over them
    embedder.fit(tokenizer.decode(r.ids) for r in references)
    spec = index if index is not None else default_spec("index", references=len(references))
    index = new_index(spec, embedder)
    for start in tqdm(
        range(0, len(references), batch_size), desc="embedding references", disable=not progress
    ):
        part = [tokenizer.decode(r.ids) for r in references[start : start + batch_size]]
        ids = torch.arange(start, start + len(part), dtype=torch.long)
        index.add(embedder.embed(part), ids)
    index.build()
    return index


def build_memory(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    batch_size: int | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    shard: tuple[int, int] | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> Path:
    """Build the memory bank a recipe describes (`stage: build_memory`).

    Args:
        recipe: A checked recipe with `data.knowledge`, a tokenizer and
            `training.init_weights`.
        overwrite: Replace a bank folder that another recipe wrote.
        batch_size: References per forward pass; the recipe's `bank.batch_size` (64) when
            None.
        dtype: The dtype the shards store keys and values in (decode them to, when
            quantized); the recipe's `bank.dtype` (float32) when None.
        shard: `(rank, world_size)`: write only this shard (ranks launched by hand, without
            a distributed strategy). The index is built by whichever run finds every shard
            complete.
        callbacks: More Lightning callbacks for the predict run.

    Returns:
        The bank folder.

    Raises:
        UserError: For a recipe that cannot build (no knowledge base, tokenizer or weights;
            an empty knowledge base; a folder of another recipe; a quantizer that cannot be
            trained on the sampled memories).
    """
    if recipe.stage != "build_memory":
        raise UserError(f"stage: m3 build-memory runs 'build_memory' stages, got {recipe.stage!r}")
    if recipe.data is None or not recipe.data.knowledge:
        raise UserError("data.knowledge: name the knowledge base's sources")
    if recipe.tokenizer is None:
        raise UserError("tokenizer: building a memory bank needs the tokenizer")
    init = recipe.training.init_weights
    if init is None:
        raise UserError(
            "training.init_weights: name the weights that write the memories (a stage's "
            "model.pt, a .ckpt or a Hugging Face folder)"
        )
    if not Path(init).exists():
        raise UserError(f"training.init_weights: {init} does not exist (train the model first?)")
    from m3.core.runs import RunFolder
    from m3.model.checkpoints import load_weights
    from m3.recipes import BankSection, build, build_tokenizer, build_trainer

    settings = recipe.bank or BankSection()
    batch_size = settings.batch_size if batch_size is None else batch_size
    dtype = settings.dtype if dtype is None else dtype
    config = recipe.model.config()
    tokenizer = build_tokenizer(recipe)
    run = RunFolder(recipe.output, recipe.to_dict(), recipe.to_yaml())
    if (run.path / EDIT_JOURNAL).is_dir() and not overwrite:
        raise UserError(
            f"{run.path} has an interrupted edit: finish it with m3 edit {run.path} --resume"
        )
    model = Memory3(config)
    load_weights(model, init)
    chunker, encoder = build(recipe, "chunker"), build(recipe, "encoder")
    sparsifier, embedder = build(recipe, "sparsifier"), build(recipe, "embedder")
    sources = [registry.instantiate("source", s) for s in recipe.data.knowledge]
    documents = KnowledgeDocuments(sources)  # streamed: read again by every pass
    digest = documents.check(tokenizer, chunker)
    if not documents.has_text:
        raise empty_knowledge(sources, documents.skipped)
    table_folder = run.path / TABLE
    if run.complete and not overwrite:
        inputs = BuildInputs(
            knowledge=_knowledge_of(table_folder, documents, digest, tokenizer, chunker),
            tokenizer=tokenizer.fingerprint(),
            model=model.memory_fingerprint(),
        )
        if not _reopen_if_unsound(run.path, inputs):
            print(f"m3 build-memory: {run.path} is complete for this recipe; nothing to do")
            return run.path
    if not overwrite:
        _check_edits_kept(run.path)
    options = recipe.trainer.to_kwargs()
    keep = ("accelerator", "devices", "num_nodes", "strategy", "precision",
            "enable_progress_bar", "deterministic")  # fmt: skip

    def make_trainer(writer: L.Callback | None) -> L.Trainer:
        return build_trainer(
            {k: v for k, v in options.items() if k in keep},
            default_root_dir=run.path,
            logger=False,
            enable_checkpointing=False,
            use_distributed_sampler=False,
            callbacks=[*([writer] if writer else []), *callbacks],
        )

    make_trainer(None)  # before the claim: Lightning refuses some options only here
    if overwrite:
        _start_again(run.path, shard)
    run.claim(overwrite=overwrite)  # everything above is checked: now the folder is ours
    # the references, cut once into the bank's reference table (m3.bank.table) and read by
    # id from there on, by every rank
    rank, world_size = shard or _launched_rank()
    table = write_table(
        table_folder, documents, tokenizer, chunker=chunker, skipped=documents.skipped,
        rank=rank, world=world_size, digest=digest, count=documents.documents,
    )  # fmt: skip
    if len(table) == 0:
        raise empty_knowledge(sources, table.skipped)
    knowledge = KnowledgeBase(table, table.documents, table.skipped)
    inputs = BuildInputs(
        knowledge=table.knowledge, tokenizer=tokenizer.fingerprint(),
        model=model.memory_fingerprint(),
    )  # fmt: skip
    prefix = tokenizer.reference_prefix()
    info = StoreInfo(
        memory_shape=config.memory_shape,
        dtype=dtype,
        model_config=config.to_dict(),
        model_fingerprint=inputs.model,
        tokenizer_fingerprint=inputs.tokenizer,
        reference_prefix=tuple(prefix),
        extra={"references": len(table), "knowledge": inputs.knowledge},
    )
    writer = BankWriter(run.path, info, table, shard=shard)
    trainer = make_trainer(writer)
    # trained (or read) into the folder, so after the claim
    writer.quantizer = bank_quantizer(
        recipe, run.path, model, knowledge.references, prefix=prefix, encoder=encoder,
        sparsifier=sparsifier, batch_size=batch_size,
    )  # fmt: skip
    quantizer = writer.quantizer
    encoding = BankEncoder(model, prefix, encoder=encoder, sparsifier=sparsifier)
    start = _now()
    with warnings.catch_warnings():
        # the writer gets each batch's reference ids in the prediction itself
        warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
        trainer.predict(
            encoding,
            datamodule=PendingReferences(writer, batch_size=batch_size),
            return_predictions=False,
        )
    seconds = _now() - start
    writer.finish_shard(trainer)  # also when nothing was left to encode (no predict loop ran)
    # each rank embeds its own references into embedding shards (m3.bank.embeddings)
    rank, world_size = writer.rank_and_size(trainer)
    fit_embedder(
        embedder, table, tokenizer, run.path / EMBEDDINGS, rank=rank, world=world_size,
        barrier=trainer.strategy.barrier if trainer.world_size > 1 else None,
        progress=recipe.trainer.enable_progress_bar,
    )  # fmt: skip
    embedded = embed_references(make_trainer, embedder, table, tokenizer,
                                run.path / EMBEDDINGS, shard=shard)  # fmt: skip
    if trainer.world_size > 1:
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return run.path
    world = shard[1] if shard is not None else trainer.world_size
    return _finish(
        run,
        knowledge,
        world=world,
        tokenizer=tokenizer,
        embedder=embedder,
        embedder_spec=recipe.to_dict().get("embedder"),
        index_spec=settings.index,
        quantizer=quantizer,
        inputs=inputs,
        written=writer.written,
        embedded=embedded,
        seconds=seconds,
        progress=recipe.trainer.enable_progress_bar,
    )


def bank_quantizer(
    recipe: Recipe,
    folder: Path,
    model: Memory3,
    references: Sequence[Reference],
    *,
    prefix: Sequence[int],
    encoder: MemoryEncoder | None = None,
    sparsifier: nn.Module | None = None,
    batch_size: int = 64,
) -> MemoryQuantizer | None:
    """The trained quantizer of a bank build, saved in the bank folder first.

    In order: the folder's `quantizer.pt` (a resumed build, or the rank that trained it);
    the recipe's `bank.quantizer_file`; or `bank.quantizer` trained on the memories of
    `bank.train_references` references drawn uniformly with the recipe's seed (encoded on a
    GPU when one is available and the trainer may use it). Keys and values get separately
    trained quantizers.

    Args:
        recipe: The build's recipe.
        folder: The bank folder (claimed by this build).
        model: The model whose memory layers encode.
        references: Every reference of the knowledge base (id = position).
        prefix: Ids of the `<s>Reference:` prefix.
        encoder: The encoder; `MemoryEncoder()` when None.
        sparsifier: The sparsifier; `TopKSparsifier(k=memory_tokens)` when None.
        batch_size: References per forward pass while sampling.

    Returns:
        The quantizer on the CPU, or None for a bank of raw memories.

    Raises:
        UserError: When the sampled memories are too few to train the quantizer (naming
            `bank.train_references`), or a saved quantizer does not fit the model.
    """
    from m3.memory.quantize import MemoryQuantizer
    from m3.recipes import bank_quantizer as recipe_quantizer

    saved = folder / QUANTIZER
    settings = recipe.bank
    if settings is None or (settings.quantizer is None and settings.quantizer_file is None):
        return None
    head_dim = model.config.head_dim
    if saved.is_file() or settings.quantizer_file is not None:
        path = saved if saved.is_file() else Path(str(settings.quantizer_file))
        quantizer = MemoryQuantizer.load(path)
        if quantizer.keys.dim != head_dim:
            raise UserError(
                f"bank.quantizer_file: {path} codes {quantizer.keys.dim}-dim vectors, the "
                f"model's head_dim is {head_dim}"
            )
        if not quantizer.fitted:
            raise UserError(f"bank.quantizer_file: {path} holds an untrained quantizer")
    else:
        quantizer = MemoryQuantizer(recipe_quantizer(recipe))
        generator = torch.Generator().manual_seed(recipe.seed)
        count = min(settings.train_references, len(references))
        ids = torch.randperm(len(references), generator=generator)[:count].sort().values
        use_gpu = torch.cuda.is_available() and recipe.trainer.accelerator in (
            "auto",
            "gpu",
            "cuda",
        )
        device = torch.device("cuda" if use_gpu else "cpu")
        model.to(device)
        with torch.no_grad():
            sample = encode_references(
                model, [references[i].ids for i in ids.tolist()], prefix=prefix,
                encoder=encoder, sparsifier=sparsifier, batch_size=batch_size,
            )  # fmt: skip
        model.to("cpu")
        try:
            quantizer.fit(sample, seed=recipe.seed)
        except UserError as error:
            raise UserError(
                f"bank.quantizer: cannot train it on the memories of {count} sampled "
                f"references ({error}); raise bank.train_references or lower its bits"
            ) from None
        quantizer.keys.to("cpu")
        quantizer.values.to("cpu")
    if not saved.is_file():
        partial = saved.with_suffix(".partial")
        quantizer.save(partial)
        partial.replace(saved)  # a file that exists is whole
    return quantizer


def _launched_rank() -> tuple[int, int]:
    """This process's rank and the ranks started with it, before Lightning sets them up.

    torchrun sets `RANK`/`WORLD_SIZE`, `srun` `SLURM_PROCID`/`SLURM_NTASKS`; Lightning's own
    launcher starts the other ranks later (`LOCAL_RANK`), once the table is written. Any
    answer is safe: a table writer also writes the shards it finds missing.
    """
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), max(1, int(os.environ[world]))
    return int(os.environ.get("LOCAL_RANK", 0)), 1


def _start_again(folder: Path, shard: tuple[int, int] | None) -> None:
    """`--overwrite`: delete what an earlier build left, whoever wrote it.

    Only the process that launched the build deletes (Lightning starts the other ranks
    later, with `LOCAL_RANK` set, and they must not delete what rank 0 began); a rank
    launched by hand (`shard`) deletes its own shard and the bank-wide outputs only.
    """
    if not folder.exists() or int(os.environ.get("LOCAL_RANK", 0)) > 0:
        return
    if shard is None:
        shutil.rmtree(folder)
        return
    for name in (shard_name(shard[0]), shard_name(shard[0]) + ".writing", MANIFEST, "done.json"):
        (folder / name).unlink(missing_ok=True)
    for index in [folder / "index", folder / EDIT_LAYERS, *folder.glob("index-*")]:
        shutil.rmtree(index, ignore_errors=True)


def _knowledge_of(
    table: Path, documents: KnowledgeDocuments, digest: str, tokenizer: Tokenizer,
    chunker: Chunker,
) -> str:  # fmt: skip
    """The knowledge fingerprint of these inputs, without holding their references.

    The bank's table's when it was cut from them (`digest`, their `documents_fingerprint`,
    tells), else computed in one streaming pass (a bank built before the table, or a changed
    knowledge base).
    """
    if (table / TABLE_MANIFEST).is_file():
        try:
            opened = ReferenceTable(table)
        except UserError:
            opened = None
        if opened is not None and opened.manifest.get("documents_fingerprint") == digest:
            return opened.knowledge
    tokenized = ((d.id, tokenizer.encode(d.text) if d.text.strip() else []) for d in documents)
    return knowledge_fingerprint(iter_references(tokenized, chunker))


def _check_edits_kept(folder: Path) -> None:
    """Refuse to resume a build that would drop edits: it keeps only the ones it can replay.

    Raises:
        UserError: For edits made in place by an earlier m3, or edit layers that no
            readable manifest names (their removals are recorded there only).
    """
    try:
        manifest = read_manifest(folder)
    except UserError:
        if (folder / EDIT_LAYERS).is_dir() and any((folder / EDIT_LAYERS).glob("*.h5")):
            raise UserError(
                f"{folder / EDIT_LAYERS} holds edits, but {folder / MANIFEST}, which records "
                "what they removed, is missing or damaged: they cannot be replayed. Move "
                f"{EDIT_LAYERS}/ aside and run again to rebuild the bank as built, then make "
                "the edits again (or --overwrite)"
            ) from None
        return
    if any(not edit.get("layer") for edit in manifest.get("edits", [])):
        raise UserError(
            f"{folder} was edited in place by an earlier m3 (manifest.json 'edits'): "
            "rebuilding it would drop those edits. Rebuild with --overwrite and make the "
            "edits again"
        )
    for edit in layered_edits(manifest):
        problem = shard_problem(folder / edit["layer"], len(edit["written"]))
        if problem is not None:
            raise UserError(
                f"{problem}: it holds an edit (replacing {edit['replaced']}, deleting "
                f"{edit['deleted']}) that a build cannot restore. Rebuild with --overwrite "
                "and make the edits again"
            )


def _reopen_if_unsound(folder: Path, inputs: BuildInputs) -> bool:
    """Whether a finished bank must be built again, made ready to resume when it must.

    Refused when its inputs changed. A bank whose files are missing or damaged is resumed:
    its `done.json` is removed, and a shard that cannot be opened is moved aside
    (`.damaged`), so that the build encodes what is missing, salvages interrupted shards and
    indexes again.

    Raises:
        UserError: Naming every input that changed since the bank was built.
    """
    changed, damaged = bank_problems(folder, inputs)
    if changed:
        raise UserError(
            f"{folder} is complete for this recipe, but "
            + "; ".join(changed)
            + ": pass --overwrite to build it again"
        )
    if not damaged:
        return False
    _check_edits_kept(folder)  # before the bank stops reading as complete
    print(
        f"m3 build-memory: {folder} is not whole ({'; '.join(damaged)}): resuming",
        file=sys.stderr,
    )
    (folder / "done.json").unlink()
    for path in folder.glob("store-rank*.h5"):
        if interrupted_writer(path) is None and isinstance(open_shard(path), str):
            path.replace(path.with_name(path.name + ".damaged"))  # kept for a post-mortem
    return True


def _now() -> float:
    import time

    return time.perf_counter()


def _finish(
    run: Any,
    knowledge: KnowledgeBase,
    *,
    world: int,
    tokenizer: Tokenizer,
    embedder: Embedder,
    embedder_spec: Any,
    index_spec: Any = None,
    quantizer: MemoryQuantizer | None = None,
    inputs: BuildInputs,
    written: int,
    embedded: int = 0,
    seconds: float,
    progress: bool,
) -> Path:
    """Index the bank and write its manifest and `done.json` once every shard is complete."""
    folder: Path = run.path
    shards = []
    for rank in range(world):
        path = folder / shard_name(rank)
        if not path.exists():
            print(f"m3 build-memory: shard {rank} of {world} is not written yet")
            return folder
        store = HDF5Store(path, mode="r", allow_incomplete=True)
        complete, count, info = store.complete, len(store), store.info
        store.close()
        if not complete:
            print(f"m3 build-memory: shard {rank} of {world} is not complete yet")
            return folder
        shards.append({"file": path.name, "references": count})
    previous = read_manifest(folder) if (folder / MANIFEST).is_file() else {}
    edits = layered_edits(previous)  # a resumed bank keeps its edits (checked at the start)
    vectors = finish_embeddings(folder / EMBEDDINGS, knowledge.references, embedder)
    if vectors is None:  # another rank's embedding shards are not written yet
        return folder
    count = len(knowledge.references)
    index = new_index(index_spec or default_spec("index", references=count), embedder)
    saved = index_from_shards(index, vectors, folder / "index")
    if edits:
        replay_edits(folder, edits, index, tokenizer, embedder)
    if edits or not saved:
        index.save(folder / "index")
    if hasattr(embedder, "save"):
        embedder.save(folder / "embedder")
    manifest = {
        "format": "m3.bank",
        "format_version": 1,
        "references": len(knowledge.references),
        "world_size": world,
        "shards": shards,
        "model_fingerprint": info.model_fingerprint,
        "tokenizer_fingerprint": info.tokenizer_fingerprint,
        "reference_prefix": list(info.reference_prefix),
        "memory_shape": list(info.memory_shape),
        "dtype": info.dtype,
        "quantizer": None
        if quantizer is None
        else {"file": QUANTIZER, **quantizer.store_description()},
        "embedder": {
            "class": registry.identity(type(embedder)),
            "fingerprint": embedder.fingerprint(),
            "spec": embedder_spec,
        },
        "index": {"class": registry.identity(type(index))},
        "embeddings": {"path": EMBEDDINGS, "shards": len(vectors.shards)},
        "built_from": inputs.to_dict(),
        "saved": ["index"] + (["embedder"] if hasattr(embedder, "save") else []),
    }
    if edits:
        served = edited_ids(np.arange(len(knowledge.references)), edits)
        manifest.update(references=len(served), next_id=previous["next_id"], edits=edits)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    collect_garbage(folder, manifest)  # indexes of earlier edits, unfinished edits' layers
    outputs = [folder / s["file"] for s in shards]
    outputs += [folder / "index", folder / "embedder", folder / QUANTIZER, folder / EMBEDDINGS]
    summary = {
        "stage": "build_memory",
        "documents": knowledge.documents,
        "references": len(knowledge.references),
        "skipped": knowledge.skipped,
        "encoded_this_run": written,
        "embedded_this_run": embedded,
        "bytes_written": _folder_bytes(outputs),
        "store_bytes": _folder_bytes(outputs[: len(shards)]),
        "references_per_second": round(written / seconds, 1) if seconds > 0 and written else None,
    }
    run.finish(summary)
    print(
        f"m3 build-memory: bank in {folder}: {summary['documents']} documents, "
        f"{summary['references']} references ({written} encoded in this run), "
        f"{summary['skipped']} documents skipped, {summary['bytes_written']:,} bytes written "
        f"({summary['store_bytes']:,} in the store)",
        flush=True,
    )
    return folder
