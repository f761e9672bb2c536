"""Checkpoints' tokenizers as they come: the special tokens their files name, Qwen's missing BOS.

Each tokenizer here is built in the test with the `tokenizers` library, in the layout of a
real checkpoint family (special tokens at the same places, a `tokenizer_config.json` and
`special_tokens_map.json` with the same fields); none is downloaded. Where transformers is
installed, the BOS, EOS and pad ids m3 finds are compared with the ones transformers finds.

Assumptions about the real files, as far as they are known here: Llama 3 names
`<|begin_of_text|>` / `<|end_of_text|>` and no pad, and its post-processor adds the BOS;
TinyLlama has `<unk>`, `<s>`, `</s>` at ids 0-2, AddedToken objects in its files and pads
with `</s>`; SmolLM2 has `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` at ids 0-2, the
instruct model naming `<|im_start|>` / `<|im_end|>` (pad `<|im_end|>`) and the base model
`<|endoftext|>` for both BOS and EOS; Qwen2.5 and Qwen3 append their special tokens after the
vocabulary and set `"bos_token": null`.
"""

from __future__ import annotations

import json
import pydoc_data.topics
from pathlib import Path
from typing import Any

import pytest
from pretrained_families import bpe as family_bpe

from m3.cli import main
from m3.core.errors import UserError
from m3.data.tokenizer import MANIFEST, REFERENCE_TEXT, HFTokenizer, Tokenizer

tk = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "recipes/tiny/base.yaml")
WARMUP = str(ROOT / "recipes/tiny/warmup.yaml")
CORPUS = "\n".join(pydoc_data.topics.topics.values())[:40_000].splitlines()
TEXT = "Reference: déjà vu — 記憶 😀\n\tcode = f(x)  <s> <|begin_of_text|> <|endoftext|>"


