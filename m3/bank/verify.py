"""`m3 verify BANK`: check every byte of a bank that can be checked, and repair it.

`verify_bank` reads the whole bank: every shard's and every edit layer's rows against
their crc32 and its slot table against the rows (`HDF5Store.verify`), the provenance
against its checksum, the shard each reference lives in (`id % world_size == rank`), the
index's ids against the ids the bank serves, the manifest against the files, and the
fingerprints the files record against the manifest's, and every embedding shard
(`m3.bank.vectors`) against its crc32. `repair_bank` then rebuilds exactly the damaged
references: it salvages shards whose writer died, deletes the damaged rows and embedding
shards and resumes the bank's own build, which encodes and embeds what is missing, indexes
again and keeps the bank's edits.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3.backends.base import CorruptReferenceError
from m3.backends.hdf5_salvage import interrupted_writer
from m3.backends.hdf5_store import HDF5Store
from m3.bank.inputs import bank_problems, read_manifest
from m3.bank.layers import edited_ids
from m3.bank.layout import DONE, EDIT_JOURNAL, SHARD_FILE, TABLE, index_path, layered_edits
from m3.bank.table import ReferenceTable
from m3.bank.vectors import EMBEDDINGS, bank_embeddings, shard_name
from m3.core import registry
from m3.core.errors import UserError


@dataclass
class BankReport:
    """What `verify_bank` found.

    Attributes:
        folder: The bank folder.
        references: References the manifest lists.
        checked: References whose rows and provenance were read and checked.
        damaged: Ids of references whose bytes fail a check, or that are missing, ascending.
        problems: Everything else that is wrong, one sentence each.
    """

    folder: Path
    references: int = 0
    checked: int = 0
    damaged: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check held."""
        return not self.damaged and not self.problems

    def summary(self) -> str:
        """The report as lines of text, for people."""
        lines = [
            f"m3 verify: {self.folder}: {self.checked} of {self.references} references "
            f"checked, {len(self.damaged)} damaged or missing, {len(self.problems)} other "
            "problems"
        ]
        lines += [f"  - {problem}" for problem in self.problems]
        if self.damaged:
            shown = ", ".join(map(str, self.damaged[:20]))
            more = f" (and {len(self.damaged) - 20} more)" if len(self.damaged) > 20 else ""
            lines.append(f"  damaged reference ids: {shown}{more}")
        lines.append("  all checks hold" if self.ok else "  run m3 verify --repair to rebuild")
        return "\n".join(lines)


def verify_bank(folder: str | Path, *, progress: bool = True) -> BankReport:
    """Check a bank that `m3 build-memory` wrote, reading all of it.

    Args:
        folder: The bank folder.
        progress: Show a progress bar over the shards.

    Returns:
        The report; `ok` only when every check held.

    Raises:
        UserError: For a folder that holds no bank at all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such bank folder")
    report = BankReport(folder)
    if (folder / EDIT_JOURNAL).is_dir():
        report.problems.append(f"an edit was interrupted ({EDIT_JOURNAL}/ is left)")
    if not (folder / DONE).is_file():
        report.problems.append(f"{DONE} is missing: the build did not finish")
    _, damaged_files = bank_problems(folder)
    report.problems += damaged_files
    try:
        manifest = read_manifest(folder)
    except UserError:
        if not list(folder.glob("store-rank*.h5")):
            raise UserError(f"{folder} holds no memory bank (no manifest, no shards)") from None
        return report
    report.references = int(manifest["references"])
    world = int(manifest.get("world_size", len(manifest["shards"])))
    stored, broken = [], []
    for shard in tqdm(manifest["shards"], desc="verifying shards", disable=not progress):
        path = folder / shard["file"]
        if not path.is_file() or interrupted_writer(path) is not None:
            continue  # named by bank_problems; its references count as missing below
        ids, damaged = _verify_file(path, manifest, report, world=world)
        stored.append(ids)
        broken.append(damaged)
    served = np.concatenate(stored) if stored else np.zeros(0, dtype=np.int64)
    sound = np.setdiff1d(served, np.concatenate(broken) if broken else served[:0])
    if any(not edit.get("layer") for edit in manifest.get("edits", [])):
        expected = served  # edited in place by an earlier m3: the shards' ids are the bank's
    else:
        expected = np.arange(sum(int(shard["references"]) for shard in manifest["shards"]))
    for edit in layered_edits(manifest):
        path = folder / edit["layer"]
        ids = damaged = np.zeros(0, dtype=np.int64)
        if path.is_file() and interrupted_writer(path) is None:
            ids, damaged = _verify_file(path, manifest, report)
            if set(ids.tolist()) != set(edit["written"]):
                report.problems.append(f"{edit['layer']} does not hold the ids its edit wrote")
        gone = np.concatenate([np.asarray(edit["removed"], dtype=np.int64), edit["written"]])
        sound = np.union1d(np.setdiff1d(sound, gone), np.setdiff1d(ids, damaged))
    expected = edited_ids(expected, layered_edits(manifest))
    if len(expected) != report.references:
        report.problems.append(
            f"the manifest lists {report.references} references, its shards and edits give "
            f"{len(expected)}"
        )
    report.damaged = np.setdiff1d(expected, sound).tolist()
    _verify_index(folder, manifest, expected, report)
    _verify_table(folder, manifest, report)
    _verify_embeddings(folder, manifest, report)
    return report


def _verify_embeddings(folder: Path, manifest: dict, report: BankReport) -> None:
    """Read every embedding shard against its crc32 and the manifest's embedder."""
    shards = bank_embeddings(folder, manifest)
    if shards is None or isinstance(shards, str):
        return  # a bank built before the shards, or named by bank_problems
    for problem in shards.problems(checksums=True).values():
        if problem not in report.problems:
            report.problems.append(problem)
    embedder = (manifest.get("embedder") or {}).get("fingerprint")
    if embedder is not None and shards.manifest.get("embedder") != embedder:
        report.problems.append(f"{EMBEDDINGS}/ holds the vectors of another embedder")
    built = (manifest.get("built_from") or {}).get("knowledge")
    if built is not None and shards.manifest.get("knowledge") != built:
        report.problems.append(f"{EMBEDDINGS}/ holds the vectors of another knowledge base")


