"""Neuron polysemanticity: does an MLP neuron respond to one thing, or to many unrelated ones?

For the neuron (layer, index) over the token windows of a corpus:

- its top-k activating tokens, each with the context before it. The activation is `probes.memory`'s one
  definition (`neuron_activations`): mlp_post (after GELU) at the token, each window run from its first token,
  so it depends on the whole window before the token, not only on the context shown;
- the entropy (bits) of the token types at those k positions, and of the tokens just before them: 0 when the
  neuron fires on a single token type, log2(k) when every top context has a different one. For scale, the
  same entropy of k tokens drawn at random from the corpus (`random_entropy`);
- with a sparse autoencoder (`probes.sae`), the features that explain the neuron, ranked by the Pearson
  correlation of the feature's activation with the neuron's over the whole corpus. When the SAE reads this
  layer's mlp_post, each feature's share of the neuron's activation on the top contexts
  (sum of f_i W_dec[i, neuron] times the SAE's output scale: 1 / s, or per token for an SAE that normalises
  its input per token, as SAELens' constant_norm_rescale and layer_norm do; over the sum of the
  activations); when it reads the residual stream, the cosine of the feature's decoder row (of any norm)
  with the neuron's key, the residual direction the neuron reads
  (`probes.memory.residual_keys`: ln2_w * W_in[:, neuron], centred, since LayerNorm subtracts the mean).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tinygpt.config import Config
from tinygpt.display import displayable
from tinygpt.errors import InputError
from tinygpt.inputs import checks_tokens

from .harvest import check_layer, site_chunks, site_width
from .memory import neuron_activations, residual_keys
from .sae import SAE, SAEConfig, encode, input_normalization

RESID_SITES = ("resid_pre", "resid_mid", "resid_post")


@displayable
@dataclasses.dataclass
class Context:
    window: int
    position: int
    activation: float
    token: int
    previous: int | None  # the token before (None at a window's first position)
    context: list[int]  # up to `context` tokens ending with `token`


@displayable
@dataclasses.dataclass
class FeatureMatch:
    feature: int
    correlation: float  # Pearson correlation of the feature's activation with the neuron's, over the corpus
    share: float | None  # its share of the neuron's activation on the top contexts (SAEs on this mlp_post)
    key_cosine: float | None  # cosine of its decoder row with the neuron's key (SAEs on the residual stream)


@displayable
@dataclasses.dataclass
class NeuronReport:
    layer: int
    neuron: int
    n_tokens: int
    max_activation: float
    fire_rate: float  # fraction of tokens with activation > 0
    top: list[Context]
    token_entropy: float  # bits, over the token types at the top contexts
    previous_entropy: float  # bits, over the tokens just before them
    distinct_tokens: int
    distinct_previous: int
    random_entropy: float  # bits, the same entropy for as many random corpus tokens
    features: list[FeatureMatch]


def type_entropy(ids) -> float:
    """Entropy in bits of the empirical distribution of the ids' types."""
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    p = counts / counts.sum()
    return float((p * np.log2(1 / p)).sum())


def random_entropy(tokens, k: int, samples: int = 200, seed: int = 0) -> float:
    """Mean `type_entropy` of k tokens drawn without replacement from tokens [n]."""
    rng = np.random.default_rng(seed)
    tokens = np.asarray(tokens).reshape(-1)
    return float(np.mean([type_entropy(rng.choice(tokens, min(k, len(tokens)), replace=False))
                          for _ in range(samples)]))


_encode = jax.jit(encode, static_argnames="config")


@functools.partial(jax.jit, static_argnames="config")
def _correlation_sums(sae_params, x, a, config: SAEConfig):
    """Sums over rows for correlating feature activations f(x) [n, d_sae] with the neuron a [n]."""
    f = encode(sae_params, x, config)  # [n, d_sae]
    return f.sum(0), (f**2).sum(0), f.T @ a


