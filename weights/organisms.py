"""Model organisms: small GPT-2 checkpoints whose mechanisms are planted by construction.

A probe that agrees with another implementation is correct arithmetic; a probe that finds a mechanism we
put there ourselves is correct science. Each builder here writes the weights of a GPT-2 by hand, so that one
mechanism is present with known parameters, and returns it as an `Organism`: tinygpt's config and params
(the layout `weights.load` gives), the planted truth, and a name per token id (the organisms have no
tokenizer: prompts are token ids). `Organism.save(directory)` writes the official Hugging Face layout
(config.json + model.safetensors, loadable by `transformers.GPT2LMHeadModel.from_pretrained` and by
`tinygpt.load(directory)`) plus organism.json holding the truth. Every builder is deterministic (the same
bytes on every call) and takes well under a second.

    induction()            a previous-token head (L0H1) and an induction head (L1H1) that copies the token
                           after the previous occurrence of the current token; two decoy heads (self, sink)
    fact_store()           invented two-token names with attributes: L0H1 moves the first name onto the last
                           name, one neuron per fact in MLP 1 looks the pair up and writes the attribute, L2H0
                           carries it to the relation token ("<first> <last> plays" -> attribute)
    massive_activation()   one neuron of MLP 1, keyed on function words, writes 2000 into residual dim 47
                           through W_out's top singular direction (sigma1 = 40, sigma2 = 15)

Building blocks, used by all three (the math the docstrings of the builders rely on):

Directions. LayerNorm subtracts each vector's mean over d_model, so a feature written along a direction with
a non-zero mean would be partly erased. The rows 1..d_model-1 of the Sylvester-Hadamard matrix H (H_1 = [1],
H_2n = [[H, H], [H, -H]]), divided by sqrt(d_model), are orthonormal and each sums to zero (row 0, all ones,
is the one direction LayerNorm removes). Every feature of the organisms is one of these rows (`Directions`),
so LayerNorm's mean subtraction never touches a feature and features never overlap.

LayerNorm scale. With mean-free x, LN(x) = x / sqrt(|x|^2 / d_model + eps) (weight 1, bias 0): a reader sees
x times nu(x) = 1 / sqrt(|x|^2 / d_model + eps). When the written features are orthonormal directions with
coefficients c_i, |x|^2 = sum c_i^2 is known in advance, and every weight that reads a feature divides by the
nu of the residual it reads (`ln_gain`), so the planted scores and activations come out at their stated
values. Where a head's attention is not exactly one-hot the residual's norm moves by a fraction of a percent,
and so do the planted numbers; the tests measure them.

Positions (`position_embedding`). wpe[t] = A anchor + P (-1)^t parity + R (sin phi_t ramp_s + cos phi_t
ramp_c), with phi_t rising linearly from -pi/3 (t = 0) to pi/3 (t = n_ctx - 1); at t = 0 the anchor is
replaced by a `bos` direction of the same size, which marks the first position. Its norm is the same at
every position, so the residual at layer 0 has one LayerNorm scale everywhere. A head whose query reads the
anchor and whose key reads ramp_s scores key s by rho sin phi_s: a preference for later keys that grows by
at least `step` nats per position; reading the parities on both sides adds -gamma (-1)^(t+s), which is
+gamma for the previous position and -gamma for the query's own. With gamma = 2 step the previous position
wins by at least 2 step nats over every other key (`previous_token_head`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from tinygpt.config import Config
from tinygpt.arguments import check_float, check_int
from tinygpt.errors import InputError
from tinygpt.files import read_json, write_json
from tinygpt.params import param_shapes

from . import EMBEDDED_MODELS, Checkpoint
from .checkpoint import write

RAMP_SPAN = 2 * math.pi / 3  # phi_t covers [-pi/3, pi/3]: sin phi is increasing, with slope >= cos(pi/3) = 1/2


# ------------------------------------------------------------------------------------------ the organism


@dataclasses.dataclass(frozen=True, eq=False)
class Organism:
    """A planted-mechanism GPT-2: tinygpt's config and params (float32 jax arrays, as `weights.load` gives),
    the planted truth (plain JSON data, documented by each builder), and a display name per token id.
    Compared by identity (params are arrays); two builds are equal in their saved bytes."""

    name: str
    config: Config
    params: dict = dataclasses.field(repr=False)
    truth: dict = dataclasses.field(repr=False)
    token_names: tuple[str, ...] = dataclasses.field(repr=False)

    def checkpoint(self) -> Checkpoint:
        """As `weights.load` returns a checkpoint: (config, params, tokenizer=None); `tinygpt.Model(*it)` runs it."""
        return Checkpoint(self.config, self.params, None)

    def ids(self, *names: str) -> list[int]:
        """Token ids of the given token names (`token_names`), e.g. organism.ids("Ada", " Park", " plays")."""
        index = {name: i for i, name in enumerate(self.token_names)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise KeyError(f"{self.name} has no token named {unknown[0]!r}; its tokens: {list(self.token_names)}")
        return [index[n] for n in names]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the official HF layout (config.json, model.safetensors) and organism.json (name, token names,
        truth) into `directory`; identical bytes for identical organisms. Returns the directory."""
        directory = Path(directory)
        write(directory, self.config, self.params)
        record = {"organism": self.name, "token_names": list(self.token_names), "truth": self.truth}
        write_json(directory / "organism.json", record)
        return directory


