"""The planted-mechanism organisms (weights/organisms.py): each is built as documented, loads through
transformers and tinygpt with the same logits, is deterministic, and tinygpt's probes recover the planted
truth: the heads, the neurons, the layers, the dims and the numbers that were put there by construction."""

from __future__ import annotations

import time

import numpy as np
import pytest

import tinygpt
import weights
from probes import ablation, attention, attribution, lens, massive, memory, patching, svd, tracing
from weights import organisms

# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def induction():
    return organisms.induction()


@pytest.fixture(scope="module")
def facts():
    return organisms.fact_store()


@pytest.fixture(scope="module")
def big():
    return organisms.massive_activation()


def softmax(logits):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def logits_of(organism, tokens):
    """[batch, seq, vocab] float64 logits of tokens [batch, seq]."""
    return np.asarray(tinygpt.forward(organism.params, np.asarray(tokens, np.int32), organism.config,
                                      keep=["logits"]).logits, np.float64)


# ------------------------------------------------------------------------------------ files, determinism


@pytest.mark.parametrize("name", list(organisms.ORGANISMS))
def test_builds_are_fast_and_deterministic_to_the_byte(name, tmp_path):
    organisms.build(name)  # jax's first array conversions are not the builder's time
    start = time.perf_counter()
    first = organisms.build(name)
    elapsed = time.perf_counter() - start
    second = organisms.build(name)
    assert elapsed < 2.0, f"building {name} took {elapsed:.2f} s"
    a, b = first.save(tmp_path / "a"), second.save(tmp_path / "b")
    for file in ("config.json", "model.safetensors", "organism.json"):
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    assert first.truth == second.truth == organisms.read_truth(a)["truth"]


