"""Storage schemes of the lookup table: what one token row becomes on storage, and back.

numpy and ml_dtypes only (never jax, never tensorstore), so the CLI can list the schemes without starting JAX;
`quantize` and `dequantize` take `xp` (numpy or jax.numpy) so that conversion quantises on the accelerator and
decoding dequantises there, with the same bits as numpy.

Schemes (bytes per value, and the error bound that `error_bound` states and the tests check):
    float32   4 bytes    exact
    bfloat16  2 bytes    round-to-nearest: |err| <= 2^-8 |x| (+ subnormals)
    float16   2 bytes    round-to-nearest: |err| <= 2^-11 |x| + 2^-25
    int8      1 byte + a float32 scale per (row, layer, expert): code = round(127 x / absmax), |err| <= absmax / 254
    nf4       4 bits (two codes per byte) + a float32 scale (the absmax) per block of `block` values; the QLoRA
              NormalFloat code book; |err| <= 0.152 * block absmax (half the widest gap of the code book)
    nf3       3 bits (eight codes in three bytes) + a float16 scale per block; the NormalFloat construction with
              8 levels; |err| <= 0.233 * block absmax * (1 + 2^-10) (the scale is rounded up to float16)
Blocks never straddle two expert vectors: `block` divides D (nf4: even, nf3: a multiple of 8 so codes pack into
whole bytes). Defaults follow the paper's Table 8 (NF4 block 768, NF3 block 128): the largest such divisor of D
not above 768 (nf4) or 128 (nf3); at D = 768 these are the paper's blocks and the bytes are 25.3% and 19.5% of fp16.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import ml_dtypes
import numpy as np

from mole_jax.config import ModelConfig, MoleError

SCHEMES = ("float32", "bfloat16", "float16", "int8", "nf4", "nf3")
FLOAT_SCHEMES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
NF_BITS = {"nf4": 4, "nf3": 3}
NF_PAPER_BLOCK = {"nf4": 768, "nf3": 128}  # the paper's Table 8


# NormalFloat code books ---------------------------------------------------------------------------------------
def nf_codebook(bits: int) -> np.ndarray:
    """QLoRA's NormalFloat levels for `bits` bits: 2^(b-1) positive and 2^(b-1) - 1 negative quantiles of N(0, 1)
    plus an exact zero, scaled to [-1, 1]. The outermost quantile is at `offset`, halfway between the centres of
    the end bins of 2^b - 1 and 2^b equal-probability bins (bits=4 gives QLoRA's NF4 table, offset 0.9677)."""
    n = 2 ** bits
    offset = 1 - 0.5 * (1 / (2 * (n - 1)) + 1 / (2 * n))
    inv = NormalDist().inv_cdf
    pos = [inv(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    neg = [-inv(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    levels = np.array(sorted(pos + [0.0] + neg))
    return (levels / levels.max()).astype(np.float32)


NF_CODEBOOK = {name: nf_codebook(bits) for name, bits in NF_BITS.items()}
# Codes are chosen by counting the midpoints below a value: the nearest level, in one vectorised search.
NF_MIDPOINTS = {name: ((cb[1:] + cb[:-1]) / 2).astype(np.float32) for name, cb in NF_CODEBOOK.items()}
NF_HALF_GAP = {name: float(np.max(np.diff(cb.astype(np.float64))) / 2) for name, cb in NF_CODEBOOK.items()}


# Stored layout --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """What a scheme stores per token row: {array name: (shape after the vocabulary dim, dtype)}."""

    scheme: str
    L: int
    N: int
    D: int
    block: int  # values per scale: D for int8, the NF block for nf4/nf3, 0 for float schemes

    @property
    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        L, N, D = self.L, self.N, self.D
        if self.scheme in FLOAT_SCHEMES:
            return {"payload": ((L, N, D), FLOAT_SCHEMES[self.scheme])}
        if self.scheme == "int8":
            return {"payload": ((L, N, D), np.dtype(np.int8)), "scales": ((L, N), np.dtype(np.float32))}
        bits, nb = NF_BITS[self.scheme], D // self.block
        scale_dtype = np.float16 if self.scheme == "nf3" else np.float32
        return {"payload": ((L, N, nb, self.block * bits // 8), np.dtype(np.uint8)),
                "scales": ((L, N, nb), np.dtype(scale_dtype))}

    @property
    def row_nbytes(self) -> int:
        return sum(math.prod(shape) * dt.itemsize for shape, dt in self.arrays.values())


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise MoleError(f"unknown table dtype {scheme!r}: choose one of {', '.join(SCHEMES)}")
    return scheme


def _codes_per_byte_group(scheme: str) -> int:
    """Values that fill whole bytes: 2 for nf4, 8 for nf3."""
    return 8 // math.gcd(8, NF_BITS[scheme])


def default_block(scheme: str, D: int) -> int:
    """The quantisation block of a scheme for width D (see the module docstring)."""
    check_scheme(scheme)
    if scheme in FLOAT_SCHEMES:
        return 0
    if scheme == "int8":
        return D
    multiple = _codes_per_byte_group(scheme)
    fits = [b for b in range(multiple, min(D, NF_PAPER_BLOCK[scheme]) + 1, multiple) if D % b == 0]
    if not fits:
        raise MoleError(f"{scheme} packs {multiple} values per whole byte group, so it needs d_model divisible by "
                        f"{multiple}; this model has d_model {D} (use int8 or a float dtype)")
    return fits[-1]


def make_layout(scheme: str, cfg: ModelConfig, block: int | None = None) -> Layout:
    """The stored layout of `scheme` for this model; `block` overrides the nf4/nf3 default."""
    D = cfg.d_model
    if block is None:
        block = default_block(scheme, D)
    elif scheme not in NF_BITS:
        raise MoleError(f"{scheme} has no block size option (got block={block})")
    else:
        multiple = _codes_per_byte_group(scheme)
        if block <= 0 or D % block or block % multiple:
            raise MoleError(f"{scheme} block {block} must divide d_model {D} and be a multiple of {multiple}")
    return Layout(scheme, cfg.num_layers, cfg.num_experts, D, block)


# Quantisation: the same operations give the same bits with xp=numpy and xp=jax.numpy --------------------------
def quantize(x_RxLxNxD, scheme: str, block: int = 0, xp=np) -> dict:
    """float rows [R, L, N, D] -> the stored arrays of `scheme` (see Layout.arrays), each with leading dim R."""
    x = x_RxLxNxD.astype(xp.float32)
    if scheme in FLOAT_SCHEMES:
        return {"payload": x.astype(FLOAT_SCHEMES[scheme])}
    if scheme == "int8":
        # times a float32 constant, not / 127: XLA turns division by a constant into this multiplication, and
        # numpy must give the same bits
        scale_RxLxN = xp.max(xp.abs(x), axis=-1) * xp.float32(1 / 127)
        safe = xp.where(scale_RxLxN > 0, scale_RxLxN, 1)
        q = xp.clip(xp.round(x / safe[..., None]), -127, 127).astype(xp.int8)
        return {"payload": q, "scales": scale_RxLxN}
    R, L, N, D = x.shape
    xb = x.reshape(R, L, N, D // block, block)
    absmax = xp.max(xp.abs(xb), axis=-1)
    if scheme == "nf3":  # float16 scales, rounded up so that every |x| / scale stays within [-1, 1]
        s16 = absmax.astype(xp.float16)
        scale = xp.where(s16.astype(xp.float32) < absmax, xp.nextafter(s16, xp.float16(np.inf)), s16)
    else:
        scale = absmax
    safe = xp.where(scale > 0, scale, 1).astype(xp.float32)
    y = xb / safe[..., None]
    codes = xp.searchsorted(xp.asarray(NF_MIDPOINTS[scheme]), y, side="left").astype(xp.uint8)
    return {"payload": _pack(codes, NF_BITS[scheme], xp), "scales": scale}


def dequantize(stored: dict, scheme: str, xp=np):
    """Stored arrays (from `LookupTable.read_stored`, `read_all_stored` or `quantize`) -> float32 rows
    [R, L, N, D]. Works with xp=jax.numpy inside jax.jit, and gives exactly `LookupTable.rows`."""
    payload = stored["payload"]
    if scheme in FLOAT_SCHEMES:
        return payload.astype(xp.float32)
    if scheme == "int8":
        return payload.astype(xp.float32) * stored["scales"].astype(xp.float32)[..., None]
    check_scheme(scheme)
    R, L, N, nb, nbytes = payload.shape
    codes = _unpack(payload, NF_BITS[scheme], xp)
    values = xp.asarray(NF_CODEBOOK[scheme])[codes] * stored["scales"].astype(xp.float32)[..., None]
    return values.reshape(R, L, N, nb * codes.shape[-1])


# Bit packing ----------------------------------------------------------------------------------------------------
def _pack(codes, bits: int, xp):
    """[..., block] codes < 2^bits -> [..., block * bits / 8] bytes, little-endian within each byte group."""
    *lead, block = codes.shape
    per = 8 // math.gcd(8, bits)  # codes per group: 2 (nf4) or 8 (nf3)
    groups = codes.reshape(*lead, block // per, per).astype(xp.uint32)
    word = groups[..., 0]
    for j in range(1, per):
        word = word | (groups[..., j] << (bits * j))
    nbytes = per * bits // 8  # 1 or 3
    out = xp.stack([(word >> (8 * k)) & 0xFF for k in range(nbytes)], axis=-1).astype(xp.uint8)
    return out.reshape(*lead, block * bits // 8)


def _unpack(packed, bits: int, xp):
    """The inverse of `_pack`: [..., n] bytes -> [..., n * 8 / bits] int32 codes."""
    *lead, n = packed.shape
    per = 8 // math.gcd(8, bits)
    nbytes = per * bits // 8
    b = packed.reshape(*lead, n // nbytes, nbytes).astype(xp.uint32)
    word = b[..., 0]
    for k in range(1, nbytes):
        word = word | (b[..., k] << (8 * k))
    mask = (1 << bits) - 1
    codes = xp.stack([(word >> (bits * j)) & mask for j in range(per)], axis=-1)
    return codes.reshape(*lead, n // nbytes * per).astype(xp.int32)


# Error bounds ---------------------------------------------------------------------------------------------------
def error_bound(x_RxLxNxD: np.ndarray, scheme: str, block: int = 0) -> np.ndarray:
    """Per-value bound on |x - dequantize(quantize(x))| for float32 rows x (the module docstring's table, plus the
    float32 rounding of the quantiser's own arithmetic)."""
    x = np.abs(np.asarray(x_RxLxNxD, np.float64))
    f32 = 2.0 ** -22
    if scheme == "float32":
        return np.zeros_like(x)
    if scheme == "bfloat16":
        return x * 2.0 ** -8 + 2.0 ** -133
    if scheme == "float16":
        return x * 2.0 ** -11 + 2.0 ** -25
    if scheme == "int8":
        absmax = x.max(axis=-1, keepdims=True)
        return np.broadcast_to(absmax * (1 / 254 + f32), x.shape)
    check_scheme(scheme)
    R, L, N, D = x.shape
    absmax = x.reshape(R, L, N, D // block, block).max(axis=-1, keepdims=True)
    scale = absmax * (1 + 2.0 ** -10) if scheme == "nf3" else absmax
    bound = scale * (NF_HALF_GAP[scheme] + f32)
    return np.broadcast_to(bound, (R, L, N, D // block, block)).reshape(R, L, N, D)
