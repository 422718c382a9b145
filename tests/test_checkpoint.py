from __future__ import annotations

import os
import pickle

import pytest
import torch

from lmexp.engine import checkpoint
from lmexp.engine.checkpoint import CheckpointError

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


def payload() -> dict:
    return {
        "model": {"w": torch.arange(6.0)},
        "epoch": 2,
        "vocab": ["a", "b"],
        "rng": checkpoint.rng_state(),
    }


def test_roundtrip_restores_tensors_plain_data_and_rng(tmp_path):
    path = tmp_path / "last.pt"
    state = payload()
    checkpoint.save(path, state)
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0))
    assert loaded["epoch"] == 2 and loaded["vocab"] == ["a", "b"]
    expected = torch.rand(3)
    checkpoint.set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_truncated_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, payload())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{path} is corrupt .*truncated or altered"):
        checkpoint.load(path)


def test_altered_byte_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, payload())
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoint.load(path)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/lmexp-pwned-marker"


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    foreign = tmp_path / "evil.pt"
    foreign.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="is not an lmexp checkpoint"):
        checkpoint.load(foreign)
    # Even wrapped in a valid lmexp header with a matching digest, weights_only refuses it, and
    # the refusal names the global (where torch says which) but never torch's advice to retry
    # with weights_only=False. Protocol 2 is torch.save's; torch names no global for protocol 4.
    import hashlib

    for protocol, detail in ((2, f" (it would import {os.system.__module__}.system)"), (4, "")):
        body = pickle.dumps(Exploit(), protocol=protocol)
        wrapped = tmp_path / "wrapped.pt"
        wrapped.write_bytes(
            checkpoint.MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body
        )
        with pytest.raises(CheckpointError) as refused:
            checkpoint.load(wrapped)
        assert str(refused.value) == (
            f"{wrapped} was refused: it holds something other than tensors and plain data"
            f"{detail}; pass a checkpoint or model.pt written by lmexp.train."
        )
        assert "weights_only" not in str(refused.value)
    assert not os.path.exists(MARKER)


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist; check trainer\.ckpt_path"):
        checkpoint.load(tmp_path / "nope.pt")


def test_exported_model_pt_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    """An exported model.pt has no header, so torch.load(weights_only=True) is its only guard."""
    if os.path.exists(MARKER):
        os.remove(MARKER)
    folder = tmp_path / "model"
    checkpoint.export(folder, {"w": torch.arange(6.0)}, {"model": {}}, ["a", "<unk>"])
    assert checkpoint.load_any(folder / "model.pt")["vocab"] == ["a", "<unk>"]
    torch.save({"w": Exploit()}, folder / "model.pt")  # a zip file, as torch.save writes
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load_model(folder / "model.pt")
    assert str(refused.value) == (
        f"{folder / 'model.pt'} was refused: it holds something other than tensors and plain "
        f"data (it would import {os.system.__module__}.system); pass a checkpoint or model.pt "
        "written by lmexp.train."
    )
    assert not os.path.exists(MARKER)


def _exported(folder):
    """A real (tiny) model, exported as lmexp.train exports one."""
    from dataclasses import asdict

    from lmexp.config import DropoutConfig, ModelConfig
    from lmexp.models.rnn import RNNLanguageModel

    model_cfg, dropout_cfg = ModelConfig(hidden_size=8, num_layers=1), DropoutConfig()
    model = RNNLanguageModel.from_config(model_cfg, dropout_cfg, 5)
    config = {"model": asdict(model_cfg), "dropout": asdict(dropout_cfg)}
    checkpoint.export(folder, model.state_dict(), config, ["a", "b", "c", "d", "<unk>"])
    return folder / "model.pt"


def test_a_folder_given_as_a_checkpoint_is_called_a_folder(tmp_path):
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_any(tmp_path)
    assert str(err.value) == (
        f"Checkpoint {tmp_path} is a folder; pass a file in it (checkpoints/last.pt or best.pt, "
        "or model/model.pt)."
    )


def test_a_hand_damaged_config_json_is_one_sentence_naming_it(tmp_path):
    path = _exported(tmp_path / "model")
    assert checkpoint.load_model(path)[1][-1] == "<unk>"
    config = path.with_name("config.json")
    good = config.read_text()
    config.write_text(good[:-5])  # broken JSON
    with pytest.raises(CheckpointError, match=rf"^{config} is not valid JSON \(.*line"):
        checkpoint.load_model(path)
    config.write_text(good.replace('"hidden_size": 8', '"hidden_size": "8"'))  # a wrong type
    with pytest.raises(
        CheckpointError,
        match=rf"^{path}: its config does not describe an lmexp model \(TypeError: .*\); pass",
    ):
        checkpoint.load_model(path)


def test_weights_that_do_not_fit_name_the_tensors(tmp_path):
    path = _exported(tmp_path / "model")
    config = path.with_name("config.json")
    config.write_text(config.read_text().replace('"hidden_size": 8', '"hidden_size": 16'))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_model(path)
    text = str(err.value)
    assert text.startswith(f"{path}: weights do not fit its own config (size mismatch for ")
    assert "embedding.weight: copying a param with shape torch.Size([5, 8])" in text
    assert "the shape in current model is torch.Size([5, 16])" in text and "more)." in text
