"""Optional lossy storage for Adam moments (``exp_avg`` and ``exp_avg_sq``).

Reference: 2022_Dettmers_8bitOptimizers (keys in ``assets/related_work.md``).

Modes:

- ``"none"``: everything lossless (the default; resumes bit-exactly).
- ``"bf16"``: moments stored as bfloat16 (round to nearest even; 8 significant bits, so the
  relative error is <= 2**-8 = 0.39 %, 0.14 % on average on GPT-2 AdamW moments).
- ``"int8"``: blockwise 8-bit quantisation after Dettmers et al., "8-bit Optimizers via
  Block-wise Quantization" (ICLR 2022, bitsandbytes): blocks of 256 entries, each scaled by
  its absolute maximum and mapped onto the 256-entry *dynamic* (tree) map, which spends
  its codes on orders of magnitude rather than on a uniform grid.
  The first moment ``m`` uses the signed map. For the second moment ``v`` we quantise
  ``sqrt(v)`` with the unsigned map and square after dequantising: ``v`` spans twice as
  many orders of magnitude as ``sqrt(v)``, and naive int8 of ``v`` rounds small entries to
  zero, which makes the restored update ``m / (sqrt(v) + eps)`` explode. As a further
  guard, a positive ``v`` is never given the zero code.

Only floating tensors stored under a dict key ``exp_avg`` / ``exp_avg_sq`` are eligible; a
moment holding NaN or Inf is stored losslessly, because one non-finite entry would poison
its block's scale and hide the divergence the checkpoint should record.

The arithmetic runs in numpy, not torch: it executes on the background writer thread, and
torch's OpenMP-parallel kernels called from a second thread fight the training thread for
the cores (measured here on 2 busy cores: a 130 MB ``copy_`` took 0.9 s instead of 6 ms).
numpy runs single-threaded and releases the GIL in its inner loops.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

#: Lossy modes accepted by ``quantize=``.
QUANTIZE_MODES = ("none", "bf16", "int8")
#: Entries per absmax block in int8 mode (small blocks keep the small entries of a block
#: that also holds one large entry representable).
INT8_BLOCK = 256
#: Dict keys whose tensors are Adam moments: key -> role.
MOMENT_KEYS = {"exp_avg": "m", "exp_avg_sq": "v"}

#: Per-tensor encodings written into the manifest.
ENC_GROUPED = "grouped"  # lossless, bytes grouped by position
ENC_BF16 = "bf16"
ENC_INT8_SIGNED = "int8_signed"  # m: signed dynamic map
ENC_INT8_SQRT = "int8_sqrt"  # v: unsigned dynamic map of sqrt(v)
LOSSY_ENCODINGS = (ENC_BF16, ENC_INT8_SIGNED, ENC_INT8_SQRT)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Codes are looked up by the top 20 bits of a float32 (sign, exponent, 11 mantissa bits):
# within one such bucket values differ by < 2**-11 relative, far below the map's spacing.
_LUT_SHIFT = 12

# Smallest positive value of each target dtype, as float32 (subnormals included).
_F32_SUBNORMAL = np.finfo(np.float32).smallest_subnormal
_SMALLEST_POSITIVE = {
    torch.float16: np.float32(np.finfo(np.float16).smallest_subnormal),
    torch.bfloat16: np.float32(2.0**-133),
}

Part = tuple[str, int, np.ndarray]
"""``(role, grouping width, 1-D uint8 array)``: one byte stream of an encoded tensor."""


@lru_cache(maxsize=2)
def dynamic_map(signed: bool) -> np.ndarray:
    """The 256-entry dynamic quantisation map of Dettmers et al. (sorted, float32).

    Follows bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``:
    decade ``i`` (values ``10**(i-6) * [0.1, 1]``) is split into ``2**i`` (signed) or
    ``2**(i+1)`` (unsigned) equal bins whose midpoints become codes, plus the exact values 0
    and 1. The signed map mirrors its positive codes.
    """
    values: list[float] = []
    for i in range(7):
        n_bins = 2**i if signed else 2 ** (i + 1)
        bounds = np.linspace(0.1, 1.0, n_bins + 1)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * (10.0 ** (i - 6))
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    values += [0.0, 1.0]
    if len(values) != 256:
        raise AssertionError(f"dynamic map has {len(values)} entries, expected 256")
    qmap = np.array(sorted(values), dtype=np.float32)
    qmap.setflags(write=False)
    return qmap


@lru_cache(maxsize=2)
def _code_lut(signed: bool) -> np.ndarray:
    """Nearest code for every float32 bucket of equal top-20 bits (2**20 entries)."""
    qmap = dynamic_map(signed)
    midpoints = (qmap[1:] + qmap[:-1]) / 2.0
    # Represent each bucket by its centre value; NaN buckets (never queried) map anywhere.
    centres = ((np.arange(1 << 20, dtype=np.uint32) << _LUT_SHIFT) | (1 << (_LUT_SHIFT - 1))).view(np.float32)
    with np.errstate(invalid="ignore"):
        lut = np.searchsorted(midpoints, np.clip(centres, -1.0, 1.0)).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def quantize_blockwise(
    x: np.ndarray, *, signed: bool, block: int = INT8_BLOCK, keep_nonzero: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax quantisation onto the dynamic map.

    Args:
        x: finite float32 values (flattened; non-negative when ``signed`` is False).
        signed: use the signed map (else the unsigned one).
        block: entries per absmax block.
        keep_nonzero: never give a positive entry the zero code (unsigned map only): the
            smallest positive code is used instead.

    Returns:
        ``(codes, absmax)``: ``uint8`` codes, one per entry, and one float32 scale per block.
    """
    if keep_nonzero and signed:
        raise ValueError("keep_nonzero is only defined for the unsigned map")
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    n_blocks = -(-n // block)
    codes = np.empty(n, dtype=np.uint8)
    absmax = np.empty(n_blocks, dtype=np.float32)
    lut = _code_lut(signed)
    # Work through slices of ~1M entries so the temporaries stay in cache and memory stays flat.
    step = max(1, (1 << 20) // block)
    for b0 in range(0, n_blocks, step):
        b1 = min(b0 + step, n_blocks)
        seg = flat[b0 * block : min(b1 * block, n)]
        if seg.size < (b1 - b0) * block:
            seg = np.concatenate([seg, np.zeros((b1 - b0) * block - seg.size, dtype=np.float32)])
        blocks = seg.reshape(b1 - b0, block)
        amax = np.abs(blocks).max(axis=1)
        # An all-zero block keeps scale 1 so 0/scale is 0, not NaN.
        scale = np.where(amax > 0, amax, np.float32(1.0))
        normed = blocks / scale[:, None]
        c = lut[normed.view(np.uint32) >> _LUT_SHIFT]
        if keep_nonzero:
            # Code 0 of the unsigned map is exactly 0.0; code 1 is its smallest positive value.
            c[(c == 0) & (blocks > 0)] = 1
        absmax[b0:b1] = amax
        end = min(b1 * block, n)
        codes[b0 * block : end] = c.reshape(-1)[: end - b0 * block]
    return codes, absmax


def dequantize_blockwise(
    codes: np.ndarray, absmax: np.ndarray, *, signed: bool, block: int = INT8_BLOCK
) -> np.ndarray:
    """Invert :func:`quantize_blockwise`: a flat float32 array of ``codes.size`` entries."""
    n = codes.size
    n_blocks = absmax.size
    if n_blocks != -(-n // block):
        raise ValueError(f"{n} codes need {-(-n // block)} block scales, got {n_blocks}")
    values = np.zeros(n_blocks * block, dtype=np.float32)
    values[:n] = dynamic_map(signed)[codes]
    return (values.reshape(n_blocks, block) * absmax[:, None]).reshape(-1)[:n]


def _float32(t: torch.Tensor) -> np.ndarray:
    """Flat float32 numpy copy/view of a contiguous CPU float tensor, computed in numpy."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        return (t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return t.numpy().astype(np.float32, copy=False)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (finite inputs)."""
    u = x.view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)


def _to_tensor(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A float32 numpy array as a tensor of ``dtype``."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(_bf16_bits(np.ascontiguousarray(x, dtype=np.float32)).view(np.int16)).view(
            dtype
        )
    np_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np_dtype))


