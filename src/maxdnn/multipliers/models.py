"""Bit-exact models of exact and approximate integer multipliers.

A multiplier multiplies an activation operand ``x`` by a weight operand ``w``.
By default ``x`` is unsigned 8-bit (0..255) and ``w`` is signed 8-bit
(two's complement, -128..127); ``bits`` sets both widths (2..16).

Spec grammar (``get_multiplier(spec, bits=8, x_signed=False)``)::

    exact             exact product x * w
    roup-p{P}r{R}     ROUP: radix-4 Booth multiplier with the P least significant
                      partial products perforated (0 <= P < bits/2) and the
                      multiplicand rounded at bit R (0 <= R < bits)
    ppp-j{J}k{K}      partial-product perforation of an array multiplier: the K
                      consecutive partial products J..J+K-1 (bits of w) are not
                      generated (Zervakis et al., TVLSI 2016); J+K < bits
    trunc-k{K}        column-truncated multiplier: the partial-product bits of
                      the K least significant columns are dropped
                      (Schulte & Swartzlander 1993, without correction constant)
    drum-k{K}         DRUM dynamic-range unbiased multiplier with K-bit segments
                      (Hashemi, Bahar, Reda, ICCAD 2015); 3 <= K <= bits
    mitchell          Mitchell's logarithmic multiplier (IRE Trans. EC, 1962)
    NAME              a multiplier imported into the user library
                      (``maxdnn multipliers import``; see ``maxdnn.multipliers.library``)

Every model returns the exact int64 value that the hardware produces.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from maxdnn.errors import MaxdnnError
from maxdnn.multipliers.store import MAX_BITS, LibraryError, entry_dir, load_table_file, read_meta



class SpecError(MaxdnnError, ValueError):
    """An unknown or out-of-range multiplier spec."""


@dataclass(frozen=True)
class OperandFormat:
    """Width and signedness of one integer operand."""

    bits: int
    signed: bool

    @property
    def min(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def max(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def values(self) -> np.ndarray:
        return np.arange(self.min, self.max + 1, dtype=np.int64)

    def __str__(self) -> str:
        return f"{'s' if self.signed else 'u'}{self.bits}"

    def check(self, v: np.ndarray, name: str) -> None:
        if v.size and (v.min() < self.min or v.max() > self.max):
            raise ValueError(f"operand {name} outside {self} range [{self.min}, {self.max}]")


def round_at(v, t: int):
    """R_t(v) = 2^t * floor(v / 2^t + 1/2): round half up at bit t (R_0 is identity)."""
    v = np.asarray(v, dtype=np.int64)
    if t == 0:
        return v
    return ((v + (1 << (t - 1))) >> t) << t


class Multiplier(ABC):
    """A multiplier model: exact int64 products for integer operand arrays.

    Example::

        m = maxdnn.get_multiplier("roup-p2r2")
        m(np.array([100, 255]), np.array([-3, 127]))   # elementwise products
        m.lut().shape                                  # (256, 256): every product
    """

    spec: str
    x_format: OperandFormat
    w_format: OperandFormat

    def __init__(self, spec: str, bits: int, x_signed: bool):
        self.spec = spec
        self.bits = bits
        self.x_format = OperandFormat(bits, x_signed)
        self.w_format = OperandFormat(bits, True)

    @abstractmethod
    def _multiply(self, x: np.ndarray, w: np.ndarray) -> np.ndarray: ...

    def __call__(self, x, w) -> np.ndarray:
        x = np.asarray(x, dtype=np.int64)
        w = np.asarray(w, dtype=np.int64)
        self.x_format.check(x, "x")
        self.w_format.check(w, "w")
        x, w = np.broadcast_arrays(x, w)
        return self._multiply(x, w).astype(np.int64, copy=False)

    def lut(self) -> np.ndarray:
        """Full table: ``lut[x - x_format.min, w - w_format.min]`` is the product."""
        xs = self.x_format.values()[:, None]
        ws = self.w_format.values()[None, :]
        return self(xs, ws)

    @property
    def separable(self) -> bool:
        """True when the product is exactly x_transform(x) * w_transform(w)."""
        return False

    def x_transform(self, x):
        raise NotImplementedError(f"{self.spec} is not operand-separable")

    def w_transform(self, w):
        raise NotImplementedError(f"{self.spec} is not operand-separable")

    @property
    def has_hardware(self) -> bool:
        """True when maxdnn.hardware can generate a netlist for this multiplier."""
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} x:{self.x_format} w:{self.w_format}>"


class SeparableMultiplier(Multiplier):
    """A multiplier whose product is f(x) * g(w), exactly."""

    @property
    def separable(self) -> bool:
        return True

    def _multiply(self, x, w):
        return self.x_transform(x) * self.w_transform(w)


class Exact(SeparableMultiplier):
    def x_transform(self, x):
        return np.asarray(x, dtype=np.int64)

    def w_transform(self, w):
        return np.asarray(w, dtype=np.int64)

    @property
    def has_hardware(self) -> bool:
        return True


def booth_digits(w: np.ndarray, bits: int) -> np.ndarray:
    """Radix-4 (modified Booth) digits of the two's complement ``w``.

    d_j = -2 w[2j+1] + w[2j] + w[2j-1] with w[-1] = 0, j = 0..bits/2-1, each in
    {-2..2}; w = sum_j d_j 4^j. Returns shape w.shape + (bits/2,).
    """
    w = np.asarray(w, dtype=np.int64)
    u = w & ((1 << bits) - 1)  # two's complement bit pattern

    def bit(i):
        return (u >> i) & 1 if i >= 0 else np.zeros_like(u)

    digits = [-2 * bit(2 * j + 1) + bit(2 * j) + bit(2 * j - 1) for j in range(bits // 2)]
    return np.stack(digits, axis=-1)


class ROUP(SeparableMultiplier):
    """ROUP(P, R): radix-4 Booth multiplier with perforation and rounding.

    Leon, Zervakis, Xydis, Soudris, Pekmestzi, "Cooperative arithmetic-aware
    approximation techniques for energy-efficient multipliers", DAC 2019; used
    per layer, filter and kernel by MAx-DNN (Leon et al., LASCAS 2022).
    The P least significant Booth partial products are not generated and the
    multiplicand x is rounded at bit R before the partial products are formed.
    Closed form: R_R(x) * R_2P(w).
    """

    def __init__(self, spec, bits, x_signed, p: int, r: int):
        super().__init__(spec, bits, x_signed)
        self.p = p
        self.r = r

    def x_transform(self, x):
        return round_at(x, self.r)

    def w_transform(self, w):
        return round_at(w, 2 * self.p)

    @property
    def has_hardware(self) -> bool:
        return True

    def bit_level(self, x, w) -> np.ndarray:
        """Explicit partial-product model of the hardware (see module docstring).

        The rounded multiplicand is formed as ((x >> R) + x[R-1]) << R. Each kept
        Booth digit selects 0, X or 2X; a negative digit inverts the selected
        multiplicand (one's complement) and injects a negation bit in the
        partial product's LSB column. The rows are summed modulo 2^width and
        the result is read as two's complement.
        """
        x = np.asarray(x, dtype=np.int64)
        w = np.asarray(w, dtype=np.int64)
        x, w = np.broadcast_arrays(x, w)
        width = 2 * self.bits + 4
        mask = (1 << width) - 1
        if self.r:
            xr = ((x >> self.r) + ((x >> (self.r - 1)) & 1)) << self.r
        else:
            xr = x.copy()
        digits = booth_digits(w, self.bits)
        acc = np.zeros(x.shape, dtype=np.int64)
        for j in range(self.p, self.bits // 2):
            d = digits[..., j]
            mag = np.abs(d)
            sel = np.where(mag == 2, xr << 1, np.where(mag == 1, xr, 0)) & mask
            neg = (d < 0).astype(np.int64)
            row = np.where(neg == 1, (~sel) & mask, sel)  # one's complement
            acc = (acc + (row << (2 * j)) + (neg << (2 * j))) & mask
        sign = 1 << (width - 1)
        return np.where(acc & sign, acc - (1 << width), acc)


class PartialProductPerforation(SeparableMultiplier):
    """Array multiplier with K consecutive partial products perforated from row J.

    Zervakis, Tsoumanis, Xydis, Soudris, Pekmestzi, "Design-efficient
    approximate multiplication circuits through partial product perforation",
    IEEE TVLSI 24(10), 2016. Row i of the array is x * w_i * 2^i; rows J..J+K-1
    are not generated, which equals multiplying by w with those bits cleared.
    """

    def __init__(self, spec, bits, x_signed, j: int, k: int):
        super().__init__(spec, bits, x_signed)
        self.j, self.k = j, k
        self._clear = ~(((1 << k) - 1) << j)

    def x_transform(self, x):
        return np.asarray(x, dtype=np.int64)

    def w_transform(self, w):
        return np.asarray(w, dtype=np.int64) & self._clear


def _leading_one(a: np.ndarray) -> np.ndarray:
    """Position of the most significant 1 of each positive integer (-1 for 0)."""
    out = np.full(a.shape, -1, dtype=np.int64)
    for i in range(MAX_BITS + 2):
        out = np.where((a >> i) & 1 == 1, i, out)
    return out


class DRUM(SeparableMultiplier):
    """DRUM-K: dynamic range unbiased multiplier.

    Hashemi, Bahar, Reda, "DRUM: A dynamic range unbiased multiplier for
    approximate applications", ICCAD 2015. Each magnitude with its leading one at
    position t >= K is cut to the K bits t..t-K+1, whose LSB is forced to 1
    (unbiasing), and shifted back; the K-bit segments are multiplied exactly.
    Signed operands are handled in sign-magnitude form as in the paper.
    """

    def __init__(self, spec, bits, x_signed, k: int):
        super().__init__(spec, bits, x_signed)
        self.k = k

    def _approx(self, v):
        v = np.asarray(v, dtype=np.int64)
        a = np.abs(v)
        t = _leading_one(a)
        shift = np.maximum(t - self.k + 1, 0)
        seg = a >> shift
        seg = np.where(shift > 0, seg | 1, seg)
        return np.sign(v) * (seg << shift)

    x_transform = _approx
    w_transform = _approx


class Mitchell(Multiplier):
    """Mitchell's logarithmic multiplier.

    J. N. Mitchell, "Computer multiplication and division using binary
    logarithms", IRE Trans. Electronic Computers, EC-11(4), 1962. With
    a = 2^k1 + f1 and b = 2^k2 + f2: if f1 2^k2 + f2 2^k1 < 2^(k1+k2) the
    product is 2^(k1+k2) + f1 2^k2 + f2 2^k1, else 2 (f1 2^k2 + f2 2^k1).
    Exact integer evaluation of the log-domain sum (no fraction truncation);
    signs in sign-magnitude form.
    """

    def _multiply(self, x, w):
        a, b = np.abs(x), np.abs(w)
        k1, k2 = _leading_one(a), _leading_one(b)
        k1c, k2c = np.maximum(k1, 0), np.maximum(k2, 0)
        f1 = a - (1 << k1c)
        f2 = b - (1 << k2c)
        s = (f1 << k2c) + (f2 << k1c)
        base = 1 << (k1c + k2c)
        p = np.where(s < base, base + s, 2 * s)
        p = np.where((a == 0) | (b == 0), 0, p)
        return np.sign(x) * np.sign(w) * p


class TruncatedArray(Multiplier):
    """Column-truncated multiplier: partial-product bits of columns < K dropped.

    Schulte, Swartzlander, "Truncated multiplication with correction constant",
    VLSI Signal Processing VI, 1993 (here without the correction constant).
    Applied to the magnitudes, sign restored (sign-magnitude datapath):
    p = sign * sum_{i+j >= K} a_i b_j 2^(i+j).
    """

    def __init__(self, spec, bits, x_signed, k: int):
        super().__init__(spec, bits, x_signed)
        self.k = k

    def _multiply(self, x, w):
        a, b = np.abs(x), np.abs(w)
        p = np.zeros(a.shape, dtype=np.int64)
        for i in range(self.bits + 1):
            ai = (a >> i) & 1
            for j in range(self.bits + 1):
                if i + j >= self.k:
                    p += (ai & ((b >> j) & 1)) << (i + j)
        return np.sign(x) * np.sign(w) * p


_GRAMMAR = (
    "valid forms: exact, roup-p{P}r{R} (0<=P<bits/2, 0<=R<bits), ppp-j{J}k{K} (K>=1, J+K<bits), "
    "trunc-k{K} (1<=K<=bits), drum-k{K} (3<=K<=bits), mitchell"
)


class TableMultiplier(Multiplier):
    """A multiplier given by its full product table ``table[x - x_min, w - w_min]`` (imported designs)."""

    def __init__(self, spec: str, bits: int, x_signed: bool, table: np.ndarray):
        super().__init__(spec, bits, x_signed)
        want = (1 << bits, 1 << bits)
        if table.shape != want:
            raise SpecError(f"multiplier '{spec}': table shape {table.shape}, expected {want}")
        self.table = np.asarray(table, dtype=np.int64)

    def _multiply(self, x, w):
        return self.table[x - self.x_format.min, w - self.w_format.min]

    def lut(self) -> np.ndarray:
        return self.table.copy()


BUILTIN_NAMES = ("exact", "mitchell")
BUILTIN_PREFIXES = ("roup-", "ppp-", "trunc-", "drum-")


def is_builtin_name(name: str) -> bool:
    """True for names the built-in grammar owns (valid or not): user multipliers may not take them."""
    s = name.strip().lower()
    return s in BUILTIN_NAMES or s.startswith(BUILTIN_PREFIXES)


def get_multiplier(spec: str, bits: int = 8, x_signed: bool = False) -> Multiplier:
    """Build the multiplier named by ``spec`` (see the module docstring)."""
    if not isinstance(bits, int) or not 2 <= bits <= MAX_BITS:
        raise SpecError(f"bits={bits}: supported widths are 2..{MAX_BITS}")
    s = spec.strip().lower()

    def bad(why: str):
        return SpecError(f"unknown or out-of-range multiplier spec '{spec}' at {bits} bits ({why}); {_GRAMMAR}")

    if s == "exact":
        return Exact("exact", bits, x_signed)
    if s == "mitchell":
        return Mitchell("mitchell", bits, x_signed)
    if m := re.fullmatch(r"roup-p(\d+)r(\d+)", s):
        p, r = int(m[1]), int(m[2])
        if bits % 2:
            raise bad("radix-4 Booth needs an even width")
        if not (0 <= p < bits // 2 and 0 <= r < bits):
            raise bad(f"P must be 0..{bits // 2 - 1}, R 0..{bits - 1}")
        return ROUP(f"roup-p{p}r{r}", bits, x_signed, p, r)
    if m := re.fullmatch(r"ppp-j(\d+)k(\d+)", s):
        j, k = int(m[1]), int(m[2])
        if not (k >= 1 and j + k < bits):
            raise bad("need K >= 1 and J+K < bits (the sign row is kept)")
        return PartialProductPerforation(f"ppp-j{j}k{k}", bits, x_signed, j, k)
    if m := re.fullmatch(r"trunc-k(\d+)", s):
        k = int(m[1])
        if not 1 <= k <= bits:
            raise bad(f"K must be 1..{bits}")
        return TruncatedArray(f"trunc-k{k}", bits, x_signed, k)
    if m := re.fullmatch(r"drum-k(\d+)", s):
        k = int(m[1])
        if not 3 <= k <= bits:
            raise bad(f"K must be 3..{bits}")
        return DRUM(f"drum-k{k}", bits, x_signed, k)
    if not is_builtin_name(s):
        try:
            found = user_multiplier(spec.strip(), bits, x_signed)
        except LibraryError as e:  # a damaged entry of that name
            raise SpecError(f"multiplier '{spec.strip()}': {e}") from None
        if found is not None:
            return found
    raise bad("unknown name; nor an imported multiplier of the user library")


def user_multiplier(name: str, bits: int, x_signed: bool) -> "TableMultiplier | None":
    """The imported multiplier ``name`` of the user library (``maxdnn.multipliers.store``) at these operand
    formats; None when the library has no such name."""
    meta = read_meta(name)
    if meta is None:
        return None
    fmt = ("s" if meta["x_signed"] else "u") + str(meta["bits"])
    if meta["bits"] != bits or meta["x_signed"] != x_signed:
        raise SpecError(f"multiplier '{name}' was imported for x {fmt}, w s{meta['bits']}; "
                        f"needed here: x {'s' if x_signed else 'u'}{bits}, w s{bits}")
    return TableMultiplier(name, bits, x_signed, load_table_file(entry_dir(name) / "table.npy", bits))


def roup_specs(bits: int = 8) -> list[str]:
    """Every valid ROUP(P, R) spec at ``bits``, P-major."""
    return [f"roup-p{p}r{r}" for p in range(bits // 2) for r in range(bits)]


BASELINE_SPECS = ["ppp-j0k2", "ppp-j0k3", "trunc-k6", "trunc-k8", "drum-k4", "drum-k6", "mitchell"]


def default_family(bits: int = 8) -> list[str]:
    """exact, every ROUP(P, R) and the published baselines."""
    base = [s for s in BASELINE_SPECS if _valid(s, bits)]
    return ["exact"] + [s for s in roup_specs(bits) if s != "roup-p0r0"] + base


def _valid(spec: str, bits: int) -> bool:
    try:
        get_multiplier(spec, bits)
        return True
    except SpecError:
        return False