def _verify_table(folder: Path, manifest: dict, report: BankReport) -> None:
    """Check the reference table against the manifest (a bank built before it has none)."""
    if not (folder / TABLE).exists():
        return
    try:
        table = ReferenceTable(folder / TABLE)
    except UserError as error:
        report.problems.append(f"{TABLE}/: {error}")
        return
    built = (manifest.get("built_from") or {}).get("knowledge")
    if built is not None and table.knowledge != built:
        report.problems.append(f"{TABLE}/ holds the references of another knowledge base")


def _verify_file(
    path: Path, manifest: dict, report: BankReport, *, world: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Check a shard's (without `world`, an edit layer's) rows, placement and fingerprints.

    Returns its ids and its damaged ids.
    """
    none = np.zeros(0, dtype=np.int64)
    try:
        store = HDF5Store(path, mode="r", allow_incomplete=True, verify_reads="always")
    except (UserError, CorruptReferenceError, OSError):
        return none, none  # named by bank_problems
    try:
        ids = store.ids().numpy()
        damaged = np.asarray(store.verify(), dtype=np.int64)
        info = store.info
    except CorruptReferenceError as error:
        report.problems.append(f"{path.name}: {error}")
        return none, none
    finally:
        store.close()
    report.checked += len(ids)
    for key in ("model_fingerprint", "tokenizer_fingerprint"):
        if key in manifest and getattr(info, key) != manifest[key]:
            report.problems.append(f"{path.name}: its {key} is not the manifest's")
    recorded = (manifest.get("quantizer") or {}).get("fingerprint")
    if (info.quantizer or {}).get("fingerprint") != recorded:
        report.problems.append(f"{path.name}: its quantizer is not the manifest's")
    if world is None:  # an edit's layer: its texts are the edit's, placed by nothing
        return ids, damaged
    match = SHARD_FILE.search(path.name)
    rank = int(match.group(1)) if match else 0
    elsewhere = ids[ids % world != rank]
    if len(elsewhere):
        report.problems.append(
            f"{path.name} holds {len(elsewhere)} references of another rank (e.g. "
            f"{int(elsewhere[0])})"
        )
    built = (manifest.get("built_from") or {}).get("knowledge")
    if built is not None and info.extra.get("knowledge", built) != built:
        report.problems.append(f"{path.name} was built from another knowledge base")
    return ids, damaged


def _verify_index(folder: Path, manifest: dict, expected: np.ndarray, report: BankReport) -> None:
    """Check that the index holds exactly the ids the bank serves."""
    name = index_path(manifest)
    index_folder = folder / name
    if not index_folder.is_dir():
        return  # named by bank_problems
    try:
        index = registry.class_of(manifest["index"]["class"], "index").load(index_folder)
    except Exception as error:  # any failure to load is the finding itself
        report.problems.append(f"{name}/ cannot be loaded ({type(error).__name__}: {error})")
        return
    try:
        _check_index(name, index, manifest, expected, report)
    finally:
        if hasattr(index, "close"):
            index.close()


def _check_index(
    name: str, index: Any, manifest: dict, expected: np.ndarray, report: BankReport
) -> None:
    recorded = getattr(index, "embedder_fingerprint", "")  # an index that records its embedder
    built = (manifest.get("embedder") or {}).get("fingerprint")
    if recorded and built and recorded != built:
        report.problems.append(
            f"{name}/ holds the vectors of another embedder ({recorded[:12]}, the bank's is "
            f"{built[:12]})"
        )
    try:
        ids = index.ids().numpy()
    except NotImplementedError:
        if len(index) != len(expected):
            report.problems.append(
                f"{name}/ holds {len(index)} vectors, the bank serves {len(expected)}"
            )
        return
    extra, absent = np.setdiff1d(ids, expected), np.setdiff1d(expected, ids)
    if len(extra) or len(absent):
        report.problems.append(
            f"{name}/ and the bank disagree: {len(absent)} references not indexed, "
            f"{len(extra)} indexed ids the bank does not serve"
        )


def repair_bank(folder: str | Path) -> None:
    """Rebuild the damaged references of a bank, then index it again.

    Each shard is opened to write, which salvages one whose writer died; the rows that fail
    their checks are deleted; then the build that the bank folder's own `recipe.yaml`
    describes resumes: it encodes exactly what is missing, marks the shards complete and
    indexes again, with the bank's edits applied. An edit's layer is not rebuilt (its texts
    are the edit's, not the knowledge base's): a damaged one is named, to edit again.

    Args:
        folder: The bank folder.

    Raises:
        UserError: When the folder's recipe cannot rebuild it (an interrupted edit, a
            recipe that writes elsewhere, a shard that cannot be opened, a damaged edit
            layer) or its inputs changed since the build.
    """
    from m3.bank.build import build_memory
    from m3.recipes import load_recipe

    folder = Path(folder)
    if (folder / EDIT_JOURNAL).is_dir():
        raise UserError(f"{folder}: finish the interrupted edit first: m3 edit {folder} --resume")
    recipe = load_recipe(folder / "recipe.yaml")
    if Path(recipe.output).resolve() != folder.resolve():
        raise UserError(
            f"{folder}/recipe.yaml writes to {recipe.output}: run m3 verify --repair on the "
            "folder from where the build ran (its output path is relative to there)"
        )
    for number, edit in enumerate(read_manifest(folder).get("edits", []), start=1):
        if edit.get("layer"):
            with HDF5Store(folder / edit["layer"], allow_incomplete=True) as layer:
                damaged = layer.verify()
            if damaged:
                raise UserError(
                    f"{folder / edit['layer']}: references {damaged[:10]} of edit {number} are "
                    f"damaged; make that edit again (it replaced {edit['replaced']}) to write "
                    "them anew, then repair"
                )
    for path in sorted(folder.glob("store-rank*.h5")):
        try:
            store = HDF5Store(path, mode="a")  # salvages a shard whose writer died
        except (UserError, CorruptReferenceError) as error:
            raise UserError(
                f"{path} cannot be opened ({error}): rebuild the bank with m3 build-memory "
                "--overwrite"
            ) from None
        try:
            damaged = store.verify()
            if damaged:
                store.delete(damaged)
        finally:
            store.close()
    shards = bank_embeddings(folder, read_manifest(folder))
    if shards is not None and not isinstance(shards, str):
        for n in shards.problems(checksums=True):  # embedded again by the resumed build
            shutil.rmtree(shards.folder / shard_name(n), ignore_errors=True)
    (folder / DONE).unlink(missing_ok=True)
    build_memory(recipe)


def verify_and_report(folder: str | Path, *, repair: bool = False) -> bool:
    """`m3 verify`: check a bank, print the report; with `repair`, rebuild and check again.

    Args:
        folder: The bank folder.
        repair: Rebuild the damaged references (`repair_bank`) when a check fails.

    Returns:
        Whether every check holds in the end.
    """
    report = verify_bank(folder)
    print(report.summary())
    if repair and not report.ok:
        repair_bank(folder)
        report = verify_bank(folder)
        print(report.summary())
    return report.ok