@pytest.mark.parametrize("name", list(organisms.ORGANISMS))
def test_the_written_directory_loads_in_transformers_and_tinygpt_with_equal_logits(name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    organism = organisms.build(name)
    directory = organism.save(tmp_path / name)
    model = tinygpt.load(directory)
    assert model.tokenizer is None and model.config == organism.config
    for ours, theirs in zip(weights.load(directory).params["blocks"].values(), organism.params["blocks"].values()):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    seq = min(24, organism.config.n_ctx)
    tokens = np.random.default_rng(0).integers(0, organism.config.vocab_size, (2, seq)).astype(np.int32)
    ours = np.asarray(model(tokens, keep=["logits"]).logits)  # [batch, seq, vocab]
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(ours - logits_of(organism, tokens)).max() == 0.0


# ------------------------------------------------------------------------------------------------ induction


def ideal_induction_score(tokens):
    """What the planted induction head scores on repeated tokens [batch, 2n]: from query q it attends
    equally to every key s >= 1 whose previous token is the current one, so key q - n + 1 gets 1 / (number
    of j < q with tokens[j] == tokens[q])."""
    batch, seq = tokens.shape
    n = seq // 2
    scores = [[1.0 / np.count_nonzero(row[:q] == row[q]) for q in range(n, seq)] for row in tokens]
    return float(np.mean(scores))


def distinct_blocks(vocab, n, batch, seed):
    """[batch, n] rows of n distinct token ids."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(vocab)[:n] for _ in range(batch)]).astype(np.int32)


def test_the_attention_probe_singles_out_the_planted_heads(induction):
    truth, config = induction.truth, induction.config
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (4, config.n_ctx)).astype(np.int32)
    summary = attention.head_summary(induction.params, config, tokens)
    planted = {"previous": tuple(truth["previous_token_head"]), "diagonal": tuple(truth["self_head"]),
               "first": tuple(truth["sink_head"]), "induction": tuple(truth["induction_head"])}
    for score, head in planted.items():
        values = np.asarray(getattr(summary, score))  # [layer, head]
        assert np.unravel_index(values.argmax(), values.shape) == head, score
        others = np.delete(values.reshape(-1), np.ravel_multi_index(head, values.shape))
        assert others.max() < 0.1, (score, values)
    assert summary.previous[0, 1] > 0.999 and summary.diagonal[0, 0] > 0.999 and summary.first[1, 0] > 0.999
    # the induction score the probe reports equals the planted head's exact split over matching keys
    n = min(config.n_ctx // 2, 50)
    expected = ideal_induction_score(attention.repeated_random_tokens(config, n, 4, 0))
    assert abs(summary.induction[1, 1] - expected) < 1e-3, (summary.induction[1, 1], expected)


def test_the_model_predicts_the_repeat_and_ablating_the_induction_head_destroys_it(induction):
    config = induction.config
    block = distinct_blocks(config.vocab_size, 24, 4, seed=5)  # [4, 24]
    tokens = np.concatenate([block, block], axis=1)  # [4, 48]
    probs = softmax(logits_of(induction, tokens))  # [4, 48, vocab]
    # second copy: position q predicts tokens[q + 1], the token after the previous occurrence of tokens[q]
    target = tokens[:, 25:]  # [4, 23]
    p_next = np.take_along_axis(probs[:, 24:-1], target[..., None], -1)[..., 0]
    assert p_next.min() > 0.99
    assert (probs[:, :23].argmax(-1) == tokens[:, 1:24]).mean() < 0.1  # the first copy is unpredictable
    ablated = np.asarray(ablation.ablate(induction.params, tokens, config, "z", layers=[1], heads=[1]).logits)
    assert (ablated[:, 24:-1].argmax(-1) == target).mean() == 0.0
    assert (ablated[:, 24:-1].argmax(-1) == tokens[:, 24:-1]).all()  # it falls back to the current token


def test_ablation_sweep_and_patching_find_the_circuit(induction):
    config = induction.config
    order = distinct_blocks(config.vocab_size, 48, 4, seed=7)  # [4, 48]
    block, other = order[:, :24], order[:, 24:]  # disjoint token sets
    clean = np.concatenate([block, block], axis=1)  # [4, 48]: position -2 predicts block[:, -1]
    corrupt = np.concatenate([other, block], axis=1)  # the first copy replaced: nothing to copy
    answer, position = block[:, -1], -2
    sweep = ablation.ablation_sweep(induction.params, clean, config, answer=answer, position=position)
    effect = np.asarray(sweep.effect)  # [layer, head]: change in log P(answer) with each head zeroed
    assert sweep.baseline > np.log(0.99)
    assert effect[1, 1] < -5 and effect[0, 1] < -5  # both planted heads are needed
    assert abs(effect[0, 0]) < 1e-3 and abs(effect[1, 0]) < 1e-3  # the decoys are not

    result = patching.patching_sweep(induction.params, clean, corrupt, config, site="z", by="head",
                                     metric="log_prob", answer=answer, position=position)
    recovery = np.asarray(result.recovery)  # [layer, head]
    assert result.clean > np.log(0.99) and result.corrupt < np.log(0.05)
    assert recovery[1, 1] > 0.99  # the induction head's output restores copying
    # the previous-token head's clean output points the induction head at the right position, but the token
    # there is the corrupted one: it copies that instead, so it does not restore the answer
    assert recovery[0, 1] < 0.05
    assert abs(recovery[0, 0]) < 1e-3 and abs(recovery[1, 0]) < 1e-3
    restored = patching.patch(induction.params, clean, corrupt, config, "z", layers=[1], heads=[1])
    assert (np.asarray(restored.logits)[:, 24:-1].argmax(-1) == block[:, 1:]).all()  # the whole second copy


# ----------------------------------------------------------------------------------------------- fact store


def test_every_fact_is_recalled_and_only_from_both_names(facts):
    truth = facts.truth
    prompts = np.array([f["prompt"] for f in truth["facts"]], np.int32)  # [8, 3]
    probs = softmax(logits_of(facts, prompts)[:, -1])  # [8, vocab]
    attributes = [f["attribute"] for f in truth["facts"]]
    assert (probs.argmax(-1) == attributes).all() and probs[np.arange(8), attributes].min() > 0.99
    prefixed = np.concatenate([np.tile(facts.ids(" he", " was", " at", " the", ","), (8, 1)), prompts], axis=1)
    assert (logits_of(facts, prefixed)[:, -1].argmax(-1) == attributes).all()  # the circuit is not tied to position
    # a pair that is not a fact (each name alone is in two facts) fires no fact neuron and recalls nothing
    unknown = np.array([facts.ids("Ada", " Quill", " plays"), facts.ids("Ben", " Moss", " plays")], np.int32)
    trace = tinygpt.forward(facts.params, unknown, facts.config, keep=["mlp_post", "logits"])
    neurons = [f["neuron"] for f in truth["facts"]]
    assert np.abs(np.asarray(trace.mlp_post)[1][..., neurons]).max() < 1e-3
    assert softmax(np.asarray(trace.logits, np.float64)[:, -1])[:, attributes].max() < 0.01


# two facts behind different prefixes of one length (one compiled trace; docs/organisms.md traces a bare prompt)
@pytest.mark.parametrize("fact, prefix", [(0, (" the", " of")), (3, (" he", ","))])
def test_causal_tracing_peaks_at_the_fact_layer_on_the_last_subject_token(facts, fact, prefix):
    fact = facts.truth["facts"][fact]
    prompt = np.array(facts.ids(*prefix) + fact["prompt"])  # [seq]
    first, last = (len(prefix) + p for p in fact["subject_positions"])
    result = tracing.causal_trace(facts.params, prompt, facts.config, [first, last], window=1, samples=10)
    assert result.answer == fact["attribute"]
    assert result.clean_prob > 0.99 and result.corrupt_prob < 0.15
    mlp = result.indirect_effect("mlp_out")  # [layer, seq]
    peak = np.unravel_index(np.argmax(mlp), mlp.shape)
    assert peak == (facts.truth["fact_layer"], last)
    assert mlp[peak] > 0.9 * result.total_effect
    assert np.abs(np.delete(mlp.reshape(-1), np.ravel_multi_index(peak, mlp.shape))).max() < 0.01
    # the residual stream: the early site (last subject token, up to the fact layer), then the late site
    resid = result.indirect_effect("resid_post")  # [layer, seq]
    assert resid[0, last] > 0.9 * result.total_effect and resid[1, last] > 0.9 * result.total_effect
    assert resid[2, -1] > 0.9 * result.total_effect
    assert np.abs(resid[:, first]).max() < 0.05  # the first name alone brings nothing back
    assert not np.any(resid[:, :first])  # nothing before the subject is noised


def test_memory_view_and_direct_logit_attribution_name_the_planted_neuron(facts):
    truth, config, params = facts.truth, facts.config, facts.params
    layer = truth["fact_layer"]
    prompts = np.array([f["prompt"] for f in truth["facts"]], np.int32)  # [8, 3]
    for index, fact in list(enumerate(truth["facts"]))[::3]:  # facts 0, 3, 6
        neuron, attribute = fact["neuron"], fact["attribute"]
        assert memory.value_tokens(params, layer, neuron, k=3).promoted[0][0] == attribute
        on_prompt = memory.neuron_on_prompt(params, config, prompts[index:index + 1], layer, neuron, position=1)
        assert abs(on_prompt.activations[1] - 10.0) < 0.1  # gelu(0.5 tau), tau = 20
        assert np.abs(on_prompt.activations[[0, 2]]).max() < 1e-3
        assert on_prompt.promoted[0][0] == attribute
        top = memory.top_activations(params, config, prompts, layer, neuron, k=2)
        assert (top.windows[0], top.positions[0]) == (index, 1) and top.activations[1] < 1e-3
        per_neuron = attribution.neuron_attribution(params, config, prompts[index:index + 1], layer, attribute,
                                                    position=1)
        contributions = per_neuron.neurons[:, 0]  # [d_mlp]
        assert contributions.argmax() == neuron and contributions[neuron] > 0.99 * per_neuron.total[0]
    for position, component in ((1, f"L{layer}.mlp"), (-1, "L{}H{}".format(*truth["mover_head"]))):
        attribute = truth["facts"][0]["attribute"]
        dla = attribution.direct_logit_attribution(params, config, prompts[:1], attribute, position=position)
        values = dla.contributions[:, 0]
        assert dla.labels[int(np.argmax(values))] == component and values.max() > 0.9 * dla.logit[0]


def test_the_logit_lens_shows_the_attribute_after_the_fact_layer(facts):
    truth = facts.truth
    prompts = np.array([f["prompt"] for f in truth["facts"]], np.int32)  # [8, 3]
    attributes = np.array([f["attribute"] for f in truth["facts"]])
    target = np.broadcast_to(attributes[:, None], prompts.shape)  # [8, 3]
    result = lens.logit_lens(facts.params, facts.config, prompts, k=1, target=target)
    post = list(result.sites).index("resid_post")
    ranks = result.target_ranks[post]  # [layer, batch, seq]
    fact_layer = truth["fact_layer"]
    # last subject token: not before the fact layer, top-1 from it on
    assert (ranks[:fact_layer, :, 1] > 0).all() and (ranks[fact_layer:, :, 1] == 0).all()
    # the relation token: only once the mover has carried it there (layer 2)
    assert (ranks[:2, :, 2] > 0).all() and (ranks[2, :, 2] == 0).all()
    assert (result.top_ids[post, 0, :, 1, 0] == prompts[:, 1]).all()  # before: the last name itself


# ----------------------------------------------------------------------------------------- massive activation


def massive_prompts(organism):
    """Sentences of content and function words, with the function words at known positions."""
    rng = np.random.default_rng(11)
    function = organism.truth["tokens"]
    content = [i for i in range(organism.config.vocab_size) if i not in function]
    prompts = []
    for _ in range(3):  # every function word in every prompt, at random positions after the first
        row = rng.choice(content, 16)
        row[rng.choice(np.arange(1, 16), len(function), replace=False)] = function
        prompts.append(row.tolist())
    return prompts


def test_the_massive_activation_investigation_reports_the_planted_truth(big):
    truth, config, params = big.truth, big.config, big.params
    prompts = massive_prompts(big)
    report = massive.investigate(params, config, prompts)
    layer, dim = truth["layer"], truth["dim"]
    function = set(truth["tokens"])
    expected = {(p, q) for p, row in enumerate(prompts) for q, t in enumerate(row) if t in function}
    assert report.first_layer == layer
    assert {a.dim for a in report.activations} == {dim}
    assert {a.token for a in report.activations} == function
    for at in (layer, layer + 1):  # appears at the planted layer, then the residual carries it
        assert {(a.prompt, a.position) for a in report.activations if a.layer == at} == expected
    assert max(abs(a.value / truth["value"] - 1) for a in report.activations) < 1e-3
    assert all(a.ratio >= 1000 for a in report.activations)
    trajectory = report.trajectories[0]
    assert abs(trajectory.values[0]) < 1 and abs(trajectory.values[layer] / truth["value"] - 1) < 1e-3
    # without attention the residual at layer 1 lacks L0H1's write (norm 1: |x|^2 = 4 instead of 5), so
    # LayerNorm's gain is sqrt(5/4) larger and the pre-activation 60 sqrt(5/4) - 10 instead of 50
    gain = np.sqrt((5 / config.d_model + config.ln_eps) / (4 / config.d_model + config.ln_eps))
    attention_off = 100 * ((60 * gain - 10) / 50 - 1)  # +14.2 percent
    for excluded in report.exclusion:
        assert np.allclose(excluded.attention_off_change[layer:], attention_off, atol=0.1)
        assert np.allclose(excluded.mlp_off_change[layer:], -100.0, atol=0.1)
    stages = report.mlp
    assert stages.argmax["after_W_in"] == stages.argmax["after_gelu"] == truth["neuron"]
    assert stages.argmax["output"] == dim
    assert abs(stages.massive["after_gelu"] / truth["activation"] - 1) < 1e-3
    assert abs(stages.massive["output"] / stages.massive["after_gelu"] / truth["sigma1"] - 1) < 1e-3
    assert stages.massive["input"] < 5 and stages.others["output"] < 100
    geometry = report.geometry
    assert (geometry.layer, geometry.dim) == (layer, dim)
    assert abs(geometry.sigma1 - truth["sigma1"]) < 1e-4 and abs(geometry.sigma2 - truth["sigma2"]) < 1e-4
    assert abs(abs(geometry.slope) - truth["slope"]) < 1e-3 and geometry.r2 > 1 - 1e-6
    assert abs(report.intervention.means[dim] / truth["value"] - 1) < 1e-3


def test_the_svd_probe_reads_the_planted_spectrum_and_the_function_words(big):
    truth, config, params = big.truth, big.config, big.params
    layer = truth["layer"]
    out = svd.weight_svd(params, config, "W_out", layer)
    expected = [truth["centred_sigma1"], *truth["singular_values"][1:]]
    assert np.allclose(out.S[:len(expected)], expected, atol=1e-4) and out.S[len(expected)] < 1e-4
    assert abs(abs(out.U[truth["neuron"], 0]) - 1) < 1e-6  # the top input direction is the neuron itself
    assert np.argmax(np.abs(out.Vt[0])) == truth["dim"]
    reading = svd.singular_tokens(params, svd.weight_svd(params, config, "W_in", layer), n_vectors=1, k=4)[0]
    ends = [{t for t, _ in reading["input"][side]} for side in ("positive", "negative")]
    assert set(truth["tokens"]) in ends  # the top key direction reads exactly the function words


@pytest.mark.parametrize("name, options, argument", [
    ("massive_activation", {"neuron": -1}, "neuron"),
    ("massive_activation", {"neuron": 64}, "neuron"),
    ("massive_activation", {"dim": 500}, "dim"),
    ("massive_activation", {"dim": 1.5}, "dim"),
    ("massive_activation", {"layer": 3}, "layer"),
    ("massive_activation", {"d_mlp": 4}, "d_mlp"),
    ("massive_activation", {"d_model": 64}, "d_model"),
    ("massive_activation", {"sigma1": float("nan")}, "sigma1"),
    ("induction", {"n_ctx": 1}, "n_ctx"),
    ("induction", {"d_model": 100}, "d_model"),
    ("induction", {"step": 0}, "step"),
    ("fact_store", {"d_mlp": 10}, "d_mlp"),
    ("fact_store", {"n_ctx": 2}, "n_ctx"),
    ("fact_store", {"tau": 0.0}, "tau"),
])
def test_every_builder_argument_is_checked_naming_it(name, options, argument):
    from tinygpt.errors import InputError

    with pytest.raises(InputError) as error:
        organisms.build(name, **options)
    assert str(error.value).startswith(argument + " ") and "\n" not in str(error.value), str(error.value)


def test_a_missing_or_bad_organism_json_is_one_error_naming_it(tmp_path):
    from tinygpt.errors import TinyGPTError

    for content in (None, "{not json", "[1, 2]"):
        path = tmp_path / "organism.json"
        if content is not None:
            path.write_text(content)
        with pytest.raises(TinyGPTError) as error:
            organisms.read_truth(tmp_path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