def eligible(t: torch.Tensor, role: str | None, mode: str) -> bool:
    """Whether ``t`` (stored under a moment key with ``role``) gets a lossy encoding."""
    if mode == "none" or role is None or t.dtype not in _FLOAT_DTYPES or t.numel() == 0:
        return False
    if mode == "bf16" and t.dtype in (torch.bfloat16, torch.float16):
        # bf16 of an fp16 tensor would lose mantissa bits for no size gain.
        return False
    return bool(np.isfinite(_float32(t)).all())


def encode_moment(t: torch.Tensor, role: str, mode: str) -> tuple[str, list[Part]]:
    """Lossy-encode an Adam moment (call only when :func:`eligible` is True).

    Returns:
        ``(encoding, parts)`` for the manifest and the chunk writer.
    """
    x = _float32(t)
    if mode == "bf16":
        return ENC_BF16, [("data", 2, _bf16_bits(x).view(np.uint8))]
    if mode != "int8":
        raise ValueError(f"unknown quantize mode {mode!r}; expected one of {QUANTIZE_MODES}")
    if role == "m":
        codes, absmax = quantize_blockwise(x, signed=True)
        encoding = ENC_INT8_SIGNED
    elif role == "v":
        codes, absmax = quantize_blockwise(np.sqrt(np.maximum(x, 0.0)), signed=False, keep_nonzero=True)
        encoding = ENC_INT8_SQRT
    else:
        raise ValueError(f"unknown moment role {role!r}")
    return encoding, [("codes", 1, codes), ("absmax", 4, absmax.view(np.uint8))]