@checks_tokens("windows")
def neuron_report(params, config: Config, windows, layer: int, neuron: int, *, k: int = 20, context: int = 8,
                  sae: SAE | None = None, n_features: int = 5, batch: int = 8) -> NeuronReport:
    """Top contexts, token-type entropies and (with an SAE) explaining features of MLP neuron (layer, neuron)
    over token windows [n_windows, seq]."""
    layer = check_layer(config, "mlp_post", layer)
    if not 0 <= neuron < config.d_mlp:
        raise InputError(f"neuron {neuron} is outside [0, d_mlp={config.d_mlp})")
    windows = np.asarray(windows, np.int32)
    if sae is not None:
        if sae.config.site is None:
            raise InputError("the SAE does not record the site it was trained on (SAEConfig.site)")
        check_layer(config, sae.config.site, sae.config.layer)
        if site_width(config, sae.config.site) != sae.config.d_in:
            raise InputError(f"the SAE reads {sae.config.d_in}-wide vectors, but {sae.config.site} of this model "
                             f"is {site_width(config, sae.config.site)} wide: it belongs to another model")
    same_site = sae is not None and (sae.config.site, sae.config.layer) == ("mlp_post", layer)

    activations = neuron_activations(params, config, windows, layer, neuron, batch=batch)  # [n_windows, seq]
    sums = None
    if sae is not None:
        for first, x in site_chunks(params, config, windows, sae.config.site, sae.config.layer, batch=batch):
            a = activations[first: first + len(x)]  # [batch, seq], the SAE's input x [batch, seq, d_in]
            chunk_sums = _correlation_sums(sae.params, x.reshape(-1, x.shape[-1]), a.reshape(-1), sae.config)
            sums = [np.asarray(s, np.float64) + (0 if sums is None else sums[i]) for i, s in enumerate(chunk_sums)]

    flat = activations.reshape(-1)
    top_rows = np.argsort(-flat, kind="stable")[:k]
    seq = windows.shape[1]
    top = []
    for row in top_rows:
        w, p = divmod(int(row), seq)
        top.append(Context(window=w, position=p, activation=float(flat[row]), token=int(windows[w, p]),
                           previous=int(windows[w, p - 1]) if p > 0 else None,
                           context=windows[w, max(0, p - context + 1): p + 1].tolist()))
    previous = [c.previous for c in top if c.previous is not None]

    features = []
    if sae is not None:
        features = _explaining_features(params, config, windows, layer, neuron, sae, sums, flat, top, n_features,
                                        same_site, batch)
    return NeuronReport(layer=layer, neuron=neuron, n_tokens=len(flat), max_activation=float(flat.max()),
                        fire_rate=float((flat > 0).mean()), top=top, token_entropy=type_entropy([c.token for c in top]),
                        previous_entropy=type_entropy(previous) if previous else 0.0,
                        distinct_tokens=len({c.token for c in top}), distinct_previous=len(set(previous)),
                        random_entropy=random_entropy(windows, len(top)), features=features)


def vectors_at(params, config: Config, windows, site: str, layer: int | None, contexts: list[Context],
               batch: int) -> np.ndarray:
    """The site's activation vectors at the contexts' (window, position).  -> [len(contexts), width]"""
    chosen = np.unique([c.window for c in contexts])  # [n_chosen]
    values = np.concatenate([v for _, v in site_chunks(params, config, windows[chosen], site, layer, batch=batch)])
    slot = {int(w): i for i, w in enumerate(chosen)}
    return np.stack([values[slot[c.window], c.position] for c in contexts])


def _explaining_features(params, config, windows, layer, neuron, sae: SAE, sums, flat, top, n_features, same_site,
                         batch) -> list[FeatureMatch]:
    """The SAE features most correlated with the neuron, with their share of its top activations or the
    cosine of their decoder rows with its key."""
    n = len(flat)
    f_sum, f_squares, f_times_a = sums
    a = flat.astype(np.float64)
    covariance = f_times_a / n - (f_sum / n) * a.mean()  # [d_sae]
    f_std = np.sqrt(np.maximum(f_squares / n - (f_sum / n) ** 2, 0.0))
    correlation = np.where(f_std > 0, covariance / np.maximum(f_std * a.std(), 1e-30), 0.0)  # [d_sae]
    best = np.argsort(-correlation, kind="stable")[:n_features]

    share = None
    if same_site:  # f_i W_dec[i, neuron] scale_out summed over the top contexts, over the neuron's activation there
        x = vectors_at(params, config, windows, "mlp_post", layer, top, batch)  # [k, d_mlp]
        f = np.asarray(_encode(sae.params, x, sae.config), np.float64)  # [k, d_sae]
        # the decoder's output leaves the SAE times scale_out: 1 / input_scale, or per token (input_norm)
        _, _, scale_out = input_normalization(jnp.asarray(x, jnp.float32), sae.config)
        scale_out = np.broadcast_to(np.asarray(scale_out, np.float64), (len(x), 1))  # [k, 1]
        contributions = (f * scale_out).sum(0) * np.asarray(sae.params["W_dec"][:, neuron], np.float64)  # [d_sae]
        share = contributions / sum(c.activation for c in top)
    key_cosine = None
    if sae.config.site in RESID_SITES:
        key = residual_keys(params, layer)[neuron]  # [d_model]
        decoder = np.asarray(sae.params["W_dec"], np.float64)  # [d_sae, d_model], rows of any norm
        norms = np.linalg.norm(decoder, axis=1)  # [d_sae]
        key_cosine = np.where(norms > 0, decoder @ key / np.maximum(norms, 1e-30), 0.0) / np.linalg.norm(key)
    return [FeatureMatch(feature=int(i), correlation=float(correlation[i]),
                         share=None if share is None else float(share[i]),
                         key_cosine=None if key_cosine is None else float(key_cosine[i])) for i in best]
