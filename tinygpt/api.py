"""The loaded model: config, params and tokenizer together, with conveniences for interactive use.

`weights/` reads files into plain data (config, params, tokenizer); `load` assembles them into a `Model`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import weights

from .compiled import forward
from .config import Config
from .errors import InputError


@dataclasses.dataclass
class Model:
    config: Config
    params: dict
    tokenizer: Any = None  # tinygpt.Tokenizer, or None for checkpoints without vocab.json/merges.txt
    source: str = ""

    def encode(self, text):
        """Token ids [1, seq] of a string; of a list of strings, (tokens, attention_mask), each [batch, seq], the
        shorter rows padded on the left (mask 0) as `forward` and `generate` take them. Needs a tokenizer."""
        tokenizer = self._tokenizer()
        if isinstance(text, str):
            return np.asarray([tokenizer.encode(text)], np.int32)
        return tokenizer.encode_batch(list(text))

    def decode(self, tokens) -> str | list[str]:
        """The text of token ids: [seq] or [1, seq] -> a string; [batch, seq] -> one string per row (padding
        included: drop it with the mask first)."""
        ids = np.asarray(tokens)
        if ids.ndim == 2 and ids.shape[0] != 1:
            return [self._tokenizer().decode(row.tolist()) for row in ids]
        return self._tokenizer().decode(ids.reshape(-1).tolist())

    def to_str_tokens(self, text_or_tokens) -> list[str]:
        """Each token's own text, e.g. ['RO', 'MEO', ':']: of a string (encoded first) or of ids [seq] / [1, seq]
        (TransformerLens' `to_str_tokens`)."""
        if isinstance(text_or_tokens, str):
            text_or_tokens = self.encode(text_or_tokens)
        return self._tokenizer().pieces(np.asarray(text_or_tokens).reshape(-1).tolist())

    def token_texts(self, tokens) -> list[str]:
        """Each id's own text for tables and plots: `to_str_tokens`, or `<id>` for a model without a tokenizer."""
        ids = np.asarray(tokens).reshape(-1).tolist()
        return self.to_str_tokens(ids) if self.tokenizer is not None else [f"<{i}>" for i in ids]

    def text(self, tokens) -> str:
        """The text of ids [seq] for display: `decode`, or the `<id>`s joined for a model without a tokenizer."""
        ids = np.asarray(tokens).reshape(-1).tolist()
        return self.decode(ids) if self.tokenizer is not None else " ".join(f"<{i}>" for i in ids)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise InputError(f"the model {self.source!r} has no tokenizer (no vocab.json/merges.txt); pass token ids")
        return self.tokenizer

    def __call__(self, tokens, **kwargs):
        """`tinygpt.forward(self.params, tokens, self.config, **kwargs)`; `tokens` may be a string."""
        if isinstance(tokens, str):
            tokens = self.encode(tokens)
        return forward(self.params, tokens, self.config, **kwargs)

    def show(self, value):
        """`value` (a probe result, a Trace) for display with this model's tokenizer: token ids show their text
        (`tinygpt.display.show`)."""
        from .display import show

        return show(value, self.tokenizer)

    def __repr__(self):
        from .params import n_params

        c = self.config
        return (f"Model({self.source or 'unnamed'}: {c.n_layer} layers, {c.n_head} heads, d_model {c.d_model}, "
                f"{n_params(self.params):,} params, dtype {self.params['wte'].dtype})")

    def _repr_html_(self) -> str:
        from .display import card, table_html
        from .params import n_params

        c, tok = self.config, self.tokenizer
        rows = [("source", self.source or "unnamed"), ("n_layer", c.n_layer), ("n_head", c.n_head),
                ("d_model", c.d_model), ("d_head", c.d_head), ("d_mlp", c.d_mlp), ("n_ctx", c.n_ctx),
                ("vocab", c.vocab_size), ("parameters", f"{n_params(self.params):,}"),
                ("dtype", str(self.params["wte"].dtype)),
                ("tokenizer", "none (pass token ids)" if tok is None else f"yes ({type(tok).__name__})")]
        return card(f"Model: {self.source or 'unnamed'}", f"GPT-2, {c.n_layer} layers, {c.n_head} heads",
                    [table_html(None, rows, labels=True)])


def load(name_or_path=None, **kwargs) -> Model:
    """The model `weights.load` reads (a hub id, a local directory, or None for the embedded default model;
    keyword arguments as it takes them: dtype, revision, cache_dir, offline, allow_nonfinite)."""
    config, params, tokenizer = weights.load(name_or_path, **kwargs)
    source = "embedded" if name_or_path is None else str(name_or_path)
    return Model(config=config, params=params, tokenizer=tokenizer, source=source)