def part_sizes(encoding: str, numel: int) -> dict[str, int]:
    """Byte length of each part a lossy ``encoding`` of ``numel`` entries must have."""
    if encoding == ENC_BF16:
        return {"data": 2 * numel}
    if encoding in (ENC_INT8_SIGNED, ENC_INT8_SQRT):
        return {"codes": numel, "absmax": 4 * (-(-numel // INT8_BLOCK))}
    raise ValueError(f"unknown lossy encoding {encoding!r}")


def decode_moment(encoding: str, parts: dict[str, bytearray], dtype: torch.dtype, numel: int) -> torch.Tensor:
    """Rebuild a flat tensor of ``dtype`` from the parts of a lossy encoding."""
    if encoding == ENC_BF16:
        bits = np.frombuffer(parts["data"], dtype=np.uint16)
        return _to_tensor((bits.astype(np.uint32) << 16).view(np.float32), dtype)
    codes = np.frombuffer(parts["codes"], dtype=np.uint8)
    absmax = np.frombuffer(parts["absmax"], dtype=np.float32)
    if encoding == ENC_INT8_SIGNED:
        return _to_tensor(dequantize_blockwise(codes, absmax, signed=True), dtype)
    if encoding == ENC_INT8_SQRT:
        root = dequantize_blockwise(codes, absmax, signed=False)
        v = root * root
        # Squaring a tiny root can underflow; a non-zero code must stay a positive v.
        v = np.where(
            codes != 0, np.maximum(v, _SMALLEST_POSITIVE.get(dtype, _F32_SUBNORMAL)), np.float32(0.0)
        )
        return _to_tensor(v, dtype)
    raise ValueError(f"unknown lossy encoding {encoding!r}")
