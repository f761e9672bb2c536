"""Run folders: where a stage writes its outputs, and how m3 knows they are complete.

A stage claims its folder with the recipe that runs it: the folder keeps `recipe.yaml` and a
fingerprint of the recipe. Running the same recipe again finds its outputs and continues or
skips; a folder written by another recipe is never overwritten unless asked. A stage is
complete only once `done.json` is written, after its last output.

A stage claims its folder only once everything that can fail on the user's input is checked
(the recipe, the weights, the text: `m3 fit` reads and checks its data with
`TextDataModule.read_data`, `m3 build-memory` reads its knowledge base, both before
`claim`): a refused run leaves no claimed folder, so that the corrected recipe runs without
`--overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from m3.core.errors import UserError

#: (section, option) pairs added to the schema after run folders were fingerprinted
_ADDED_OPTIONS = (
    ("retrieval", "min_score"),
    ("evaluation", "generation"),
    ("data", "distractors"),
    ("data", "previous_share"),
)


def recipe_fingerprint(recipe_dict: dict[str, Any]) -> str:
    """A sha256 digest of a recipe's plain values (what its outputs depend on).

    Args:
        recipe_dict: `Recipe.to_dict()`.

    Returns:
        The hex digest.
    """
    # the description and the progress bar change no output
    keep = {k: v for k, v in recipe_dict.items() if k != "description"}
    # sections added after runs were fingerprinted count only when set
    for section in ("retrieval", "generation", "bank", "world", "evaluation", "lm_eval", "stages"):
        if keep.get(section, "set") is None:
            del keep[section]
    # options added after runs were fingerprinted count only when set, likewise
    for section, key in _ADDED_OPTIONS:
        if isinstance(keep.get(section), dict) and keep[section].get(key, "set") is None:
            keep[section] = {k: v for k, v in keep[section].items() if k != key}
    trainer = dict(keep.get("trainer") or {})
    trainer.pop("enable_progress_bar", None)
    keep["trainer"] = trainer
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def process_alive(pid: int) -> bool:
    """Whether a process of this machine runs with this pid (a writer that left a marker).

    Args:
        pid: The process id.

    Returns:
        True when it runs, another user's process included.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunFolder:
    """The output folder of one stage.

    Args:
        path: The folder.
        recipe_dict: The recipe that runs the stage, as plain values.
        recipe_yaml: The same recipe as YAML, kept in the folder for people to read.
    """

    def __init__(self, path: str | Path, recipe_dict: dict[str, Any], recipe_yaml: str) -> None:
        self.path = Path(path)
        self.fingerprint = recipe_fingerprint(recipe_dict)
        self.recipe_yaml = recipe_yaml

    @property
    def done_file(self) -> Path:
        """The marker written last, when the stage completed."""
        return self.path / "done.json"

    @property
    def complete(self) -> bool:
        """Whether the stage completed with this recipe."""
        if not self.done_file.is_file():
            return False
        return json.loads(self.done_file.read_text()).get("fingerprint") == self.fingerprint

    def claim(self, *, overwrite: bool = False) -> None:
        """Make the folder this recipe's, refusing one that another recipe wrote.

        Call it after the checks of the user's input (see the module's docstring): a claimed
        folder refuses every other recipe until `--overwrite`.

        Args:
            overwrite: Delete a folder written by another recipe instead of refusing.

        Raises:
            UserError: When the folder holds another recipe's outputs and `overwrite` is False.
        """
        marker = self.path / "fingerprint"
        if marker.is_file() and marker.read_text().strip() != self.fingerprint:
            if not overwrite:
                raise UserError(
                    f"{self.path} holds the outputs of another recipe (see its recipe.yaml); "
                    "choose another output folder, or pass --overwrite to replace them"
                )
            shutil.rmtree(self.path)
        elif not marker.is_file() and self.path.is_dir() and any(self.path.iterdir()):
            if not overwrite:
                raise UserError(
                    f"{self.path} is not empty and was not written by m3; choose another "
                    "output folder, or pass --overwrite to replace it"
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "recipe.yaml").write_text(self.recipe_yaml)
        marker.write_text(self.fingerprint + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the stage complete (written after every other output).

        Args:
            summary: What the stage wants to record (JSON-serialisable).
        """
        self.done_file.write_text(
            json.dumps({"fingerprint": self.fingerprint, **summary}, indent=2)
        )
