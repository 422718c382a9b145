from __future__ import annotations

import pytest
import torch
from torch import nn

from lmexp.config import DropoutConfig
from lmexp.models.base import flatten_recurrent_weights
from lmexp.models.rnn import CELLS, RNNLanguageModel

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


def make(
    kind: str = "standard", keep: float = 0.5, tie: bool = False, cell: str = "lstm", **kw
) -> RNNLanguageModel:
    torch.manual_seed(0)
    dropout = DropoutConfig(kind=kind, dp_keep_prob=keep, **kw)
    return RNNLanguageModel(50, 16, 2, 0.1, dropout, tie, cell=cell)


def test_shapes_and_state_carry():
    model = make()
    tokens = torch.randint(0, 50, (7, 3))
    logits, (h, c) = model(tokens, model.init_state(3))
    assert logits.shape == (7, 3, 50) and h.shape == c.shape == (2, 3, 16)


@pytest.mark.parametrize("kind", ["standard", "variational", "weight_drop"])
def test_a_gru_has_one_state_tensor_carried_through_every_layout(kind):
    extra = {"weight_drop": 0.5} if kind == "weight_drop" else {}
    model = make("variational" if kind == "weight_drop" else kind, cell="gru", **extra)
    assert isinstance(model.rnn if kind == "standard" else model.layers[0], nn.GRU)
    tokens = torch.randint(0, 50, (7, 3))
    state = model.init_state(3)
    assert isinstance(state, torch.Tensor) and state.shape == (2, 3, 16)
    logits, state = model(tokens, state)
    assert logits.shape == (7, 3, 50) and state.shape == (2, 3, 16)
    again, _ = model.eval()(tokens[3:], model(tokens[:3], model.init_state(3))[1])
    torch.testing.assert_close(again, model(tokens, model.init_state(3))[0][3:])  # carried


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("kind", ["standard", "variational"])
def test_uniform_init_within_scale_and_recurrent_biases_zero(kind, cell):
    """TF's init: every LSTM bias zero (found by module type, so no name scheme hides one),
    everything else uniform in [-init_scale, init_scale]; for both layouts and both cells."""
    model = make(kind, cell=cell)
    biases = {
        id(p)
        for rnn in model.modules()
        if isinstance(rnn, nn.RNNBase)
        for name, p in rnn.named_parameters()
        if name.startswith("bias")
    }
    assert len(biases) == 2 * 2  # bias_ih and bias_hh of each of the two layers
    for name, p in model.named_parameters():
        if id(p) in biases:
            assert torch.count_nonzero(p) == 0, f"{kind}: LSTM bias {name} is not zero at init"
        else:
            assert p.abs().max() <= 0.1 and p.std() > 0.03, f"{kind}: {name} is not uniform"


def test_tied_weights_share_storage_and_drop_vocab_times_hidden_parameters():
    untied, tied = make(), make(tie=True)
    assert tied.decoder.weight.data_ptr() == tied.embedding.weight.data_ptr()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == 50 * 16


def lstm_layer_io(model: RNNLanguageModel, tokens: torch.Tensor) -> dict:
    """One forward of a variational model; what each layer received ("in", i) and returned
    ("out", i), as seen by hooks on model.layers."""
    seen = {}

    def record(key):
        def hook(_module, args, output=None):
            # A pre-hook gets the call's args, a forward hook also its output, (x, (h, c)).
            seen[key] = (args if output is None else output)[0].detach()

        return hook

    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_pre_hook(record(("in", i))))
        handles.append(layer.register_forward_hook(record(("out", i))))
    try:
        model(tokens, model.init_state(tokens.size(1)))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_variational_embedding_dropout_in_forward_is_one_mask_per_sequence():
    """Through the model's forward: sequence b repeats word b, so whatever varies over time in
    what reaches the first LSTM layer is the dropout mask, which must not vary."""
    model = make("variational", keep=1.0, keep_prob_embedding=0.5).train()
    tokens = torch.arange(8).repeat(12, 1)  # (12 steps, 8 sequences)
    torch.manual_seed(1)
    x = lstm_layer_io(model, tokens)["in", 0]
    emb = model.embedding(tokens).detach()
    kept = x != 0
    assert 0.3 < (~kept).float().mean() < 0.7, "no embedding dropout while training"
    torch.testing.assert_close(x[kept], emb[kept] / 0.5)  # kept features scaled by 1/keep
    for t in range(1, x.size(0)):
        assert torch.equal(kept[t], kept[0]), f"embedding dropout mask at step {t} != step 0"
    assert not torch.equal(kept[0, 0], kept[0, 1]), "two sequences got the same mask"


def test_variational_dropout_between_layers_in_forward():
    """Training: layer 1 sees layer 0's output with a per-sequence mask (zeros, the rest scaled
    by 1/keep); eval: it sees layer 0's output unchanged."""
    model = make("variational", keep=1.0, keep_prob_between=0.5).train()
    tokens = torch.randint(0, 50, (10, 6))
    torch.manual_seed(2)
    seen = lstm_layer_io(model, tokens)
    below, above = seen["out", 0], seen["in", 1]
    kept = above != 0
    assert 0.3 < (~kept).float().mean() < 0.7, "no dropout between layers 0 and 1 in training"
    torch.testing.assert_close(above[kept], below[kept] / 0.5)
    assert torch.equal(kept, kept[:1].expand_as(kept)), "between-layer mask varies over time"
    seen = lstm_layer_io(model.eval(), tokens)
    assert torch.equal(seen["in", 1], seen["out", 0]), "dropout between layers in eval mode"