def added(content: str) -> dict[str, Any]:
    """An AddedToken as transformers serialises one."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", "content": content, **flags}


def bpe(first: list[str], after: list[str] = (), adds_bos: str | None = None) -> Any:
    """A byte-level BPE with special tokens at ids 0.. (`first`) or after the vocabulary."""
    return family_bpe(CORPUS, first, after, adds_bos)


def checkpoint(folder: Path, hf: Any, config: dict | None, special_map: dict | None) -> Path:
    folder.mkdir(parents=True)
    hf.save(str(folder / "tokenizer.json"))
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        if data is not None:
            (folder / name).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return folder


FAST = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]

#: style -> how to build it, and the (bos, eos, pad) texts m3 must find (None: EOS pads).
STYLES: dict[str, tuple[dict[str, Any], tuple[str, str, str | None]]] = {
    "llama3": (
        {
            "first": [],
            "after": LLAMA3_SPECIALS,
            "adds_bos": "<|begin_of_text|>",
            "config": {
                **FAST,
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
                "model_max_length": 131072,
            },
            "special_map": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        },
        ("<|begin_of_text|>", "<|end_of_text|>", None),
    ),
    "tinyllama": (
        {
            "first": ["<unk>", "<s>", "</s>"],
            "adds_bos": "<s>",
            "config": {
                **FAST,
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": added("<s>"),
                "eos_token": added("</s>"),
                "unk_token": added("<unk>"),
                "pad_token": "</s>",
            },
            "special_map": {
                "bos_token": added("<s>"),
                "eos_token": added("</s>"),
                "unk_token": added("<unk>"),
                "pad_token": "</s>",
            },
        },
        ("<s>", "</s>", "</s>"),
    ),
    "smollm2-instruct": (
        {
            "first": SMOL_SPECIALS,
            "config": {
                **FAST,
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            },
            "special_map": None,
        },
        ("<|im_start|>", "<|im_end|>", "<|im_end|>"),
    ),
    "smollm2-base": (
        {
            "first": SMOL_SPECIALS,
            "config": {
                **FAST,
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            },
            "special_map": None,
        },
        ("<|endoftext|>", "<|endoftext|>", None),
    ),
    # an older checkpoint: the tokens only in special_tokens_map.json
    "legacy-map": (
        {
            "first": ["<unk>", "<s>", "</s>"],
            "config": {**FAST, "add_bos_token": True},
            "special_map": {"bos_token": added("<s>"), "eos_token": added("</s>")},
        },
        ("<s>", "</s>", None),
    ),
}

QWEN_CONFIG = {
    **FAST,
    "add_prefix_space": False,
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "errors": "replace",
    "split_special_tokens": False,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for style, (spec, _) in STYLES.items():
        hf = bpe(spec["first"], spec.get("after", ()), spec.get("adds_bos"))
        made[style] = checkpoint(root / style, hf, spec["config"], spec["special_map"])
    made["qwen"] = checkpoint(root / "qwen", bpe([], QWEN_SPECIALS), QWEN_CONFIG, None)
    return made


# --- what a checkpoint's files name --------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_finds_the_special_tokens_the_model_was_trained_with(folders, style) -> None:
    bos, eos, pad = STYLES[style][1]
    tok = HFTokenizer(str(folders[style]))
    ids = tok.backend.token_to_id
    assert (tok.bos_id, tok.eos_id) == (ids(bos), ids(eos))
    assert tok.pad_id == (ids(pad) if pad else tok.eos_id)
    # the file itself (not its folder) reads the same files beside it
    assert HFTokenizer(str(folders[style] / "tokenizer.json")).fingerprint() == tok.fingerprint()


@pytest.mark.parametrize("style", [*STYLES, "qwen"])
def test_the_ids_are_the_ones_transformers_finds(folders, style) -> None:
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(folders[style]))
    ours = HFTokenizer(
        str(folders[style]), **({"bos_token": "<|endoftext|>"} if style == "qwen" else {})
    )
    if style != "qwen":  # transformers has no BOS for Qwen; m3 has the one configured
        assert ours.bos_id == theirs.bos_token_id
    assert ours.eos_id == theirs.eos_token_id
    assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else ours.eos_id)
    assert ours.vocab_size == len(theirs)
    # m3's context is what transformers encodes with the tokenizer's own BOS: one BOS
    if STYLES.get(style, ({},))[0].get("adds_bos"):
        assert ours.reference_prefix() == theirs(REFERENCE_TEXT)["input_ids"]


@pytest.mark.parametrize("style", ["llama3", "tinyllama"])
def test_a_tokenizer_that_adds_a_bos_itself_gets_one_bos(folders, style) -> None:
    tok = HFTokenizer(str(folders[style]))
    # the post-processor would add one: m3 encodes without it and adds its own, once
    assert tok.backend.encode("Hello").ids[0] == tok.bos_id
    assert tok.bos_id not in tok.encode("Hello")
    prefix = tok.reference_prefix()
    assert prefix[0] == tok.bos_id and prefix.count(tok.bos_id) == 1
    assert prefix == [tok.bos_id, *tok.encode(REFERENCE_TEXT)]
    # the BOS's text inside a document is text
    assert tok.bos_id not in tok.encode("<|begin_of_text|> <s>")


@pytest.mark.parametrize("style", [*STYLES, "qwen"])
def test_round_trips_and_special_ids_decode_to_nothing(folders, style) -> None:
    tok = HFTokenizer(str(folders[style]), bos_token="<|endoftext|>") if style == "qwen" else None
    tok = tok or HFTokenizer(str(folders[style]))
    assert tok.decode(tok.encode(TEXT)) == TEXT
    specials = {tok.bos_id, tok.eos_id, tok.pad_id}
    assert not specials & set(tok.encode(TEXT))
    assert tok.decode(tok.reference_prefix()) == REFERENCE_TEXT
    assert tok.decode([tok.bos_id, *tok.encode("a b"), tok.eos_id, tok.pad_id]) == "a b"


@pytest.mark.parametrize("style", ["llama3", "tinyllama", "qwen"])
def test_save_and_load_keep_the_tokens_found(folders, style, tmp_path) -> None:
    tok = HFTokenizer(str(folders[style]), bos_token="<|endoftext|>") if style == "qwen" else None
    tok = tok or HFTokenizer(str(folders[style]))
    tok.save(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert "auto" not in manifest["init_args"].values()  # the texts found, not "auto"
    assert not (tmp_path / "tokenizer_config.json").exists()
    back = Tokenizer.load(tmp_path)
    assert back.fingerprint() == tok.fingerprint()
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_an_argument_wins_over_the_files(folders) -> None:
    tok = HFTokenizer(str(folders["smollm2-instruct"]), bos_token="<|endoftext|>", pad_token=None)
    ids = tok.backend.token_to_id
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        ids("<|endoftext|>"),
        ids("<|im_end|>"),
        ids("<|im_end|>"),
    )
    assert tok.fingerprint() != HFTokenizer(str(folders["smollm2-instruct"])).fingerprint()


@pytest.mark.parametrize("style", ["llama3", "tinyllama", "smollm2-base"])
def test_generation_can_end_where_the_eos_also_pads_or_begins(folders, style) -> None:
    import torch

    from m3.inference.generate import allowed_logits

    tok = HFTokenizer(str(folders[style]))
    assert tok.eos_id in {tok.pad_id, tok.bos_id}
    allowed = allowed_logits(torch.zeros(1, tok.vocab_size + 4), tok)[0]
    assert allowed[tok.eos_id] == 0
    ruled_out = {tok.bos_id, tok.pad_id} - {tok.eos_id}
    assert all(allowed[i] == -torch.inf for i in ruled_out)
    assert (allowed[tok.vocab_size :] == -torch.inf).all()


# --- a tokenizer with no BOS (Qwen2.5, Qwen3) -----------------------------------------------


def test_no_bos_is_refused_naming_the_file_the_field_and_the_option(folders) -> None:
    with pytest.raises(UserError) as info:
        HFTokenizer(str(folders["qwen"]))
    message = str(info.value)
    assert str(folders["qwen"] / "tokenizer_config.json") in message
    assert "bos_token is null" in message
    assert "tokenizer.init_args.bos_token" in message
    assert "'<|endoftext|>'" in message  # the suggested separator


def test_a_configured_token_starts_contexts_and_the_reference_prefix(folders) -> None:
    tok = HFTokenizer(str(folders["qwen"]), bos_token="<|endoftext|>")
    ids = tok.backend.token_to_id
    assert tok.bos_id == ids("<|endoftext|>") == tok.pad_id
    assert tok.eos_id == ids("<|im_end|>")
    assert tok.reference_prefix() == [ids("<|endoftext|>"), *tok.encode(REFERENCE_TEXT)]
    other = HFTokenizer(str(folders["qwen"]), bos_token="<|im_start|>")
    assert other.reference_prefix()[0] == ids("<|im_start|>")
    assert other.fingerprint() != tok.fingerprint()
    with pytest.raises(UserError, match="has no bos_token '<s>'"):
        HFTokenizer(str(folders["qwen"]), bos_token="<s>")


def test_bad_files_are_named_with_their_field(folders, tmp_path) -> None:
    hf = tk.Tokenizer.from_file(str(folders["llama3"] / "tokenizer.json"))
    unknown = checkpoint(tmp_path / "unknown", hf, {"bos_token": "<|begin|>"}, None)
    with pytest.raises(UserError) as info:
        HFTokenizer(str(unknown))
    assert str(unknown / "tokenizer_config.json") in str(info.value)
    assert "bos_token is '<|begin|>'" in str(info.value)
    no_eos = checkpoint(
        tmp_path / "no-eos", hf, {"bos_token": "<|begin_of_text|>", "eos_token": None}, None
    )
    with pytest.raises(UserError, match=r"eos_token is null.*tokenizer\.init_args\.eos_token"):
        HFTokenizer(str(no_eos))
    odd = checkpoint(tmp_path / "odd", hf, None, {"bos_token": {"lstrip": False}})
    with pytest.raises(UserError, match=r"special_tokens_map\.json.*bos_token is an object"):
        HFTokenizer(str(odd))
    broken = checkpoint(tmp_path / "broken", hf, None, None)
    (broken / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"tokenizer_config\.json' is not a JSON object"):
        HFTokenizer(str(broken))
    # no file names a BOS and the vocabulary has no <s>: the tokenizer file is named
    bare = checkpoint(tmp_path / "bare", hf, None, None)
    with pytest.raises(UserError, match="has no bos_token '<s>'") as info:
        HFTokenizer(str(bare))
    assert str(bare) in str(info.value)


# --- existing tokenizers keep their ids and fingerprints ------------------------------------


def test_m3s_own_bpe_reads_as_before(tmp_path, monkeypatch) -> None:
    import m3.data.tokenizer as module

    trained = HFTokenizer.train(CORPUS, vocab_size=300)
    trained.save(tmp_path / "saved")
    explicit = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    by_path = HFTokenizer(str(tmp_path / "saved"))
    assert by_path.fingerprint() == trained.fingerprint()
    assert by_path.fingerprint() == HFTokenizer(str(tmp_path / "saved"), **explicit).fingerprint()
    # a cache written with the defaults spelled out is the cache of the defaults
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    trainings = []
    untrained = module._untrained_bpe
    monkeypatch.setattr(module, "_untrained_bpe", lambda *a: trainings.append(a) or untrained(*a))
    args = {"train_files": [str(corpus)], "vocab_size": 300, "cache": str(tmp_path / "bpe")}
    first = HFTokenizer(**args, **explicit)
    again = HFTokenizer(**args)
    assert len(trainings) == 1 and again.fingerprint() == first.fingerprint()


# --- through a recipe and the command line --------------------------------------------------


def spec(folder: Path, **init_args: Any) -> str:
    component = {"class_path": "hf", "init_args": {"path": str(folder), **init_args}}
    return f"tokenizer={json.dumps(component)}"


def test_the_option_is_set_in_a_recipe(folders, capsys) -> None:
    from m3.recipes import build_tokenizer, load_recipe

    override = spec(folders["qwen"], bos_token="<|endoftext|>")
    assert main(["check", "-q", BASE, override, "model.vocab_size=512"]) == 0
    recipe = load_recipe(BASE, [override, "model.vocab_size=512"])
    tok = build_tokenizer(recipe)
    assert tok.bos_id == tok.backend.token_to_id("<|endoftext|>")
    assert main(["check", "-q", BASE, spec(folders["qwen"], bos_token=5)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.init_args.bos_token" in err and "Traceback" not in err


def test_bad_tokenizers_exit_2_and_write_nothing(folders, tmp_path, capsys) -> None:
    out = tmp_path / "never"
    fast = ["trainer.max_steps=1", "trainer.enable_progress_bar=false", f"output={out}"]
    assert main(["fit", BASE, WARMUP, spec(folders["qwen"]), "model.vocab_size=512", *fast]) == 2
    err = capsys.readouterr().err
    assert str(folders["qwen"] / "tokenizer_config.json") in err and "bos_token is null" in err
    assert "Traceback" not in err
    # more ids than the embedding table: named by field and file
    qwen = spec(folders["qwen"], bos_token="<|endoftext|>")
    assert main(["fit", BASE, WARMUP, qwen, "model.vocab_size=300", *fast]) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size is 300, but the tokenizer has" in err
    assert f"tokenizer.init_args.path: {folders['qwen']}" in err and "Traceback" not in err
    assert not out.exists()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under a folder, with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_no_bos_is_refused_by_build_memory_and_edit_before_they_write(
    folders, tmp_path, capsys
) -> None:
    """`m3 build-memory` and `m3 edit` with Qwen's tokenizer and no bos_token: exit 2, the
    file and field named, no bank folder claimed, an existing bank left as it was."""
    import torch

    from m3.model.memory3 import Memory3
    from m3.recipes import load_recipe

    bank_recipe = str(ROOT / "recipes/tiny/build-memory.yaml")
    small = ["model.n_layer=2", "model.reference_length=32", "model.vocab_size=512"]
    small += ["trainer.enable_progress_bar=false"]
    kb = tmp_path / "kb"
    kb.mkdir()
    for i, line in enumerate(CORPUS[:4]):
        (kb / f"doc{i}.txt").write_text(f"{line} The memory of document {i}.", encoding="utf-8")
    weights = tmp_path / "model.pt"
    torch.manual_seed(0)
    config = load_recipe([BASE, bank_recipe], small).model.config()
    torch.save(Memory3(config).state_dict(), weights)

    def args(out: Path, *extra: str) -> list[str]:
        return [
            BASE, bank_recipe, *small, f"output={out}", f"training.init_weights={weights}",
            f"data.knowledge=[{{class_path: files, init_args: {{paths: [{kb}]}}}}]", *extra,
        ]  # fmt: skip

    def refused(argv: list[str]) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(folders["qwen"] / "tokenizer_config.json") in err and "bos_token is null" in err
        assert "tokenizer.init_args.bos_token" in err
        assert err.count("m3: error:") == 1 and "Traceback" not in err

    never = tmp_path / "never"
    refused(["build-memory", *args(never, spec(folders["qwen"]))])
    assert not never.exists() and not never.with_name("never.partial").exists()

    bank = tmp_path / "bank"
    good = spec(folders["qwen"], bos_token="<|endoftext|>")
    assert main(["build-memory", *args(bank, good), "--batch-size", "8"]) == 0
    capsys.readouterr()
    before = snapshot(bank)
    replace = tmp_path / "replace.jsonl"
    replace.write_text(json.dumps({"id": "doc0.txt", "text": "A new text."}) + "\n")
    refused(["edit", *args(bank, spec(folders["qwen"])), "--replace", str(replace)])
    # the bank folder named alone, its recipe's bos_token taken back to the files' (none)
    auto = "tokenizer.init_args.bos_token=auto"
    refused(["edit", str(bank), auto, "--delete", "doc1.txt"])
    assert snapshot(bank) == before
