"""lmexp: an experiment and sweep harness for the word-level LSTM language model on Penn Treebank."""

__version__ = "0.1.0"