def test_no_dropout_in_eval_mode():
    model = make("variational", keep=0.3)
    tokens = torch.randint(0, 50, (5, 2))
    model.eval()
    a, _ = model(tokens, model.init_state(2))
    b, _ = model(tokens, model.init_state(2))
    assert torch.equal(a, b)
    model.train()
    c, _ = model(tokens, model.init_state(2))
    assert not torch.equal(a, c)


def test_variational_keeps_separate_probabilities():
    model = make("variational", keep=0.5, keep_prob_embedding=0.9, keep_prob_output=0.6)
    assert (model.p_embedding, model.p_between, model.p_output) == pytest.approx((0.1, 0.5, 0.4))


def _zero_fraction(t: torch.Tensor) -> float:
    return (t == 0).float().mean().item()


@pytest.mark.parametrize("kind", ["standard", "variational"])
def test_weight_drop_drops_recurrent_weights_only_while_training(kind):
    """DropConnect: the gradient of a dropped hidden-to-hidden weight is exactly zero; about
    weight_drop of them are; the input weights and the stored weights are untouched."""
    model = make(kind, keep=1.0, weight_drop=0.5).train()
    lstms = list(model.layers) if kind == "variational" else [model.lstm]
    before = [w.detach().clone() for m in lstms for w in m.parameters()]
    tokens = torch.randint(0, 50, (20, 8))
    logits, _ = model(tokens, model.init_state(8))
    logits.square().sum().backward()
    for lstm in lstms:
        hh = [g for n, g in ((n, p.grad) for n, p in lstm.named_parameters()) if "weight_hh" in n]
        ih = [p.grad for n, p in lstm.named_parameters() if "weight_ih" in n]
        for grad in hh:
            assert 0.4 < _zero_fraction(grad) < 0.6
        for grad in ih:
            assert _zero_fraction(grad) < 0.05
    after = [w.detach() for m in lstms for w in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # Without weight drop almost no recurrent gradient entry is exactly zero.
    plain = make(kind, keep=1.0).train()
    logits, _ = plain(tokens, plain.init_state(8))
    logits.square().sum().backward()
    plain_lstm = plain.layers[0] if kind == "variational" else plain.lstm
    assert _zero_fraction(plain_lstm.weight_hh_l0.grad) < 0.05


def test_weight_drop_is_off_in_eval_and_fresh_each_training_batch():
    model, plain = make(keep=1.0, weight_drop=0.5), make(keep=1.0)
    tokens = torch.randint(0, 50, (6, 3))
    model.eval(), plain.eval()
    assert torch.equal(model(tokens, model.init_state(3))[0], plain(tokens, plain.init_state(3))[0])
    model.train()
    a, _ = model(tokens, model.init_state(3))
    b, _ = model(tokens, model.init_state(3))
    assert not torch.equal(a, b)  # a new mask per call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weight_drop_on_cuda_keeps_cudnn_and_leaks_no_warning():  # pragma: no cover - GPU only
    import warnings

    model = make(keep=1.0, weight_drop=0.5).cuda().train()
    flatten_recurrent_weights(model)
    tokens = torch.randint(0, 50, (20, 8), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a flatten_parameters warning would fail here
        for _ in range(3):
            model.zero_grad()
            logits, _ = model(tokens, model.init_state(8))
            logits.square().sum().backward()
    assert 0.4 < _zero_fraction(model.lstm.weight_hh_l0.grad) < 0.6
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval uses the flat weights as they are
        model(tokens, model.init_state(8))


def test_layers_of_different_sizes_keep_one_state_padded_to_the_widest():
    """AWD-LSTM's shape (embedding 6 here, hidden 16, the tied last layer giving 6): the state
    is (layers, batch, 16), the last layer's units in its first 6 columns and zeros after, so
    that checkpoints, detach and the rest of lmexp handle it as any other state."""
    from lmexp.models.rnn import layer_sizes

    assert layer_sizes(1150, 3, 400, tie_weights=True) == [(400, 1150), (1150, 1150), (1150, 400)]
    assert layer_sizes(1150, 3, 400, tie_weights=False) == [(400, 1150), (1150, 1150), (1150, 1150)]
    torch.manual_seed(0)
    model = RNNLanguageModel(
        30, 16, 3, 0.1, DropoutConfig(kind="variational"), tie_weights=True, embedding_size=6
    )
    assert model.decoder.weight is model.embedding.weight and model.embedding.weight.shape == (
        30,
        6,
    )
    logits, (h, c) = model(torch.randint(0, 30, (5, 2)), model.init_state(2))
    assert logits.shape == (5, 2, 30) and h.shape == c.shape == (3, 2, 16)
    assert torch.equal(h[2, :, 6:], torch.zeros(2, 10)) and h[2, :, :6].abs().sum() > 0
    # each layer gets its state contiguous, as cuDNN requires (a column slice is not)
    from lmexp.models.rnn import layer_state

    assert all(s.is_contiguous() for s in layer_state((h, c), 2, 6))
    with pytest.raises(ValueError, match="one module per layer"):
        RNNLanguageModel(30, 16, 3, 0.1, DropoutConfig(kind="standard"), embedding_size=6)
