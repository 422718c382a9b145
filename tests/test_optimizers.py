"""The optimizer seam (lmexp.optim.optimizers): every optimizer trains through the same step, and its state
(and the fp16 grad scaler's) survives a checkpoint exactly."""

from __future__ import annotations

import pytest
import torch

from lmexp.config import DropoutConfig, OptimizerConfig
from lmexp.data import batchify, tiny_corpus, windows
from lmexp.engine import checkpoint
from lmexp.engine.loop import TrainStep
from lmexp.models.rnn import RNNLanguageModel
from lmexp.optim.optimizers import OPTIMIZERS, FusedSGD, build_optimizer

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit

CORPUS = tiny_corpus(50, 20000, 2000, 1234)
DATA = batchify(CORPUS.train, 10)

# Each optimizer with settings that make its state matter (momentum, ASGD's average, Adam's
# moments), and an lr it learns with.
SETTINGS = {
    "fused_sgd": (OptimizerConfig(kind="fused_sgd"), 1.0),
    "sgd": (OptimizerConfig(kind="sgd", momentum=0.9, weight_decay=1e-4), 0.5),
    "asgd": (OptimizerConfig(kind="asgd", weight_decay=1.2e-6), 1.0),
    "nt_asgd": (OptimizerConfig(kind="nt_asgd", weight_decay=1.2e-6), 1.0),
    "adam": (OptimizerConfig(kind="adam"), 0.003),
    "adamw": (OptimizerConfig(kind="adamw", weight_decay=0.01), 0.003),
}


def model_and_step(
    name: str, clip: float = 5.0, seed: int = 0
) -> tuple[RNNLanguageModel, TrainStep]:
    torch.manual_seed(seed)
    model = RNNLanguageModel(CORPUS.vocab_size, 24, 2, 0.1, DropoutConfig(kind="none"))
    settings, lr = SETTINGS[name]
    step = TrainStep(model, build_optimizer(model, settings, lr, clip), clip)
    if name == "nt_asgd":
        step.optimizer.switch()  # averaging from the start, so that there is state to carry
    return model, step


def train(step: TrainStep, model: RNNLanguageModel, start: int, stop: int, state=None):
    state = state if state is not None else model.init_state(10)
    for i, (x, y) in enumerate(windows(DATA, 10, drop_last=True, start=start), start=start):
        if i >= stop:
            break
        _, state = step(x, y, state)
    return state


def test_every_registered_optimizer_has_settings_here():
    assert set(SETTINGS) == set(OPTIMIZERS)


@pytest.mark.parametrize("clip", [5.0, 0.05])
def test_torch_sgd_through_the_step_trains_the_weights_fused_sgd_trains(clip):
    """optimizer=sgd (torch's SGD after clip_grad_norm_) and the fused default make the same
    update, with clipping active (0.05) and not (5.0): the step clips for torch's optimizers."""
    fused_model, fused = model_and_step("fused_sgd", clip)
    torch.manual_seed(0)
    model = RNNLanguageModel(CORPUS.vocab_size, 24, 2, 0.1, DropoutConfig(kind="none"))
    torch_sgd = TrainStep(
        model, build_optimizer(model, OptimizerConfig(kind="sgd"), 1.0, clip), clip
    )
    train(fused, fused_model, 0, 6)
    train(torch_sgd, model, 0, 6)
    assert fused_model.embedding.sparse and not model.embedding.sparse
    for (name, a), (_, b) in zip(
        fused_model.named_parameters(), model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_only_an_optimizer_that_takes_sparse_gradients_gets_a_sparse_embedding():
    for name in OPTIMIZERS:
        model, _ = model_and_step(name)
        assert model.embedding.sparse is (name == "fused_sgd"), name


@pytest.mark.parametrize("name", list(SETTINGS))
def test_step_state_through_a_checkpoint_continues_exactly(name, tmp_path):
    """5 batches, a checkpoint file of the step's state (weights_only load), a fresh model and
    step from it, 5 more batches: the same weights and optimizer state, bit for bit, as 10
    batches straight."""
    straight_model, straight = model_and_step(name)
    train(straight, straight_model, 0, 10)

    model, step = model_and_step(name)
    hidden = train(step, model, 0, 5)
    path = tmp_path / "last.pt"
    checkpoint.save(
        path, {"model": model.state_dict(), "step": step.state_dict(), "state": list(hidden)}
    )
    saved = checkpoint.load(path)
    resumed_model, resumed = model_and_step(name, seed=1)  # other initial weights: all restored
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["step"])
    train(resumed, resumed_model, 5, 10, tuple(saved["state"]))

    for (key, a), (_, b) in zip(
        straight_model.state_dict().items(), resumed_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key
    want, got = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert want["param_groups"] == got["param_groups"]
    assert want["state"].keys() == got["state"].keys()
    for index, values in want["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got["state"][index][key])), (
                index,
                key,
            )
    if name != "fused_sgd":  # a stateful optimizer: there was state to carry
        assert want["state"]


def test_the_fp16_grad_scaler_state_goes_through_a_checkpoint(tmp_path):
    """fp16 runs on CUDA only (the CPU has no fp16 LSTM), but what a checkpoint keeps of its
    grad scaler is checked here: a scale backed off and a growth count carry over."""

    def fp16_step() -> TrainStep:
        model = RNNLanguageModel(CORPUS.vocab_size, 8, 1, 0.1)
        return TrainStep(model, FusedSGD(model.parameters(), 1.0, 5.0), 5.0, precision="fp16")

    step = fp16_step()
    step.scaler.scale(torch.ones(()))  # the scaler's first use sets up its scale
    step.scaler.update(new_scale=512.0)  # as after overflows backed it off
    step.scaler._growth_tracker.fill_(7)  # seven good steps since
    checkpoint.save(tmp_path / "last.pt", {"step": step.state_dict()})
    resumed = fp16_step()
    resumed.load_state_dict(checkpoint.load(tmp_path / "last.pt")["step"])
    assert resumed.scaler.state_dict() == step.scaler.state_dict()
    assert resumed.scaler.state_dict()["scale"] == 512.0
    assert resumed.scaler.state_dict()["_growth_tracker"] == 7


def test_set_lr_reaches_the_optimizer():
    _, step = model_and_step("adam")
    step.set_lr(0.25)
    assert [g["lr"] for g in step.optimizer.param_groups] == [0.25]
