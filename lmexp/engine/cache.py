"""The continuous cache pointer (Grave et al. 2017; awd-lstm-lm's pointer.py) over a trained model.

The model's last-layer features h_i of the previous `window` positions are kept with the word that
followed each. At position t the pointer attends to them, softmax(theta * h_t . h_i), and puts that
weight on the words that followed; the word's probability is `lambd` times the pointer's plus
(1 - lambd) times the model's. Only the model's `features` and `decoder` are used, so any model
that exposes them (every lmexp architecture) gets a cache without training.

One difference from pointer.py, on purpose: it mixes in the pointer only once `window` positions
are stored; here the pointer is used from the second position on, over the positions there are
(Grave et al.'s definition). Over PTB's 82k test words the two differ in the first 500 only.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lmexp.data.batching import windows


@torch.no_grad()
def cache_evaluate(
    model: nn.Module,
    data: torch.Tensor,
    num_steps: int,
    window: int,
    theta: float,
    lambd: float,
) -> tuple[float, int]:
    """Summed NLL and token count over every token of `data` (time-major, batched), each token
    scored by the model mixed with its cache; each column of a batch keeps a cache of its own."""
    model.eval()
    batch = data.size(1)
    state = model.init_state(batch)
    keys: torch.Tensor | None = None  # (stored, batch, features): h_i of earlier positions
    words = data.new_zeros((0, batch))  # (stored, batch): the word that followed each
    loss_sum = torch.zeros((), device=data.device, dtype=torch.float64)
    tokens = 0
    for inputs, targets in windows(data, num_steps, drop_last=False):
        features, state = model.features(inputs, state)
        features = features.float()
        log_probs = F.log_softmax(model.decoder(features).float(), dim=-1)
        log_p = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (steps, batch)
        if keys is None:
            keys = features.new_zeros((0, batch, features.size(-1)))
        keys, words = torch.cat([keys, features]), torch.cat([words, targets])
        if lambd > 0 and window > 0:
            log_p = _mix(log_p, keys, words, targets, window, theta, lambd)
        keys, words = (
            keys[-window:] if window else keys[:0],
            words[-window:] if window else words[:0],
        )
        loss_sum -= log_p.sum(dtype=torch.float64)
        tokens += targets.numel()
    return loss_sum.item(), tokens


def _mix(
    log_p: torch.Tensor,
    keys: torch.Tensor,
    words: torch.Tensor,
    targets: torch.Tensor,
    window: int,
    theta: float,
    lambd: float,
) -> torch.Tensor:
    """log(lambd * p_cache + (1 - lambd) * p_model) of each target; the model's alone where a
    position has no earlier one stored. keys and words end with this window's `steps` positions."""
    steps, stored = targets.size(0), keys.size(0)
    queries = keys[-steps:]  # this window's own features
    scores = theta * torch.einsum("tbh,sbh->bts", queries, keys)  # (batch, steps, stored)
    position = torch.arange(stored - steps, stored, device=keys.device).unsqueeze(1)  # query's
    earlier = torch.arange(stored, device=keys.device).unsqueeze(0)
    allowed = (earlier < position) & (earlier >= position - window)  # (steps, stored)
    attention = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    same_word = words.t().unsqueeze(1) == targets.t().unsqueeze(2)  # (batch, steps, stored)
    p_cache = (attention * same_word).sum(-1).t()  # (steps, batch); NaN where nothing allowed
    mixed = torch.logaddexp(math.log1p(-lambd) + log_p, math.log(lambd) + torch.log(p_cache))
    has_history = allowed.any(dim=1).unsqueeze(1)  # (steps, 1)
    return torch.where(has_history, mixed, log_p)
