"""SAELens' own answers for tinygpt's SAELens tests, computed by the real sae-lens package.

sae-lens is not a test dependency (it pins an older transformer-lens and its own torch / transformers
ranges); install it beside the project, never over it, and run this script with it on PYTHONPATH:

    pip install --no-deps --target /work/.saelens-target sae-lens "transformer-lens>=2.16.1,<3" \\
        better-abc simple-parsing docstring-parser
    PYTHONPATH=/work/.saelens-target python tests/make_saelens_golden.py [OUT_DIR]
    PYTHONPATH=/work/.saelens-target python tests/make_saelens_golden.py [OUT_DIR] --read DIR [DIR ...]

Without --read it writes the golden cases (default OUT_DIR tests/golden/saelens): for each case in CASES,
OUT_DIR/<case>/ holds an SAE with random weights as sae-lens' `save_model` wrote it (cfg.json,
sae_weights.safetensors; the "legacy" cases with cfg.json rewritten in the SAELens 3.x-5.x form, which
sae-lens 6 still reads), and expected.safetensors: inputs x [n, d_in] and codes g [n, d_sae], and sae-lens'
encode(x), decode(g) (called after encode(x), whose per-token normalisation decode undoes) and forward(x),
all computed from the SAE as sae-lens' `SAE.load_from_disk` reads the directory back.

With --read, each DIR holds sae/ (a SAELens directory, e.g. written by tinygpt's save_saelens) and
inputs.safetensors (x in the SAE's hook layout, g); it writes DIR/saelens.safetensors with sae-lens' encode,
decode and forward of them, flattened to [n, width].
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

N_INPUTS = 12

# case -> the SAE: architecture, sizes, hook, the cfg fields that change what it computes, and "legacy" for
# cfg.json rewritten in the 3.x-5.x form. "shakespeare_resid" fits tinygpt's embedded model (d_model 128).
CASES = {
    "standard": dict(architecture="standard", d_in=16, d_sae=32, hook_name="blocks.0.hook_resid_pre"),
    "topk": dict(architecture="topk", d_in=16, d_sae=48, hook_name="blocks.1.hook_resid_post", k=5),
    "topk_rescaled": dict(architecture="topk", d_in=16, d_sae=32, hook_name="blocks.0.hook_mlp_out", k=4,
                          rescale_acts_by_decoder_norm=True),
    "jumprelu": dict(architecture="jumprelu", d_in=24, d_sae=64, hook_name="blocks.1.hook_attn_out"),
    "gated": dict(architecture="gated", d_in=16, d_sae=32, hook_name="blocks.0.hook_resid_mid"),
    "no_b_dec_input_norm_rescale": dict(architecture="standard", d_in=16, d_sae=32, hook_name="hook_embed",
                                        apply_b_dec_to_input=False, normalize_activations="constant_norm_rescale"),
    "layer_norm": dict(architecture="jumprelu", d_in=16, d_sae=32, hook_name="blocks.0.mlp.hook_post",
                       normalize_activations="layer_norm"),
    "hook_z": dict(architecture="standard", d_in=32, d_sae=64, hook_name="blocks.1.attn.hook_z",
                   reshape_activations="hook_z", heads=4),
    "legacy_topk_5x": dict(architecture="topk", d_in=16, d_sae=32, hook_name="blocks.2.hook_mlp_out", k=3,
                           legacy="5.x"),
    "shakespeare_resid": dict(architecture="standard", d_in=128, d_sae=128, hook_name="blocks.1.hook_resid_pre",
                              legacy="3.x"),
}


def build_sae(case: dict, seed: int):
    """An inference SAE of sae-lens with every parameter drawn at random (biases and thresholds included,
    so each term of encode and decode matters)."""
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    fields = {name: case[name] for name in ("d_in", "d_sae", "k", "rescale_acts_by_decoder_norm",
                                            "apply_b_dec_to_input", "normalize_activations",
                                            "reshape_activations") if name in case}
    sae_class, config_class = get_sae_class(case["architecture"])
    config = config_class(**fields, metadata=SAEMetadata(model_name="tinygpt-shakespeare", hook_name=case["hook_name"],
                                                         context_size=128, prepend_bos=False))
    sae = sae_class(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            scale = {"W_enc": case["d_in"] ** -0.5, "W_dec": 0.5, "threshold": 0.3, "r_mag": 0.2}.get(name, 0.3)
            values = torch.randn(param.shape, generator=generator) * scale
            param.copy_(values.abs() if name == "threshold" else values)
    return sae


def legacy_cfg(case: dict, cfg: dict) -> dict:
    """cfg.json as SAELens 3.x (hook_point names, jbloom's GPT-2 small SAEs) or 5.x (top-k as an activation
    function) wrote it: the model-side fields at the top level, no metadata."""
    layer = int(case["hook_name"].split(".")[1])
    common = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "model_name": "tinygpt-shakespeare", "context_size": 128,
              "device": "cpu", "dataset_path": "tiny-shakespeare", "prepend_bos": True}
    if case["legacy"] == "3.x":
        return {**common, "hook_point": case["hook_name"], "hook_point_layer": layer, "hook_point_head_index": None,
                "dtype": "torch.float32", "is_dataset_tokenized": False, "expansion_factor": 1,
                "b_dec_init_method": "geometric_median", "l1_coefficient": 8e-05, "lr": 0.0004, "seed": 42}
    return {**common, "architecture": "standard", "hook_name": case["hook_name"], "hook_layer": layer,
            "hook_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": case["k"]},
            "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "normalize_activations": "none",
            "dtype": "float32", "sae_lens_training_version": "5.3.0"}


def run_sae(sae, x: np.ndarray, g: np.ndarray) -> dict[str, np.ndarray]:
    """sae-lens' encode(x), decode(g) (after encode(x)) and forward(x), flattened to [n, width]."""
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(x))
        decoded = sae.decode(torch.from_numpy(g))
        forward = sae(torch.from_numpy(x))
    n = len(x)
    return {"encode": codes.numpy().reshape(n, -1), "decode": decoded.numpy().reshape(n, -1),
            "forward": forward.numpy().reshape(n, -1)}


