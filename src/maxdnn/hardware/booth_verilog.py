"""Structural Verilog of the radix-4 Booth multiplier and of ROUP(P, R).

Module ``mul(x, w, p)``: ``x`` is the multiplicand (8-bit, unsigned by default,
signed with ``x_signed``), ``w`` the signed 8-bit Booth-encoded multiplier
operand, ``p`` the signed product (2*bits+1 bits: wide enough for every ROUP
product, e.g. R_1(255) * -128 = -32768).

Architecture, for ``bits``-bit operands:

1. Rounding (R > 0), two designs:
   - ``folded`` (default; Leon et al.'s perforation + rounding design): no
     adder. With R_R(x) = 2^R (floor(x / 2^R) + x[R-1]), each row of a
     non-zero digit d takes the multiplicand bits >= R, its x2 selection
     shifts in x[R-1] as the lowest bit, and its negation bit becomes
     neg XOR x[R-1] (gated by "digit non-zero"): the row then equals
     d * R_R(x) / 2^R, placed at column R + 2j;
   - ``incrementer``: the multiplicand is rounded first,
     xr = (x[bits-1:R] + x[R-1]) << R, by a half-adder chain; its R low bits
     are constant 0, which removes the matching partial-product bits.
2. Booth encoders, one per digit j >= P: from (w[2j+1], w[2j], w[2j-1]) they
   form one = w[2j] ^ w[2j-1], two = w[2j+1] ? ~w[2j] & ~w[2j-1] : w[2j] & w[2j-1],
   neg = w[2j+1] & ~(w[2j] & w[2j-1]).
3. Partial-product generators: pp_i = ((one & M[i]) | (two & M[i-1])) ^ neg
   over the sign-extended multiplicand M; the negation bit neg_j enters the
   matrix at column 2j (two's complement = one's complement + 1).
   The P least significant rows (and their negation bits) are not generated.
4. Sign extension by the constant method: each row's sign bit s is replaced by
   ~s and the constant -sum_j 2^(top_j) (mod 2^width) is added to the matrix.
5. A Dadda reduction tree of full and half adders down to two rows, then a
   ripple-carry adder of full adders.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Builder:
    lines: list[str] = field(default_factory=list)
    n: int = 0

    def wire(self, expr: str) -> str:
        name = f"n{self.n}"
        self.n += 1
        self.lines.append(f"  wire {name} = {expr};")
        return name

    def fa(self, a: str, b: str, c: str) -> tuple[str, str]:
        s = self.wire(f"{a} ^ {b} ^ {c}")
        co = self.wire(f"({a} & {b}) | ({c} & ({a} ^ {b}))")
        return s, co

    def ha(self, a: str, b: str) -> tuple[str, str]:
        return self.wire(f"{a} ^ {b}"), self.wire(f"{a} & {b}")


def _dadda_heights(max_h: int) -> list[int]:
    d = [2]
    while d[-1] < max_h:
        d.append(int(d[-1] * 3 // 2))
    return d[:-1][::-1] if d[-1] >= max_h else d[::-1]


ROUNDING_DESIGNS = ("folded", "incrementer")


def booth_multiplier_verilog(p: int = 0, r: int = 0, bits: int = 8, x_signed: bool = False,
                             rounding: str = "folded") -> str:
    """Verilog of ROUP(P, R) (P = R = 0: the exact radix-4 Booth multiplier)."""
    if bits % 2 or not (0 <= p < bits // 2) or not (0 <= r < bits):
        raise ValueError(f"no Booth design for P={p}, R={r} at {bits} bits")
    if rounding not in ROUNDING_DESIGNS:
        raise ValueError(f"rounding design '{rounding}': expected one of {', '.join(ROUNDING_DESIGNS)}")
    folded = rounding == "folded" and r > 0
    out_w = 2 * bits + 1
    b = _Builder()
    # multiplicand, sign-extended to mw bits (rounding may carry into one more bit)
    mw = bits + 2
    xbits = [f"x[{i}]" for i in range(bits)]
    top = xbits[-1] if x_signed else "1'b0"
    ext = xbits + [top] * (mw - bits)
    if folded:
        # the generators see floor(x / 2^r); the rounding bit x[r-1] enters each row (see step 1)
        m = ext[r:]
        shift = r
    elif r:
        # incrementer: (x >> r) + x[r-1], then << r
        carry = f"x[{r - 1}]"
        m = ["1'b0"] * r
        for i in range(r, mw):
            s, carry = b.ha(ext[i], carry)
            m.append(s)
        # the carry out of the top (sign) bit is dropped: the sum fits mw bits
    else:
        m = ext
    if not folded:
        shift = 0
    mw = len(m)
    columns: list[list[str]] = [[] for _ in range(out_w)]
    const = 0

    def wb(i: int) -> str:
        return "1'b0" if i < 0 else f"w[{i}]"

    for j in range(p, bits // 2):
        b2, b1, b0 = wb(2 * j + 1), wb(2 * j), wb(2 * j - 1)
        one = b.wire(f"{b1} ^ {b0}")
        two = b.wire(f"({b2} & ~{b1} & ~{b0}) | (~{b2} & {b1} & {b0})")
        neg = b.wire(f"{b2} & ~({b1} & {b0})")
        row = []
        low = f"x[{r - 1}]" if folded else "1'b0"  # what the x2 selection shifts in
        for i in range(mw + 1):  # 2M needs one more bit
            mi = m[i] if i < mw else m[mw - 1]
            mi1 = m[i - 1] if i >= 1 else low
            row.append(b.wire(f"((({one}) & {mi}) | (({two}) & {mi1})) ^ {neg}"))
        base = 2 * j + shift
        topcol = mw + base
        for i, bit in enumerate(row[:-1]):
            if i + base < out_w:
                columns[i + base].append(bit)
        if topcol < out_w:
            columns[topcol].append(b.wire(f"~{row[-1]}"))
            const -= 1 << topcol
        # (a top column beyond the output width has no effect mod 2^out_w)
        if folded:  # the row's +1: negation XOR rounding bit, only for a non-zero digit
            columns[base].append(b.wire(f"({neg} ^ x[{r - 1}]) & ({one} | {two})"))
        else:
            columns[base].append(neg)
    const %= 1 << out_w
    for i in range(out_w):
        if (const >> i) & 1:
            columns[i].append("1'b1")
    # drop constant zeros
    columns = [[v for v in col if v != "1'b0"] for col in columns]
    # Dadda reduction
    for d in _dadda_heights(max(len(c) for c in columns)):
        carries: list[list[str]] = [[] for _ in range(out_w + 1)]
        new_cols = []
        for i in range(out_w):
            col = columns[i] + carries[i]
            while len(col) > d:
                if len(col) == d + 1:
                    s, c = b.ha(col[0], col[1])
                    col = col[2:] + [s]
                else:
                    s, c = b.fa(col[0], col[1], col[2])
                    col = col[3:] + [s]
                carries[i + 1].append(c)
            new_cols.append(col)
        columns = new_cols
    # final ripple-carry adder
    outs = []
    carry = None
    for i in range(out_w):
        col = columns[i] + ([carry] if carry else [])
        if len(col) == 0:
            outs.append("1'b0")
            carry = None
        elif len(col) == 1:
            outs.append(col[0])
            carry = None
        elif len(col) == 2:
            s, carry = b.ha(col[0], col[1])
            outs.append(s)
        else:
            s, carry = b.fa(col[0], col[1], col[2])
            outs.append(s)
    name = "exact radix-4 Booth" if p == r == 0 else f"ROUP(P={p}, R={r}, {rounding} rounding)"
    head = [
        f"// {name} multiplier, {bits}-bit {'signed' if x_signed else 'unsigned'} x, signed w; generated by maxdnn",
        f"module mul(input [{bits - 1}:0] x, input [{bits - 1}:0] w, output [{out_w - 1}:0] p);",
    ]
    tail = [f"  assign p[{i}] = {o};" for i, o in enumerate(outs)] + ["endmodule", ""]
    return "\n".join(head + b.lines + tail)