def read_truth(directory: str | os.PathLike) -> dict:
    """The organism.json that `Organism.save` wrote: {"organism", "token_names", "truth"}. A missing,
    unreadable or malformed file is one OutputError naming it."""
    path = Path(directory) / "organism.json"
    record = read_json(path, "organism file")
    if not isinstance(record, dict) or not {"organism", "token_names", "truth"} <= set(record):
        from tinygpt.errors import OutputError

        raise OutputError(f"organism file {str(path)!r} is not an organism.json (an object with 'organism', "
                          f"'token_names' and 'truth')")
    return record


TRAINED_DIR = EMBEDDED_MODELS["organism"]  # weights/organism_lm/


def trained_path() -> Path:
    """The directory of the trained organism (`weights/organism_lm/`): a 4-layer GPT-2 trained by
    `python -m weights.train_organism` on Shakespeare mixed with invented facts and repeated spans,
    whose facts.json holds the knowledge base and its train / held-out template split. Load it with
    `tinygpt.load(organisms.trained_path())`; docs/organisms.md gives its measured figures."""
    if not (TRAINED_DIR / "model.safetensors").is_file():
        from .errors import WeightsError

        raise WeightsError(f"the trained organism is missing from {TRAINED_DIR} (python -m weights.train_organism)")
    return TRAINED_DIR


# ------------------------------------------------------------------------------------------ argument checks


def check_d_model(d_model, directions: int) -> int:
    """d_model: a power of two with room for `directions` mean-free directions (d_model - 1 of them exist)."""
    d_model = check_int(d_model, "d_model", low=4)
    if d_model & (d_model - 1):
        raise InputError(f"d_model must be a power of two (the residual directions are Hadamard rows), got {d_model}")
    if directions > d_model - 1:
        raise InputError(f"d_model {d_model} is too small: this organism needs {directions} orthogonal residual "
                         f"directions, d_model - 1 at most; give d_model >= {2 ** math.ceil(math.log2(directions + 1))}")
    return d_model


def check_positive(**values) -> None:
    """Each keyword argument a finite number > 0, or InputError naming it."""
    for name, value in values.items():
        check_float(value, name, low=0.0, low_open=True)


# ------------------------------------------------------------------------------------------ building blocks


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix, entries +-1, rows orthogonal.  n a power of two -> [n, n]"""
    if n < 1 or n & (n - 1):
        raise InputError(f"a Sylvester-Hadamard matrix needs a power of two, got {n}")
    H = np.ones((1, 1))  # [1, 1]
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])  # [2m, 2m]
    return H


class Directions:
    """Hands out the orthonormal, mean-free residual directions H[1:] / sqrt(d_model) in order, by name."""

    def __init__(self, d_model: int):
        self.rows = hadamard(d_model)[1:] / math.sqrt(d_model)  # [d_model - 1, d_model]
        self.used = 0
        self.names: dict[str, list[int]] = {}  # name -> [first row, count]

    def take(self, name: str, count: int = 1) -> np.ndarray:
        """The next `count` directions.  -> [count, d_model]"""
        if self.used + count > len(self.rows):
            raise InputError(f"out of residual directions: {name} needs {count}, {len(self.rows) - self.used} left")
        self.names[name] = [self.used, count]
        block = self.rows[self.used:self.used + count]  # [count, d_model]
        self.used += count
        return block


def zero_params(config: Config) -> dict:
    """float64 numpy params of `config`'s shapes: every weight and bias 0, every LayerNorm weight 1."""

    def fill(name, shape):
        return np.ones(shape) if name.endswith("_w") else np.zeros(shape)

    shapes = param_shapes(config)
    params = {name: fill(name, shape) for name, shape in shapes.items() if name != "blocks"}
    params["blocks"] = {name: fill(name, shape) for name, shape in shapes["blocks"].items()}
    return params


