"""The LightningModule: schedules, both stages through the real Trainer, exact resumption."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from test_data import write_corpus

from m3.core.errors import UserError
from m3.data.chunking import FixedChunker
from m3.data.sources import FilesSource
from m3.data.tokenizer import ByteTokenizer
from m3.retrieval.embedders import HashedNgramEmbedder
from m3.training.datamodule import TextDataModule
from m3.training.module import Memory3Module, lr_multiplier

MODEL = {
    "preset": "tiny",
    "vocab_size": 260,
    "chunk_length": 32,
    "block_size": 64,
    "reference_length": 64,
}


def trainer(tmp_path, steps, **kwargs):
    kwargs.setdefault("enable_checkpointing", "callbacks" in kwargs)
    return L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
        limit_val_batches=0, deterministic=True, **kwargs,
    )  # fmt: skip


def data_module(tmp_path, *, continual=False, distractors=None):
    write_corpus(tmp_path)
    extra = {}
    if continual:
        extra = dict(
            knowledge=[FilesSource([tmp_path / "kb.jsonl"])],
            chunker=FixedChunker(64),
            embedder=HashedNgramEmbedder(dim=256),
            distractors=distractors,
        )
    train = [FilesSource([tmp_path / "train.txt"])]
    return TextDataModule(ByteTokenizer(), train, seq_length=64, batch_size=4, chunk_length=32,
                          val_fraction=0.1, **extra)  # fmt: skip


def test_schedules():
    wsd = [
        lr_multiplier(s, schedule="wsd", total_steps=100, warmup_steps=10, decay_fraction=0.2)
        for s in range(100)
    ]
    assert wsd[0] == pytest.approx(0.1) and wsd[9] == 1.0 and wsd[50] == 1.0 and wsd[79] == 1.0
    assert wsd[80] == 1.0 and wsd[90] == pytest.approx(0.5) and wsd[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in itertools.pairwise(wsd[10:]))
    cosine = [
        lr_multiplier(s, schedule="cosine", total_steps=100, warmup_steps=0, min_ratio=0.1)
        for s in range(101)
    ]
    assert (
        cosine[0] == 1.0 and cosine[50] == pytest.approx(0.55) and cosine[100] == pytest.approx(0.1)
    )


def test_warmup_stage_learns_and_resumes_exactly(tmp_path):
    L.seed_everything(0)
    module = Memory3Module(MODEL, lr=3e-3, warmup_steps=2)
    data = data_module(tmp_path)
    data.setup()
    with torch.no_grad():
        batch = next(iter(data.val_dataloader()))
        before = float(
            torch.nn.functional.cross_entropy(
                module(batch).flatten(0, 1), batch["tokens"][:, 1:].flatten()
            )
        )
    trainer(tmp_path / "full", 8).fit(module, datamodule=data)
    with torch.no_grad():
        after = float(
            torch.nn.functional.cross_entropy(
                module(batch).flatten(0, 1), batch["tokens"][:, 1:].flatten()
            )
        )
    assert after < before - 0.5

    # the same 8 steps, interrupted after 4 and resumed from the checkpoint written then
    L.seed_everything(0)
    saver = L.pytorch.callbacks.ModelCheckpoint(
        tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1
    )
    interrupted = Memory3Module(MODEL, lr=3e-3, warmup_steps=2)
    trainer(tmp_path / "a", 8, callbacks=[saver]).fit(interrupted, datamodule=data_module(tmp_path))
    resumed = Memory3Module(MODEL, lr=3e-3, warmup_steps=2)
    step4 = next((tmp_path / "ckpt").glob("*step=4*"))
    trainer(tmp_path / "b", 8).fit(resumed, datamodule=data_module(tmp_path), ckpt_path=step4)
    for (name, a), b in zip(
        interrupted.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    for (name, a), b in zip(
        module.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_continual_stage_trains_through_the_memories(tmp_path):
    prefix = ByteTokenizer().reference_prefix()
    data = data_module(tmp_path, continual=True)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert (batch["slots"] >= 0).any()
    grads = {}
    for encode in ("grad", "no_grad"):
        torch.manual_seed(0)
        module = Memory3Module(MODEL, stage="continual", reference_prefix=prefix, encode=encode)
        loss = torch.nn.functional.cross_entropy(
            module(batch).flatten(0, 1), batch["tokens"][:, 1:].flatten()
        )
        loss.backward()
        grads[encode] = module.model.layers[0].self_attn.v_proj.weight.grad.clone()
    # with gradients through the encoding, the memories add to the weights' gradient
    assert not torch.allclose(grads["grad"], grads["no_grad"])
    module = Memory3Module(
        MODEL, stage="continual", reference_prefix=prefix, lr=1e-3, warmup_steps=1
    )
    trainer(tmp_path / "cont", 2).fit(module, datamodule=data)
    assert module.trainer.global_step == 2


def test_every_chunk_reads_its_window_and_the_distractors_of_its_row(tmp_path):
    prefix = ByteTokenizer().reference_prefix()
    data = data_module(tmp_path, continual=True, distractors=2)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["shared"].any() and "shared" not in next(iter(data.val_dataloader()))
    module = Memory3Module(MODEL, stage="continual", reference_prefix=prefix, window=1)
    visible = module.memories_for(batch).visible  # (B, C, M)
    slots, shared = batch["slots"], batch["shared"]
    for b in range(slots.shape[0]):
        for c in range(slots.shape[1]):
            expected = shared[b].clone()
            if slots[b, c] >= 0:
                expected[slots[b, c]] = True
            assert torch.equal(visible[b, c], expected)
    # the distractors change what the model reads
    plain = {k: v for k, v in batch.items() if k != "shared"}
    with torch.no_grad():
        assert not torch.allclose(module(batch), module(plain))


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(UserError, match="reference_prefix"):
        Memory3Module(MODEL, stage="continual")
    with pytest.raises(UserError, match="stage must be"):
        Memory3Module(MODEL, stage="pretrain")
    with pytest.raises(UserError, match="checkpoint not found"):
        Memory3Module(MODEL, init_weights=str(tmp_path / "missing.ckpt"))
    torch.save(Memory3Module({**MODEL, "n_embd": 32}).model.state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"weight embed_tokens.weight has shape \(260, 32\)"):
        Memory3Module(MODEL, init_weights=str(tmp_path / "other.pt"))


def test_store_mode_reads_the_batch_memories_and_encodes_nothing(tmp_path):
    """Memories of the same weights, precomputed, give the logits of forward-only encoding."""
    from m3.memory.encoder import MemoryEncoder
    from m3.memory.sparsifier import TopKSparsifier

    prefix = ByteTokenizer().reference_prefix()
    data = data_module(tmp_path, continual=True)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    encoding = Memory3Module(MODEL, stage="continual", reference_prefix=prefix, encode="no_grad")
    store = Memory3Module(MODEL, stage="continual", reference_prefix=prefix, encode="store")
    store.load_state_dict(encoding.state_dict())
    with torch.no_grad():
        dense = MemoryEncoder()(
            encoding.model,
            batch["reference_tokens"],
            batch["reference_lengths"],
            prefix=encoding.prefix,
        )
        memory = TopKSparsifier(k=encoding.config.memory_tokens)(dense)
    precomputed = {k: v for k, v in batch.items() if not k.startswith("reference_")} | {
        "memory_keys": memory.keys, "memory_values": memory.values,
        "memory_valid": memory.valid, "memory_positions": memory.positions,
    }  # fmt: skip
    logits = store(precomputed)
    assert torch.allclose(logits, encoding(batch), atol=1e-5)
    logits.sum().backward()  # the memories are data: the weights still get gradients
    assert store.model.layers[0].self_attn.q_proj.weight.grad is not None
    with pytest.raises(UserError, match="encode='store' reads memories from a store"):
        store(batch)
    with pytest.raises(UserError, match="'grad', 'no_grad' or 'store'"):
        Memory3Module(MODEL, stage="continual", reference_prefix=prefix, encode="frozen")
