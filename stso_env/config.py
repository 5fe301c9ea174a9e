"""Typed configuration: dataclass schemas loaded strictly from YAML.

Every section is a dataclass. Loading walks the YAML mapping against the
dataclass fields and raises :class:`~stso_env.errors.ConfigError` on an unknown
key, a value of the wrong type or a value out of range. The message names the
dotted key, the file it came from and what is allowed, for example::

    configs/train.yaml: optim.lr_warmup: unknown key; allowed keys in 'optim': betas, eps, lr, ...

Constraints live next to each field as ``metadata`` (``range=(lo, hi)`` or
``choices=(...)``), so the schema, the validation and the documentation are one
thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stso_env.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
ASSETS_DIR = REPO_ROOT / "assets"

T = TypeVar("T")


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its documentation and constraints attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ModelConfig:
    """Which model to build: a GPT-2 or a T5 (see :mod:`stso_env.train.presets`)."""

    preset: str = _f("tiny", "model size preset: GPT-2 shapes (causal LM) or T5 shapes (encoder-decoder, "
                     "span corruption)", choices=("tiny", "bench10m", "small", "medium", "large",
                                                  "t5-tiny", "t5-small", "t5-base"))
    pretrained: str | None = _f(
        None,
        "local Hugging Face model folder (or an explicit hub id) to start from real weights; "
        "None trains from scratch",
    )
    dropout: float = _f(0.0, "dropout on embeddings, attention and residuals (0 for pre-training)",
                        range=(0.0, 0.9))
    attn_implementation: str = _f("eager", "attention kernel of the training steps: 'sdpa' is the fast path "
                                  "(torch's scaled_dot_product_attention; use it on GPUs); the probe pass that "
                                  "measures attention entropy always runs eager", choices=("eager", "sdpa"))
    qk_norm: bool = _f(False, "LayerNorm on queries and keys per head (Wortsman et al. 2023, arXiv 2309.14322): "
                       "stops attention-logit growth at high LR; from-scratch models only")
    gradient_checkpointing: bool = _f(
        False, "activation checkpointing: recompute each block's activations in the backward pass instead of "
        "keeping them (less memory, about a third more compute; for the large presets). The same numbers are "
        "computed, so it is outside the config hash and a run may resume with it switched", hashed=False)


@dataclass
class DataConfig:
    """Corpus, tokenizer and batch geometry."""

    corpus: str = _f("builtin", "'builtin' (generated, needs nothing), a text file/folder path, "
                     "or 'hf:<dataset>[:<config>]' (online only)")
    tokenizer: str = _f("byte", "'byte', a folder with vocab.json+merges.txt, 'gpt2:<dir>' or 'hf:<id>'")
    seq_len: int | None = _f(None, "tokens per training sequence; None = the preset's context",
                             range=(8, 1_048_576))
    batch_size: int = _f(8, "sequences per optimizer step", range=(1, 1_000_000))
    builtin_chars: int = _f(2_000_000, "characters of built-in corpus to generate", range=(10_000, 10**9))
    corpus_seed: int = _f(0, "seed of the built-in corpus text (kept apart from the run seed so runs with "
                          "different seeds train on the same language)", range=(0, 2**32 - 1))
    valid_fraction: float = _f(0.05, "fraction held out for validation when no split is given",
                               range=(0.001, 0.5))
    reorder_block: int = _f(64, "sequences shuffled by one data-reorder intervention", range=(2, 10**7))


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay."""

    lr: float = _f(3e-3, "peak learning rate", range=(1e-8, 10.0))
    min_lr_ratio: float = _f(0.1, "final LR as a fraction of the peak", range=(0.0, 1.0))
    warmup_steps: int = _f(50, "linear warm-up steps", range=(0, 10**9))
    decay_steps: int | None = _f(None, "cosine length; None = the run's total steps", range=(1, 10**12))
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay on 2-D weights", range=(0.0, 10.0))
    beta1: float = _f(0.9, "Adam first-moment decay", range=(0.0, 0.99999))
    beta2: float = _f(0.95, "Adam second-moment decay", range=(0.0, 0.99999999))
    eps: float = _f(1e-8, "Adam epsilon", range=(1e-30, 1.0))
    max_grad_norm: float = _f(1.0, "static global-norm clip; ZClip and SPAM replace it (as in their papers), "
                              "off and ARC keep it; 0 disables",
                              range=(0.0, 1e12))
    micro_batches: int = _f(1, "gradient-accumulation shards per step", range=(1, 4096))


@dataclass
class ClipConfig:
    """Parameters of the adaptive clip policies (GUIDE section 4)."""

    zclip_alpha: float = _f(0.97, "ZClip EMA decay of grad-norm mean/variance", range=(0.0, 0.99999))
    zclip_z_thresh: float = _f(2.5, "ZClip z-score threshold", range=(0.1, 100.0))
    zclip_warmup: int = _f(25, "ZClip steps collecting norms before clipping", range=(1, 10**6))
    arc_shards: int = _f(4, "ARC: number of micro-batch gradient vectors (at least micro_batches)",
                         range=(2, 4096))
    arc_f: int = _f(1, "ARC: assumed number of corrupted shards f (k = floor(2 f/n (n-f)))",
                    range=(0, 4095))
    spam_theta: float = _f(5000.0, "SPAM spike threshold: g^2 > theta * v is clipped", range=(1.0, 1e12))

    def validate(self, source: str) -> None:
        if self.arc_f * 2 >= self.arc_shards:
            raise ConfigError(
                f"{source}: clip.arc_f: {self.arc_f} corrupted of {self.arc_shards} shards is not a minority; "
                f"ARC needs 2*arc_f < arc_shards (e.g. arc_f: 1 with arc_shards: 4)"
            )