def to_jax(params: dict) -> dict:
    """float64 numpy params -> float32 jax arrays (the layout `weights.load` returns)."""
    return {name: to_jax(value) if isinstance(value, dict) else jnp.asarray(np.asarray(value, np.float32))
            for name, value in params.items()}


def ln_gain(norm_squared: float, config: Config) -> float:
    """nu = 1 / sqrt(|x|^2 / d_model + eps): LayerNorm's factor on a mean-free x of squared norm |x|^2."""
    return 1.0 / math.sqrt(norm_squared / config.d_model + config.ln_eps)


def outer(directions: np.ndarray, slots: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """sum_i scale * directions[i] (x) slots[i]: a matrix sending direction i to slot vector i.
    directions [n, d_in], slots [n, d_out] -> [d_in, d_out]"""
    return scale * directions.T @ slots


def one_hot(indices, size: int) -> np.ndarray:
    """[len(indices), size] rows of the identity."""
    return np.eye(size)[np.asarray(indices, np.int64)]


@dataclasses.dataclass
class PositionCode:
    """The directions and sizes of `position_embedding`."""

    anchor: np.ndarray  # [d_model]
    bos: np.ndarray  # [d_model]
    parity: np.ndarray  # [d_model]
    ramp_s: np.ndarray  # [d_model]
    ramp_c: np.ndarray  # [d_model]
    size: float  # A = P = R
    n_ctx: int

    @property
    def norm_squared(self) -> float:
        """|wpe[t]|^2, the same at every position."""
        return 3 * self.size**2

    def phi(self) -> np.ndarray:
        """[n_ctx] the ramp's angle at each position."""
        return (np.arange(self.n_ctx) / (self.n_ctx - 1) - 0.5) * RAMP_SPAN


def position_embedding(dirs: Directions, n_ctx: int, size: float = 1.0) -> tuple[np.ndarray, PositionCode]:
    """wpe [n_ctx, d_model] of the module doc: anchor (bos at t = 0), parity and ramp, each of size `size`."""
    anchor, bos, parity = dirs.take("anchor")[0], dirs.take("bos")[0], dirs.take("parity")[0]
    ramp_s, ramp_c = dirs.take("ramp", 2)
    code = PositionCode(anchor, bos, parity, ramp_s, ramp_c, size, n_ctx)
    t = np.arange(n_ctx)  # [n_ctx]
    first = (t == 0)[:, None]  # [n_ctx, 1]
    phi = code.phi()[:, None]  # [n_ctx, 1]
    wpe = size * (np.where(first, bos, anchor) + ((-1.0) ** t)[:, None] * parity
                  + np.sin(phi) * ramp_s + np.cos(phi) * ramp_c)  # [n_ctx, d_model]
    return wpe, code


def recency_rho(step: float, n_ctx: int) -> float:
    """rho such that rho sin phi_t grows by at least `step` per position: sin(phi + d) - sin(phi) =
    2 cos(phi + d/2) sin(d/2) >= 2 cos(pi/3) sin(d/2) = sin(d/2), d = RAMP_SPAN / (n_ctx - 1)."""
    return step / math.sin(RAMP_SPAN / (n_ctx - 1) / 2)


def positional_head(blocks: dict, layer: int, head: int, code: PositionCode, nu: float, config: Config, *,
                    step: float, gamma: float) -> None:
    """W_Q, W_K of a head whose score of key s from query t (t >= 1) is rho sin phi_s + gamma (-1)^(t+s)
    (rho = `recency_rho(step)`), in nats, when its LayerNorm gain is `nu`. gamma = -2 step makes a
    previous-token head (key t - 1 wins by >= 2 step nats), gamma = +2 step a self head (key t wins by
    >= 2 step). Uses slots 0 and 1 of the head; the query's slot 0 reads the anchor, its slot 1 the parity;
    the key's slot 0 reads ramp_s, its slot 1 the parity:

        q = sqrt(d_head) [rho, gamma (-1)^t],  k = [sin phi_s, (-1)^s],  q . k / sqrt(d_head) = the score"""
    rho, A, dh = recency_rho(step, code.n_ctx), code.size, config.d_head
    slots = one_hot([0, 1], dh)  # [2, d_head]
    blocks["W_Q"][layer, head] += outer(np.stack([code.anchor, code.parity]), slots * np.array([[rho], [gamma]]),
                                        math.sqrt(dh) / (nu * A))
    blocks["W_K"][layer, head] += outer(np.stack([code.ramp_s, code.parity]), slots, 1.0 / (nu * A))


def copy_ov(blocks: dict, layer: int, head: int, reads: np.ndarray, writes: np.ndarray, *, nu: float, size: float,
            gain: float, config: Config) -> None:
    """W_V, W_O of a head that moves feature i (reads[i], present with coefficient `size` where the head
    attends, read through a LayerNorm of gain `nu`) into writes[i] with coefficient `gain`: value slot i =
    the feature's coefficient / size, out = gain * sum_i slot_i writes[i].  reads, writes [n, d_model]"""
    slots = one_hot(np.arange(len(reads)), config.d_head)  # [n, d_head]
    blocks["W_V"][layer, head] += outer(reads, slots, 1.0 / (nu * size))
    blocks["W_O"][layer, head] += outer(slots, writes, gain)


def gelu_new(x: float) -> float:
    """GPT-2's tanh GELU (the engine's), in float64."""
    return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


E = 1.0  # the size of every token embedding: wte[x] = E tok_x


def embeddings_and_previous_token_head(config: Config, step: float, *, moved=None, moved_name="previous_token"):
    """The start every organism shares: zero params (`zero_params`) with wte[x] = E tok_x, the position code
    (`position_embedding`), and head 1 of layer 0 a previous-token head (`positional_head`, margin 2 step nats)
    that moves tok_x, for the ids `moved` (default: every token), into a direction of its own (`copy_ov`,
    coefficient 1). Directions are taken in this order: tokens, moved, positions.
    -> (params, dirs, tok [vocab, d_model], moved directions [len(moved), d_model], PositionCode)"""
    moved = list(range(config.vocab_size)) if moved is None else list(moved)
    dirs = Directions(config.d_model)
    tok = dirs.take("token", config.vocab_size)  # [vocab, d_model]
    moved_dirs = dirs.take(moved_name, len(moved))  # [moved, d_model]
    params = zero_params(config)
    params["wte"] = E * tok  # [vocab, d_model]
    params["wpe"], code = position_embedding(dirs, config.n_ctx)  # [n_ctx, d_model]
    nu0 = ln_gain(E**2 + code.norm_squared, config)
    positional_head(params["blocks"], 0, 1, code, nu0, config, step=step, gamma=-2 * step)
    copy_ov(params["blocks"], 0, 1, tok[moved], moved_dirs, nu=nu0, size=E, gain=1.0, config=config)
    return params, dirs, tok, moved_dirs, code


# ------------------------------------------------------------------------------------------------ induction


def induction(*, vocab_size: int = 60, d_model: int = 128, n_ctx: int = 64, step: float = 5.0,
              match: float = 20.0, copy_gain: float = 6.0) -> Organism:
    """A two-layer induction circuit (Olsson et al. 2022), two heads per layer.

    Residual features (orthonormal mean-free directions, see the module doc): the current token tok_x
    (wte[x] = E tok_x, E = 1), the previous token prev_x, and the positions (anchor / bos, parity, ramp, size
    1). At layer 0 every position has |x|^2 = E^2 + 3 = 4, so LayerNorm multiplies by nu0 = 1/sqrt(4/d + eps).

    L0H1, previous-token head. QK from `positional_head` with gamma = -2 step: key t - 1 beats every other
    key by >= 2 step = 10 nats, so its attention to t - 1 is > 0.999. OV: tok_x -> prev_x with coefficient
    P = 1 (`copy_ov`): after layer 0, position t holds E tok_(x_t) + prev_(x_(t-1)), |x|^2 = 5 (nu1).
    At t = 0 it attends to itself and writes prev_(x_0).

    L1H1, induction head. The query reads tok_x into slot x, the key reads prev_y into slot y:
    score(t, s) = match [x_t == x_(s-1)] = 20 nats for every key whose previous token is the current token,
    0 for the others. Key 0 (whose prev_ is its own token, written by L0H1 at t = 0) also reads bos into the
    last slot, which the query meets with the anchor: score - 2 match there. OV: tok_z -> copy_gain tok_z,
    so the head writes the embedding direction of the token after the previous occurrence(s) of the current
    token; read by the tied unembedding this is a logit of nu_f E copy_gain ~ 10.6 for it against nu_f E^2 ~
    1.8 for the current token and 0 for every other token (nu_f: the final LayerNorm's gain, |x|^2 = 5 + 36).
    With k earlier matching keys the head splits its attention equally over them (k = 1 for a sequence
    without repeats).

    Decoys, to be told apart from the planted heads: L0H0 attends to its own position (gamma = +2 step; W_V
    = 0), L1H0 to position 0 (query anchor x key bos, 20 nats; W_V = 0). MLPs are zero.

    Truth: previous_token_head, induction_head, self_head, sink_head ([layer, head]), match_nats,
    previous_margin_nats (the least margin of L0H1's target key), copy_gain, vocab."""
    vocab_size = check_int(vocab_size, "vocab_size", low=1)
    d_model = check_d_model(d_model, 2 * vocab_size + 5)
    n_ctx = check_int(n_ctx, "n_ctx", low=2)  # the position ramp spans n_ctx - 1 steps
    check_positive(step=step, match=match, copy_gain=copy_gain)
    n_head = 2
    config = Config(n_layer=2, n_head=n_head, d_model=d_model, d_head=d_model // n_head, d_mlp=64,
                    n_ctx=n_ctx, vocab_size=vocab_size)
    if vocab_size > config.d_head - 1 or 2 * vocab_size + 5 > d_model - 1:
        raise InputError(f"vocab_size {vocab_size} does not fit d_model {d_model} (one-hot codes, two per token)")
    # layer 0: H1 previous token, H0 self (decoy)
    params, dirs, tok, prev, code = embeddings_and_previous_token_head(config, step)
    blocks = params["blocks"]
    positional_head(blocks, 0, 0, code, ln_gain(E**2 + code.norm_squared, config), config, step=step,
                    gamma=2 * step)

    # layer 1: H1 induction, H0 sink (decoy)
    nu1 = ln_gain(E**2 + code.norm_squared + 1.0, config)
    dh, slots = config.d_head, one_hot(np.arange(vocab_size), config.d_head)  # [vocab, d_head]
    last = one_hot([dh - 1], dh)  # [1, d_head]
    blocks["W_Q"][1, 1] = (outer(tok, slots, match * math.sqrt(dh) / (nu1 * E))
                           + outer(code.anchor[None], last, -2 * match * math.sqrt(dh) / (nu1 * code.size)))
    blocks["W_K"][1, 1] = outer(prev, slots, 1.0 / nu1) + outer(code.bos[None], last, 1.0 / (nu1 * code.size))
    copy_ov(blocks, 1, 1, tok, tok, nu=nu1, size=E, gain=copy_gain, config=config)
    blocks["W_Q"][1, 0] = outer(code.anchor[None], one_hot([0], dh), match * math.sqrt(dh) / (nu1 * code.size))
    blocks["W_K"][1, 0] = outer(code.bos[None], one_hot([0], dh), 1.0 / (nu1 * code.size))

    truth = {"previous_token_head": [0, 1], "induction_head": [1, 1], "self_head": [0, 0], "sink_head": [1, 0],
             "match_nats": match, "previous_margin_nats": 2 * step, "copy_gain": copy_gain,
             "vocab": vocab_size, "directions": dirs.names}
    names = tuple(f"t{i}" for i in range(vocab_size))
    return Organism("induction", config, to_jax(params), truth, names)


# ----------------------------------------------------------------------------------------------- fact store

FIRST_NAMES = ("Ada", "Ben", "Cleo", "Dev")
LAST_NAMES = (" Moss", " Park", " Quill", " Reyes")
RELATION = " plays"
ATTRIBUTES = (" chess", " tennis", " rugby", " golf", " polo", " judo", " hockey", " squash")
FILLERS = (" the", " of", " and", " a", " in", " to", " is", " was", " he", " she", " it", " at", " on",
           " by", ",", ".", "\n", "<|endoftext|>")
FACT_NEURONS = tuple(5 + 7 * k for k in range(8))  # neuron of fact k in MLP 1


def fact_store(*, d_model: int = 128, d_mlp: int = 64, n_ctx: int = 16, step: float = 5.0, tau: float = 20.0,
               write: float = 40.0, move: float = 20.0, carry: float = 8.0) -> Organism:
    """A three-layer fact store, the ROME picture (Meng et al. 2022; Geva et al. 2023) made by hand.

    Vocabulary (35 tokens): first names Ada Ben Cleo Dev, last names Moss Park Quill Reyes, the relation
    " plays", eight sports, fillers. Eight facts, each first and each last name in two of them, so neither
    name alone determines the sport: fact k = (FIRST[k // 2], LAST[(k // 2 + k % 2) % 4]) -> ATTRIBUTES[k],
    e.g. Ada Moss -> chess, Ada Park -> tennis, Ben Park -> rugby. The prompt is [first, last, " plays"].

    Features: tok_x (wte[x] = E tok_x, E = 1), first_f (the first name, moved), positions (size 1).

    Layer 0, H1: previous-token head (`positional_head`, margin 2 step nats) whose OV reads only the first
    names' tok_f and writes first_f (coefficient 1): at the last-name position the residual holds
    E tok_l + first_f + positions, |x|^2 = 5 (LayerNorm gain nu).

    Layer 1, MLP: neuron FACT_NEURONS[k] has key W_in[:, n] = tau / (nu E) tok_(l_k) + tau / nu first_(f_k) and
    bias -1.5 tau, so its pre-activation is tau ([last == l_k] + [first == f_k]) - 1.5 tau: +10 when both
    names match (GELU 10), -10 when one does, -30 when none does (GELU ~ 0). Its value W_out[n] =
    write / gelu(10) tok_(a_k): the attribute's embedding direction, written with coefficient `write` = 40 at
    the last-name position only.

    Layer 2, H0: attribute mover. Its query reads the relation token (slot 0), its key the sum of the
    attribute directions: score move = 20 nats at a position holding an attribute, 0 elsewhere. Since the
    written attribute dominates that position's norm, the key is the same whatever else is there (the
    subject's noise in causal tracing included). OV: tok_a -> carry tok_a (coefficient 8) at the relation
    token, where the tied unembedding reads it as a logit of ~11 for the attribute (~1.4 for " plays").

    Every other weight is zero. Truth: fact_layer (1), mover_head ([2, 0]), previous_head ([0, 1]), and per
    fact its first, last, attribute (ids), neuron, prompt (ids), subject positions [0, 1] and the last
    subject position 1."""
    names = FIRST_NAMES + LAST_NAMES + (RELATION,) + ATTRIBUTES + FILLERS
    d_model = check_d_model(d_model, len(names) + len(FIRST_NAMES) + 5)
    d_mlp = check_int(d_mlp, "d_mlp", low=max(FACT_NEURONS) + 1)  # the fact neurons are fixed ids
    n_ctx = check_int(n_ctx, "n_ctx", low=3)  # the prompts are [first, last, " plays"]
    check_positive(step=step, tau=tau, write=write, move=move, carry=carry)
    n_head = 2
    config = Config(n_layer=3, n_head=n_head, d_model=d_model, d_head=d_model // n_head, d_mlp=d_mlp, n_ctx=n_ctx,
                    vocab_size=len(names))
    ids = {name: i for i, name in enumerate(names)}
    # layer 0, H1: previous token, moving first names only
    params, dirs, tok, first_dirs, code = embeddings_and_previous_token_head(
        config, step, moved=[ids[n] for n in FIRST_NAMES], moved_name="first_name")
    blocks = params["blocks"]

    # layer 1, MLP: one neuron per fact
    nu1 = ln_gain(E**2 + code.norm_squared + 1.0, config)
    facts = []
    for k, attribute in enumerate(ATTRIBUTES):
        f, l = k // 2, (k // 2 + k % 2) % len(LAST_NAMES)
        n = FACT_NEURONS[k]
        blocks["W_in"][1, :, n] = tau / (nu1 * E) * tok[ids[LAST_NAMES[l]]] + tau / nu1 * first_dirs[f]
        blocks["b_in"][1, n] = -1.5 * tau
        blocks["W_out"][1, n] = write / gelu_new(0.5 * tau) * tok[ids[attribute]]
        prompt = [ids[FIRST_NAMES[f]], ids[LAST_NAMES[l]], ids[RELATION]]
        facts.append({"first": ids[FIRST_NAMES[f]], "last": ids[LAST_NAMES[l]], "attribute": ids[attribute],
                      "neuron": n, "prompt": prompt, "subject_positions": [0, 1], "last_subject_position": 1,
                      "text": f"{FIRST_NAMES[f]}{LAST_NAMES[l]}{RELATION} ->{attribute}"})

    # layer 2, H0: attribute mover
    attribute_dirs = tok[[ids[a] for a in ATTRIBUTES]]  # [8, d_model]
    nu2 = ln_gain(E**2 + code.norm_squared + 1.0 + write**2, config)  # the last-name position after MLP 1
    nu_relation = ln_gain(E**2 + code.norm_squared, config)  # the relation position (nothing written there)
    dh = config.d_head
    blocks["W_Q"][2, 0] = outer(tok[[ids[RELATION]]], one_hot([0], dh), move * math.sqrt(dh) / (nu_relation * E))
    blocks["W_K"][2, 0] = outer(attribute_dirs.sum(0, keepdims=True), one_hot([0], dh), 1.0 / (nu2 * write))
    copy_ov(blocks, 2, 0, attribute_dirs, attribute_dirs, nu=nu2, size=write, gain=carry, config=config)

    truth = {"fact_layer": 1, "previous_head": [0, 1], "mover_head": [2, 0], "relation": ids[RELATION],
             "facts": facts, "neuron_pre_activation": {"both": 0.5 * tau, "one": -0.5 * tau, "none": -1.5 * tau},
             "attribute_write": write, "directions": dirs.names}
    return Organism("fact_store", config, to_jax(params), truth, names)


# ----------------------------------------------------------------------------------------- massive activation

FUNCTION_WORDS = (" the", " of", " and", ",")
CONTENT_WORDS = (" cat", " river", " stone", " music", " green", " slow", " run", " build", " paper",
                 " light", " north", " apple", " glass", " storm", " field", " quiet", " iron", " sugar",
                 " cloud", " horse", " bread", " silver", " winter", " garden", " tower", " window", " shadow",
                 "<|endoftext|>")


def massive_activation(*, d_model: int = 128, d_mlp: int = 64, n_ctx: int = 64, layer: int = 1, dim: int = 47,
                       neuron: int = 11, sigma1: float = 40.0, sigma2: float = 15.0, activation: float = 50.0,
                       step: float = 5.0) -> Organism:
    """A massive activation (Sun et al. 2024) with known geometry, in a three-layer model.

    MLP `layer` (1) has W_out = sigma1 e_neuron e_dim^T + sum_(i>=2) sigma_i u_i w_i^T: its top singular pair
    is the d_mlp basis vector of `neuron` (11) and the residual basis vector e_dim (dim 47, a plain coordinate,
    like GPT-2's dim 447), with sigma1 = 40; the rest is a rank-5 matrix of singular values sigma2 = 15, 12,
    9, 6, 3 whose input directions u_i avoid `neuron` and whose output directions w_i are orthonormal, mean-free
    and zero at `dim` (seeded draws, QR). So mlp_out[dim] = sigma1 mlp_post[neuron] exactly: the regression
    of mlp_out[dim] on the projection h . u1 = +-mlp_post[neuron] has slope +-sigma1 (the sign is the SVD's
    choice of u1) and R^2 = 1. Centred on the d_model side, as `probes.svd` centres W_out, the singular values
    are sigma1 sqrt(1 - 1/d_model) (e_dim's mean removed) and sigma2, ... unchanged.

    The neuron's key reads the four function words (" the", " of", " and", ","): W_in[:, neuron] = kappa sum_w
    tok_w with bias -10, scaled so that its pre-activation is `activation` = 50 at a function word and -10
    elsewhere. At a function word mlp_out[dim] = sigma1 gelu(50) = 2000, at least 1000 x the median |value|
    of the residual there; the other tokens' residuals stay O(1). The residual carries it on through layer 2.
    The MLP stages at a function word: LayerNorm output O(1), mlp_pre 50, mlp_post 50, mlp_out 2000: the
    jump, x sigma1, is at W_out.

    The other neurons of MLP 1 read content words only (seeded random keys, zero bias): they are silent at
    function words. Layer 0 has a previous-token head (L0H1, as in `induction`, writing into its own
    subspace), so attention is present but plays no part in the massive activation (the exclusion test).
    Layer 2 and the rest are zero.

    Truth: layer, dim, neuron, tokens (function-word ids), value (2000), sigma1, sigma2, singular_values,
    centred_sigma1, slope (|slope|), activation."""
    names = FUNCTION_WORDS + CONTENT_WORDS
    d_model = check_d_model(d_model, 2 * len(names) + 5)
    d_mlp = check_int(d_mlp, "d_mlp", low=6)  # the neuron and the five other singular directions
    n_ctx = check_int(n_ctx, "n_ctx", low=2)  # the position ramp spans n_ctx - 1 steps
    layer = check_int(layer, "layer", low=0, high=2)  # 3 layers
    dim = check_int(dim, "dim", low=0, high=d_model - 1)
    neuron = check_int(neuron, "neuron", low=0, high=d_mlp - 1)
    check_positive(sigma1=sigma1, sigma2=sigma2, activation=activation, step=step)
    n_head = 2
    config = Config(n_layer=3, n_head=n_head, d_model=d_model, d_head=d_model // n_head, d_mlp=d_mlp, n_ctx=n_ctx,
                    vocab_size=len(names))
    rng = np.random.default_rng(0)
    params, dirs, tok, _, code = embeddings_and_previous_token_head(config, step)
    blocks = params["blocks"]

    # MLP `layer`: the function-word neuron, off = -10 elsewhere
    nu1 = ln_gain(E**2 + code.norm_squared + 1.0, config)
    function = list(range(len(FUNCTION_WORDS)))
    off = -10.0
    blocks["W_in"][layer, :, neuron] = (activation - off) / (nu1 * E) * tok[function].sum(0)
    blocks["b_in"][layer, neuron] = off
    # content neurons: random keys over the content words' directions, O(1) pre-activations
    content = tok[len(FUNCTION_WORDS):]  # [n_content, d_model]
    others = [i for i in range(d_mlp) if i != neuron]
    keys = rng.standard_normal((len(content), len(others))) / (nu1 * E)  # [n_content, d_mlp - 1]
    blocks["W_in"][layer][:, others] = content.T @ keys

    # W_out = sigma1 e_neuron e_dim^T + U_rest diag(rest) W_rest^T
    rest = np.array([sigma2, 12.0, 9.0, 6.0, 3.0])
    if not sigma1 > sigma2 > rest[1]:
        raise InputError(f"need sigma1 > sigma2 > {rest[1]}, got {sigma1}, {sigma2}")
    e_dim = np.eye(d_model)[dim]  # [d_model]
    fixed = np.stack([e_dim, np.ones(d_model)], axis=1)  # [d_model, 2]
    q, _ = np.linalg.qr(np.concatenate([fixed, rng.standard_normal((d_model, len(rest)))], axis=1))
    w_rest = q[:, 2:]  # [d_model, 5] orthonormal, orthogonal to e_dim and to the all-ones vector
    u, _ = np.linalg.qr(np.concatenate([np.eye(d_mlp)[:, [neuron]], rng.standard_normal((d_mlp, len(rest)))], 1))
    u_rest = u[:, 1:]  # [d_mlp, 5] orthonormal, zero at `neuron`
    u_rest[neuron] = 0.0  # exactly (QR leaves ~1e-17)
    W_out = sigma1 * np.outer(np.eye(d_mlp)[neuron], e_dim) + u_rest @ np.diag(rest) @ w_rest.T  # [d_mlp, d_model]
    blocks["W_out"][layer] = W_out

    value = sigma1 * gelu_new(activation)
    truth = {"layer": layer, "dim": dim, "neuron": neuron, "tokens": function, "value": value,
             "activation": gelu_new(activation), "sigma1": sigma1, "sigma2": sigma2,
             "singular_values": [sigma1, *rest.tolist()], "centred_sigma1": sigma1 * math.sqrt(1 - 1 / d_model),
             "slope": sigma1, "previous_token_head": [0, 1], "directions": dirs.names}
    return Organism("massive_activation", config, to_jax(params), truth, names)


ORGANISMS = {"induction": induction, "fact_store": fact_store, "massive_activation": massive_activation}


def build(name: str, **options) -> Organism:
    """The organism `name` (one of ORGANISMS), built with the builder's defaults or `options`."""
    if name not in ORGANISMS:
        raise InputError(f"unknown organism {name!r}; choose one of {', '.join(ORGANISMS)}")
    return ORGANISMS[name](**options)


__all__ = ["Organism", "ORGANISMS", "build", "induction", "fact_store", "massive_activation", "read_truth",
           "trained_path", "TRAINED_DIR",
           "FIRST_NAMES", "LAST_NAMES", "RELATION", "ATTRIBUTES", "FUNCTION_WORDS", "FACT_NEURONS"]