def inputs_for(case: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x [n, d_in] (or [n, head, d_head] for hook_z) and sparse non-negative codes g [n, d_sae]."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N_INPUTS, case["d_in"])) * 1.5 + 0.2).astype(np.float32)  # [n, d_in]
    if "heads" in case:
        x = x.reshape(N_INPUTS, case["heads"], -1)  # [n, head, d_head]
    g = (np.abs(rng.standard_normal((N_INPUTS, case["d_sae"]))) * (rng.random((N_INPUTS, case["d_sae"])) < 0.2))
    return x, g.astype(np.float32)


def write_case(out: Path, name: str, case: dict, seed: int) -> None:
    """OUT/<name>/: the SAE as sae-lens saves it (cfg.json rewritten for legacy cases) and expected.safetensors."""
    from sae_lens import SAE

    directory = out / name
    shutil.rmtree(directory, ignore_errors=True)
    build_sae(case, seed).save_model(directory)
    if "legacy" in case:
        cfg = json.loads((directory / "cfg.json").read_text())
        (directory / "cfg.json").write_text(json.dumps(legacy_cfg(case, cfg), indent=1, sort_keys=True) + "\n")
    sae = SAE.load_from_disk(directory)  # what sae-lens itself reads back from the directory
    x, g = inputs_for(case, seed)
    save_file({"x": x.reshape(N_INPUTS, -1), "g": g, **run_sae(sae, x, g)}, str(directory / "expected.safetensors"))


def read_dirs(directories: list[str]) -> None:
    """sae-lens' outputs on each DIR/sae for DIR/inputs.safetensors, into DIR/saelens.safetensors."""
    from sae_lens import SAE

    for directory in map(Path, directories):
        sae = SAE.load_from_disk(directory / "sae")
        inputs = load_file(str(directory / "inputs.safetensors"))
        save_file(run_sae(sae, inputs["x"], inputs["g"]), str(directory / "saelens.safetensors"))


def main(argv: list[str]) -> None:
    """[OUT_DIR] writes the golden cases; --read DIR ... runs sae-lens on tinygpt's directories; both may be
    given (OUT_DIR first), which the live test does to import sae-lens once."""
    reading = argv.index("--read") if "--read" in argv else len(argv)
    read_dirs(argv[reading + 1:])
    if reading == 0 and argv:
        return
    out = Path(argv[0]) if reading else Path(__file__).resolve().parent / "golden" / "saelens"
    out.mkdir(parents=True, exist_ok=True)
    for seed, (name, case) in enumerate(CASES.items()):
        write_case(out, name, case, seed)
    import sae_lens

    (out / "VERSION").write_text(f"written by sae-lens {sae_lens.__version__} (tests/make_saelens_golden.py)\n")


if __name__ == "__main__":
    main(sys.argv[1:])
