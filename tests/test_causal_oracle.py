"""Ablation and patching against the same interventions done with plain PyTorch forward hooks on Hugging Face's
GPT2LMHeadModel (same random checkpoint): logits agree within 1e-4.

    head (zero / mean)   a pre-hook on attn.c_proj rewrites that head's slice of the merged z
    MLP neurons          a hook on mlp.act rewrites the neurons' activations
    attention sublayer   a hook on attn replaces its output by zeros
    residual patch       a hook on block l rewrites its output at one position with the clean run's

and causal tracing against ROME's own algorithm (kmeng01/rome, experiments/causal_trace.py) ported line for
line onto the same hooks: `collect_embedding_std` (torch's unbiased `.std()`), and `trace_with_patch` with its
numpy RandomState(1) noise, looped as `trace_important_states` / `trace_important_window` do.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tinygpt  # noqa: E402
from hf_oracle import hf_eager, make_hf_checkpoint  # noqa: E402
from probes import ablation, patching, tracing  # noqa: E402

TOL = 1e-4
PROB_TOL = 1e-6  # for probabilities traced through ROME's algorithm
SHAPE = dict(n_layer=2, n_head=3, n_embd=24, n_positions=16, vocab_size=61)
D_HEAD = SHAPE["n_embd"] // SHAPE["n_head"]
TOKENS = np.array([[5, 17, 3, 40, 22, 9, 31], [44, 2, 19, 7, 60, 13, 27]], np.int64)
REFERENCE = np.array([[6, 16, 30, 1, 2, 50, 4], [9, 8, 7, 6, 5, 4, 3], [33, 33, 1, 0, 12, 12, 40]], np.int64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("oracle")
    make_hf_checkpoint(directory, seed=7, init_std=0.1, **SHAPE)
    return tinygpt.load(directory), hf_eager(directory)


def hooked_logits(hf, tokens, hooks):
    """HF logits with (module, kind, fn) hooks registered for one forward; kind is "pre" or "post"."""
    handles = [module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn)
               for module, kind, fn in hooks]
    try:
        with torch.no_grad():
            return hf(torch.as_tensor(tokens)).logits.numpy()
    finally:
        for handle in handles:
            handle.remove()


def head_columns(head):
    return slice(head * D_HEAD, (head + 1) * D_HEAD)


def test_zero_head_ablation(models):
    ours, hf = models
    layer, head = 1, 2

    def zero_head(module, args):
        z = args[0].clone()
        z[..., head_columns(head)] = 0
        return (z,)

    expected = hooked_logits(hf, TOKENS, [(hf.transformer.h[layer].attn.c_proj, "pre", zero_head)])
    got = ablation.ablate(ours.params, TOKENS, ours.config, "z", layers=[layer], heads=[head]).logits
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_mean_head_ablation(models):
    ours, hf = models
    layer, head = 0, 1
    captured = []
    record = (hf.transformer.h[layer].attn.c_proj, "pre", lambda module, args: captured.append(args[0].clone()))
    hooked_logits(hf, REFERENCE, [record])
    mean_z = captured[0].mean(dim=0)  # [seq, n_embd]: the merged z, averaged over the reference batch

    def mean_head(module, args):
        z = args[0].clone()
        z[..., head_columns(head)] = mean_z[..., head_columns(head)]
        return (z,)

    expected = hooked_logits(hf, TOKENS, [(hf.transformer.h[layer].attn.c_proj, "pre", mean_head)])
    got = ablation.ablate(ours.params, TOKENS, ours.config, "z", layers=[layer], heads=[head], method="mean",
                          reference=REFERENCE).logits
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_neuron_ablation(models):
    ours, hf = models
    layer, neurons = 0, [3, 50, 95]

    def zero_neurons(module, args, output):
        output = output.clone()
        output[..., neurons] = 0
        return output

    expected = hooked_logits(hf, TOKENS, [(hf.transformer.h[layer].mlp.act, "post", zero_neurons)])
    got = ablation.ablate(ours.params, TOKENS, ours.config, "mlp_post", layers=[layer], neurons=neurons).logits
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_attention_sublayer_ablation(models):
    ours, hf = models

    def zero_attention(module, args, output):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])

    expected = hooked_logits(hf, TOKENS, [(hf.transformer.h[1].attn, "post", zero_attention)])
    got = ablation.ablate(ours.params, TOKENS, ours.config, "attn_out", layers=[1]).logits
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_residual_patch_from_the_clean_run(models):
    ours, hf = models
    clean, corrupt = TOKENS, TOKENS.copy()
    corrupt[:, 2] = [50, 51]
    layer, position = 0, 2
    block = hf.transformer.h[layer]

    def hidden(output):
        return output[0] if isinstance(output, tuple) else output

    captured = []
    hooked_logits(hf, clean, [(block, "post", lambda module, args, output: captured.append(hidden(output).clone()))])

    def patch_position(module, args, output):
        h = hidden(output).clone()
        h[:, position] = captured[0][:, position]
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    expected = hooked_logits(hf, corrupt, [(block, "post", patch_position)])
    got = patching.patch(ours.params, clean, corrupt, ours.config, "resid_post", layers=[layer],
                         positions=[position]).logits
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------- ROME's causal trace


def rome_collect_embedding_std(hf, subjects):
    """ROME's collect_embedding_std: the std of the token embeddings (transformer.wte's output) of every
    subject, encoded by itself, concatenated."""
    alldata = []
    record = (hf.transformer.wte, "post", lambda module, args, output: alldata.append(output[0]))
    for s in subjects:
        hooked_logits(hf, np.asarray([s]), [record])
    return torch.cat(alldata).std().item()


def rome_trace_with_patch(hf, inp, states_to_patch, answer, tokens_to_mix, noise):
    """ROME's trace_with_patch with torch hooks for nethook.TraceDict: row 0 of the batch is the clean run; rows
    1.. get noise * RandomState(1).randn(rows - 1, e - b, d_model) added to their token embeddings at
    tokens_to_mix = (b, e); each (token, module name) of states_to_patch is restored in rows 1.. from row 0.
    Returns the mean P(answer) over rows 1.."""
    rs = np.random.RandomState(1)  # For reproducibility, use pseudorandom noise
    patch_spec = defaultdict(list)
    for t, name in states_to_patch:
        patch_spec[name].append(t)
    modules = dict(hf.named_modules())

    def embed(module, args, x):
        b, e = tokens_to_mix
        x[1:, b:e] += noise * torch.from_numpy(rs.randn(x.shape[0] - 1, e - b, x.shape[2]))
        return x

    def restore(name):
        def hook(module, args, x):
            h = x[0] if isinstance(x, tuple) else x
            for t in patch_spec[name]:
                h[1:, t] = h[0, t]
            return x
        return hook

    hooks = [(hf.transformer.wte, "post", embed)] + [(modules[n], "post", restore(n)) for n in patch_spec]
    logits = torch.as_tensor(hooked_logits(hf, inp, hooks))
    return torch.softmax(logits[1:, -1, :], dim=1).mean(dim=0)[answer].item()


def rome_hidden_flow(hf, inp, e_range, answer, noise, kind, window, num_layers):
    """ROME's trace_important_states (kind None: block outputs) and trace_important_window (kind "mlp" /
    "attn": `window` layers around each), as [layer, token]."""
    table = []
    for tnum in range(inp.shape[1]):
        row = []
        for layer in range(num_layers):
            if kind is None:
                names = [f"transformer.h.{layer}"]
            else:
                names = [f"transformer.h.{L}.{kind}"
                         for L in range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))]
            row.append(rome_trace_with_patch(hf, inp, [(tnum, n) for n in names], answer, e_range, noise))
        table.append(row)
    return np.asarray(table).T


def test_embedding_std_is_romes_collect_embedding_std(models):
    ours, hf = models
    subjects = [[5, 17], [40], [3, 40, 22], [5]]
    assert tracing.embedding_std(ours.params, subjects) == pytest.approx(rome_collect_embedding_std(hf, subjects),
                                                                         rel=1e-6)


def test_causal_trace_with_romes_noise_is_romes_trace(models):
    """Number for number: tinygpt's trace with noise_values="rome" and ROME's noise level (3 x
    collect_embedding_std over the subjects) equals ROME's loop over every (token, layer), for block outputs,
    MLP and attention outputs, with the same clean and corrupted probabilities."""
    ours, hf = models
    prompt, (b, e), samples, window = TOKENS[0], (2, 4), 3, 2
    noise_level = 3 * rome_collect_embedding_std(hf, [list(prompt[b:e]), [40, 22]])
    inp = np.tile(prompt, (samples + 1, 1))  # ROME's batch: the prompt once clean, then once per sample
    with torch.no_grad():
        probs = torch.softmax(hf(torch.as_tensor(inp)).logits[:, -1], dim=1)
    base_score, answer = (x[0].item() for x in torch.max(probs, dim=1))
    low_score = rome_trace_with_patch(hf, inp, [], answer, (b, e), noise_level)

    result = tracing.causal_trace(ours.params, prompt, ours.config, list(range(b, e)), samples=samples,
                                  noise_std=noise_level, noise_values="rome", window=window)
    assert result.answer == answer
    assert result.clean_prob == pytest.approx(base_score, abs=PROB_TOL)
    assert result.corrupt_prob == pytest.approx(low_score, abs=PROB_TOL)
    assert result.total_effect > 1e-3  # the noise matters (float32 rounding is ~1e-8 here)
    for kind, rome_kind in (("resid_post", None), ("mlp_out", "mlp"), ("attn_out", "attn")):
        expected = rome_hidden_flow(hf, inp, (b, e), answer, noise_level, rome_kind, window, SHAPE["n_layer"])
        assert np.ptp(expected) > 1e-3
        np.testing.assert_allclose(result.scores[kind], expected, atol=PROB_TOL, rtol=0, err_msg=kind)
