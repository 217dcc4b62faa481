"""Every public probe that takes token ids refuses an id outside the vocabulary with InputError, before any of
its own jit can clamp it to the last token's row (issue 17, case 4), and refuses right-padded masks and empty
rows (case 5). The table below must list every public probe function with a token argument: a test walks
the probes package and fails on one that is missing, so a new probe cannot skip the check silently."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probes
import tinygpt
from tinygpt import InputError
from tinygpt.params import param_shapes

CFG = tinygpt.Config(n_layer=2, n_head=2, d_model=16, d_head=8, d_mlp=32, n_ctx=16, vocab_size=37)
V = CFG.vocab_size
PARAMS = jax.tree_util.tree_map(
    lambda shape: jnp.asarray(0.3 * np.random.default_rng(sum(shape)).standard_normal(shape), jnp.float32),
    param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))
GOOD = np.array([[1, 2, 3, 4, 5, 6]], np.int32)

# A token argument's name -> how to spell a call: each entry is (module, function, call), `call(bad)` calls it
# with the token array `bad` ([1, 6] int32 with one id outside the vocabulary) in that argument.
P, C = PARAMS, CFG
ENTRY_POINTS = {
    ("ablation", "ablate"): lambda m, bad: m.ablate(P, bad, C, "z", layers=[0], heads=[0]),
    ("ablation", "ablation_sweep"): lambda m, bad: m.ablation_sweep(P, bad, C, answer=1),
    ("ablation", "neuron_study"): lambda m, bad: m.neuron_study(P, bad, C, 0, 0),
    ("attention", "attention_patterns"): lambda m, bad: m.attention_patterns(P, C, bad),
    ("attention", "head_summary"): lambda m, bad: m.head_summary(P, C, bad),
    ("attribution", "direct_logit_attribution"): lambda m, bad: m.direct_logit_attribution(P, C, bad, 1),
    ("attribution", "neuron_attribution"): lambda m, bad: m.neuron_attribution(P, C, bad, 0, 1),
    ("attribution", "residual_decomposition"): lambda m, bad: m.residual_decomposition(P, C, bad),
    ("lens", "logit_lens"): lambda m, bad: m.logit_lens(P, C, bad),
    ("massive", "detect"): lambda m, bad: m.detect(P, C, [bad[0]]),
    ("massive", "layer_summary"): lambda m, bad: m.layer_summary(P, C, bad[0]),
    ("report", "report"): lambda m, bad: m.report(tinygpt.Model(C, P), bad[0], progress=False),
    ("massive", "investigate"): lambda m, bad: m.investigate(P, C, [bad[0]]),
    ("massive", "exclusion"): lambda m, bad: m.exclusion(P, C, [bad[0]], []),
    ("massive", "trajectories"): lambda m, bad: m.trajectories(P, C, [bad[0]], []),
    ("massive", "mlp_stages"): lambda m, bad: m.mlp_stages(P, C, [bad[0]], [], 0),
    ("massive", "geometry"): lambda m, bad: m.geometry(P, C, [bad[0]], [], 0, 0),
    ("massive", "intervention"): lambda m, bad: m.intervention(P, C, [bad[0]], [], 0),
    ("patching", "patch"): lambda m, bad: m.patch(P, GOOD, bad, C, "resid_pre", layers=[0]),
    ("patching", "patching_sweep"): lambda m, bad: m.patching_sweep(P, GOOD, bad, C, answer=1, wrong=2),
    ("patching", "attribution_patching"): lambda m, bad: m.attribution_patching(P, bad, GOOD, C, answer=1, wrong=2),
    ("patchscope", "patchscope"): lambda m, bad: m.patchscope(P, C, GOOD, bad),
    ("patchscope", "hidden_states"): lambda m, bad: m.hidden_states(P, C, bad),
    ("patchscope", "multihop"): lambda m, bad: m.multihop(P, C, GOOD, bad, 0),
    ("steering", "steer"): lambda m, bad: m.steer(P, C, bad, np.zeros(16, np.float32), 0, max_new_tokens=2),
    ("steering", "mean_difference"): lambda m, bad: m.mean_difference(P, C, [GOOD[0]], [bad[0]], 0),
    ("steering", "function_vector"): lambda m, bad: m.function_vector(P, C, [bad[0]], [GOOD[0]], [1]),
    ("steering", "mean_last_resid"): lambda m, bad: m.mean_last_resid(P, C, [bad[0]], 0),
    ("tracing", "causal_trace"): lambda m, bad: m.causal_trace(P, bad[0], C, [1], answer=1, samples=2),
    ("memory", "neuron_on_prompt"): lambda m, bad: m.neuron_on_prompt(P, C, bad, 0, 0),
    ("memory", "top_activations"): lambda m, bad: m.top_activations(P, C, bad, 0, 0),
    ("memory", "neuron_activations"): lambda m, bad: m.neuron_activations(P, C, bad, 0, 0),
    ("polysemantic", "neuron_report"): lambda m, bad: m.neuron_report(P, C, bad, 0, 0),
    ("tuned_lens", "tuned_lens"): lambda m, bad: m.tuned_lens(P, C, m.init_translators(C), bad),
    ("tuned_lens", "train_tuned_lens"): lambda m, bad: m.train_tuned_lens(P, C, np.tile(bad[0], 40), steps=1,
                                                                          batch=1, seq=8),
    ("tuned_lens", "evaluate_lenses"): lambda m, bad: m.evaluate_lenses(P, C, m.init_translators(C),
                                                                        np.tile(bad[0], 40), seq=8),
    ("harvest", "harvest"): lambda m, bad: m.harvest(P, C, np.tile(bad[0], 40), "resid_post", 0, seq=8),
    ("manifold", "layer_geometry"): lambda m, bad: m.layer_geometry(P, C, np.tile(bad, (8, 1)), n_points=10),
    ("sae", "loss_recovered"): lambda m, bad: m.loss_recovered(P, C, _sae(m), bad),
}

# Public functions with a token-like argument that are not entry points: helpers the entry points call after
# checking, or functions of token *counts*, tokenizers or single positions rather than ids.
INTERNAL = {
    "ablation": {"ablation_arrays", "ablation_edits", "ablation_source", "replace_edit", "unit_sweep_scores"},
    "harvest": {"corpus_stream", "embed_tokens", "shard_windows", "site_chunks", "text_stream", "token_windows"},
    "lens": {"broadcast_target"},
    "manifold": {"property_labels", "residual_points", "sample_positions"},
    "massive": {"residual_stream"},
    "memory": {"layer_mlp_post"},
    "metrics": {"check_metric", "kl_div", "metric", "normalized_recovery"},
    # the trained organism's measurements, on prompts built from its own facts.json
    "organism_figures": {"copying_accuracy", "fact_recall", "last_logits", "measure", "tracing_figures"},
    "patching": {"attribution_scores", "base_and_source", "check_pair", "first_difference", "patching_scores"},
    "polysemantic": {"random_entropy", "vectors_at"},
    "sae": {"next_token_loss"},
    "steering": {"left_pad", "resolve_positions"},
    "tracing": {"find_subject", "subject_noise", "subject_occurrences", "trace_noise", "trace_scores"},
    "tuned_lens": {"activations", "check_stream", "loss_fn", "random_windows", "tiled_windows", "token_stream"},
}
TOKEN_WORDS = ("token", "prompt", "windows", "stream", "clean", "corrupt", "positive", "negative", "reference",
               "source")


def _sae(m):
    config = m.SAEConfig(d_in=CFG.d_model, d_sae=32, site="resid_post", layer=0)
    return m.SAE(config, m.init_sae(config))


RENDERING = ("plots",)  # draws results: its `prompt` and token `pieces` are text for titles and ticks


def token_functions():
    """(module, function) for every public probe function with an argument named like token ids."""
    found = set()
    for info in pkgutil.iter_modules(probes.__path__):
        if info.name in RENDERING:
            continue
        module = importlib.import_module(f"probes.{info.name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ != module.__name__ or name.startswith("_"):
                continue
            params = inspect.signature(fn).parameters
            if any(any(word in p for word in TOKEN_WORDS) for p in params):
                found.add((info.name, name))
    return found


def test_every_probe_taking_tokens_is_walked():
    listed = set(ENTRY_POINTS) | {(m, f) for m, fs in INTERNAL.items() for f in fs}
    missing = sorted(token_functions() - listed)
    assert not missing, f"public probe functions with token arguments not in ENTRY_POINTS or INTERNAL: {missing}"


@pytest.mark.parametrize("bad_id", [V, V + 16, -1])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS), ids=lambda e: ".".join(e))
def test_probe_refuses_an_id_outside_the_vocabulary(entry, bad_id):
    module = importlib.import_module(f"probes.{entry[0]}")
    bad = GOOD.copy()
    bad[0, 3] = bad_id
    with pytest.raises(InputError, match=rf"token id {bad_id}\b.*\[0, {V}\)"):
        ENTRY_POINTS[entry](module, bad)


def test_entry_points_are_decorated_or_check_themselves():
    """The mechanism: each entry point declares its token arguments with `checks_tokens` (so the check runs
    before the probe's own jit)."""
    undeclared = []
    for module_name, fn_name in ENTRY_POINTS:
        fn = getattr(importlib.import_module(f"probes.{module_name}"), fn_name)
        if not getattr(fn, "checks_tokens", None):
            undeclared.append(f"{module_name}.{fn_name}")
    assert not undeclared, undeclared


MASKED = [
    ("ablation", lambda m, t, mask: m.ablate(P, t, C, "z", layers=[0], heads=[0], attention_mask=mask)),
    ("attribution", lambda m, t, mask: m.direct_logit_attribution(P, C, t, 1, attention_mask=mask)),
    ("lens", lambda m, t, mask: m.logit_lens(P, C, t, attention_mask=mask)),
    ("attention", lambda m, t, mask: m.attention_patterns(P, C, t, attention_mask=mask)),
]


@pytest.mark.parametrize("mask, message", [
    ([[1, 1, 1, 1, 0, 0]], "left padding"),
    ([[0, 0, 0, 0, 0, 0]], "no real token"),
    ([[0, 1, 0, 1, 1, 1]], "left padding"),
    ([[0, 0, 2, 1, 1, 1]], "only 0"),
])
@pytest.mark.parametrize("module_name, call", MASKED, ids=[m for m, _ in MASKED])
def test_probes_refuse_masks_that_are_not_left_padding(module_name, call, mask, message):
    module = importlib.import_module(f"probes.{module_name}")
    with pytest.raises(InputError, match=message):
        call(module, GOOD, np.asarray(mask, np.int32))