@dataclass
class CheckpointConfig:
    """Quantum checkpoint store settings (see :mod:`stso_env.cp`)."""

    every: int = _f(1000, "steps between checkpoints; 0 disables periodic checkpoints", range=(0, 10**12))
    keep: int = _f(2, "newest checkpoints kept on disk", range=(2, 10**6))
    quantize: str = _f("none", "Adam moment storage: lossless, 8-bit blockwise, or bfloat16",
                       choices=("none", "int8", "bf16"))
    async_write: bool = _f(True, "compress and write on a background thread")
    level: int = _f(1, "zstd level (1 beats 3 on fp32 bytes)", range=(-5, 22))


@dataclass
class TrainConfig:
    """Everything a training run needs; ``configs/train/*.yaml`` hold presets of it."""

    seed: int = _f(0, "seed for model init, data order, scenario noise and RNG streams", range=(0, 2**32 - 1))
    steps: int = _f(2000, "optimizer steps in the run (the LR schedule's horizon)", range=(1, 10**12))
    precision: str = _f("fp32", "'bf16' runs the forward pass under bf16 autocast (slow on CPU)",
                        choices=("fp32", "bf16"))
    device: str = _f("auto", "'auto' picks CUDA when present", choices=("auto", "cpu", "cuda"))
    scenario: str = _f("calm", "instability scenario: a name in configs/scenarios or a YAML path")
    probe_batches: int = _f(1, "batches of the probe split in the fixed probe (what controllers may look at)",
                            range=(1, 10**4))
    activation_stats_every: int = _f(0, "steps between activation/attention summaries; 0 = only at "
                                     "checkpoints", range=(0, 10**9))
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model section"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data section"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer section"})
    clip: ClipConfig = field(default_factory=ClipConfig, metadata={"help": "clip policy section"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig,
                                         metadata={"help": "checkpoint section"})

    def validate(self, source: str) -> None:
        if self.data.batch_size % self.optim.micro_batches:
            raise ConfigError(
                f"{source}: optim.micro_batches: {self.optim.micro_batches} does not divide "
                f"data.batch_size {self.data.batch_size}; pick a divisor"
            )


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp``; allow int -> float, nothing else implicit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept numeric strings for floats only.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported schema type {tp!r}")  # pragma: no cover - schema bug


def _check_constraints(value: Any, f: dataclasses.Field, where: str) -> None:
    if value is None:
        return
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    rng = f.metadata.get("range")
    if rng is not None:
        lo, hi = rng
        if not (lo <= value <= hi):
            raise ConfigError(f"{where}: {value!r} is out of range; allowed {lo} <= value <= {hi}")


def from_dict(cls: type[T], data: Any, *, source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly.

    ``source`` (usually the YAML path) and ``prefix`` (the dotted section) are
    only used to make error messages point at the right place.
    """
    where_section = prefix.rstrip(".") or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where_section}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{source}: {prefix}{key}"
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown key; allowed keys in '{where_section}': {allowed}")
        f = fields[key]
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, source=source, prefix=f"{prefix}{key}.")
            continue
        coerced = _coerce(value, tp, where)
        _check_constraints(coerced, f, where)
        kwargs[key] = coerced
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(source)
    return obj


def instance_or_kwargs(cls: type[T], value: Any, name: str) -> T:
    """``value`` itself when it is a ``cls``, else ``cls(**value)`` (None: the defaults); an unknown
    keyword is a :class:`ConfigError` naming ``name`` and the allowed keys."""
    if isinstance(value, cls):
        return value
    try:
        return cls(**(value or {}))
    except TypeError as exc:
        allowed = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        raise ConfigError(f"{name}: {exc}; allowed keys: {allowed}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-data view of a config dataclass (tuples become lists, for YAML/JSON)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(obj)


def _hashed_dict(obj: Any) -> Any:
    """:func:`to_dict` without the fields marked ``hashed=False`` (options that change how, not what, a run
    computes); a new such field leaves the hash of every existing config, and its checkpoints, valid."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _hashed_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("hashed", True)}
    return to_dict(obj) if isinstance(obj, (list, tuple, dict)) else obj


def config_hash(obj: Any) -> str:
    """Stable short hash of a config, stored in checkpoints to detect mismatched resumes."""
    blob = json.dumps(_hashed_dict(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        with p.open("r", encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is ``{}``); anything else is a ConfigError."""
    raw = load_yaml(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file, then apply dotted-key ``overrides`` (e.g. ``{"optim.lr": 1e-3}``).

    Overrides are validated exactly like file values and reported as coming from
    ``<override>``.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        data, source = load_yaml_mapping(path), str(path)
    obj = from_dict(cls, data, source=source)
    if overrides:
        obj = apply_overrides(obj, overrides)
    return obj


def apply_overrides(obj: T, overrides: dict[str, Any]) -> T:
    """Return a copy of config ``obj`` with dotted keys replaced, validated strictly."""
    data = to_dict(obj)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"<override>: {dotted}: '{part}' is not a config section")
            node = node[part]
        node[parts[-1]] = value
    return from_dict(type(obj), data, source="<override>")


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) rows for documentation and ``--help`` texts."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        extra = ""
        if "choices" in f.metadata:
            extra = f" (one of {', '.join(map(str, f.metadata['choices']))})"
        elif "range" in f.metadata:
            lo, hi = f.metadata["range"]
            extra = f" ({lo}..{hi})"
        rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "") + extra))
    return rows
