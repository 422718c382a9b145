"""Language-model architectures: one recurrent network (lmexp.models.rnn), its cell chosen by name."""
