"""The MLflow pyfunc model lmexp.train logs: "models from code", so nothing is pickled.

MLflow copies this file into the logged model and runs it to load the model. The network is
lmexp's own code, shipped with the logged model (its `code/` folder: lmexp/config.py and the
lmexp/models package, which import nothing but torch), so no architecture is written twice and
anyone with MLflow, torch and pandas can use a logged model, with or without lmexp installed:

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    model.predict(["w1 w2 w3\\n", "the company said\\n"])  # DataFrame: perplexity, tokens, unknown
    model.predict(["the company"], params={"mode": "generate", "words": 30, "seed": 1})

Perplexity: each row is scored as `lmexp.evaluate MODEL --text FILE` scores a file holding it:
words split on white space, each line break read as <eos>, words outside the vocabulary read as
<unk>, every token after the first predicted from all those before it. Generation samples as
`lmexp.generate` does, and gives the same text for the same prompt, words, temperature, top_k
and seed. The artifacts are the exported folder's files (model.pt, config.json, vocab.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from torch.nn import functional as F

EOS, UNK = "<eos>", "<unk>"
# predict's params and their defaults (lmexp.generate's); the logged signature declares them.
PARAMS: dict[str, Any] = {
    "mode": "perplexity",
    "words": 50,
    "temperature": 1.0,
    "top_k": 0,
    "seed": 0,
}


class LanguageModel(mlflow.pyfunc.PythonModel):
    """Per-row perplexity (the default) or generated text (params mode="generate")."""

    def load_context(self, context: Any) -> None:
        config = json.loads(Path(context.artifacts["config"]).read_text())
        self.vocab = json.loads(Path(context.artifacts["vocab"]).read_text())
        self.index = {word: i for i, word in enumerate(self.vocab)}
        weights = torch.load(context.artifacts["model"], map_location="cpu", weights_only=True)
        # From the code shipped with the model (code_paths), first on sys.path when it loads.
        from lmexp.config import DropoutConfig, ModelConfig
        from lmexp.models import build_model

        self.model = build_model(
            ModelConfig(**config["model"]), DropoutConfig(**config["dropout"]), len(self.vocab)
        )
        self.model.load_state_dict(weights)
        self.model.eval()
        # A row is read in the windows lmexp.evaluate reads (the state carried on): a model that
        # attends over a window (a Transformer) scores the same words alike only in the same ones.
        self.window = int(config["trainer"]["eval_num_steps"])

    # model_input: pd.DataFrame, a hint MLflow derives no schema from (the signature says what
    # predict takes) and converts a list or Series to, in a one-column frame.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        params = {**PARAMS, **(params or {})}
        rows = rows_of(model_input)
        if params["mode"] == "generate":
            return pd.DataFrame(
                {"text": [self.generate(row, **generation(params)) for row in rows]}
            )
        scores = [self.perplexity(row) for row in rows]
        return pd.DataFrame(scores, columns=["perplexity", "tokens", "unknown"])

    def encode(self, words: list[str]) -> torch.Tensor:
        unk = self.index[UNK]
        return torch.tensor([self.index.get(w, unk) for w in words], dtype=torch.long)

    @torch.no_grad()
    def perplexity(self, text: str) -> tuple[float, int, int]:
        """(perplexity, tokens scored, words outside the vocabulary) of one row."""
        words = tokenize(text)
        tokens = self.encode(words).view(-1, 1)
        loss_sum, state = torch.zeros((), dtype=torch.float64), self.model.init_state(1)
        for start in range(0, max(len(words) - 1, 0), self.window):
            window = tokens[start : start + self.window + 1]
            logits, state = self.model(window[:-1], state)
            loss_sum += F.cross_entropy(
                logits.view(-1, logits.size(-1)), window[1:].view(-1), reduction="sum"
            )
        count = max(len(words) - 1, 0)
        ppl = torch.exp(loss_sum / count).item() if count else float("nan")
        return ppl, count, sum(1 for w in words if w not in self.index)

    @torch.no_grad()
    def generate(self, prompt: str, words: int, temperature: float, top_k: int, seed: int) -> str:
        """The prompt and `words` sampled words; <eos> becomes a line break (as lmexp.generate)."""
        generator = torch.Generator().manual_seed(seed)
        prompt_words = tokenize(prompt)
        prompt_tokens = self.encode(prompt_words or [EOS]).view(-1, 1)
        logits, state = self.model(prompt_tokens, self.model.init_state(1))
        out = []
        for _ in range(words):
            scores = logits[-1, 0].float() / temperature
            if 0 < top_k < scores.numel():
                kth = torch.topk(scores, top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            index = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)
            out.append(self.vocab[int(index)])
            logits, state = self.model(index.view(1, 1), state)
        return " ".join(prompt_words + out).replace(f" {EOS} ", "\n").replace(EOS, "\n")


def tokenize(text: str) -> list[str]:
    """PTB's reading: split on white space, <eos> at each line end (as lmexp.data.tokenize)."""
    return text.replace("\n", f" {EOS} ").split()


def rows_of(model_input: Any) -> list[str]:
    """The text rows of a DataFrame (its first column), a Series, a list, or one string."""
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.iloc[:, 0]
    if isinstance(model_input, str):
        model_input = [model_input]
    return [str(row) for row in model_input]


def generation(params: dict[str, Any]) -> dict[str, Any]:
    """Generation settings from predict's params, with lmexp.generate's defaults."""
    given = {**PARAMS, **params}
    settings = {
        "words": int(given["words"]),
        "temperature": float(given["temperature"]),
        "top_k": int(given["top_k"]),
        "seed": int(given["seed"]),
    }
    if settings["words"] < 1 or not 0 < settings["temperature"] < math.inf or settings["top_k"] < 0:
        raise ValueError("words must be >= 1, temperature a finite number > 0 and top_k >= 0.")
    return settings


def signature() -> Any:
    """Input: texts (one unnamed string column, so a list, a Series or a one-column DataFrame
    all pass); params: PARAMS, as MLflow passes on only the params a signature declares."""
    from mlflow.models import infer_signature

    return infer_signature(["w1 w2\n"], params=PARAMS)


mlflow.models.set_model(LanguageModel())
