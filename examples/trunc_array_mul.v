// A column-truncated array multiplier (Schulte & Swartzlander 1993, without the
// correction constant), sign-magnitude: the partial-product bits x_i * |w|_j of
// the K least significant columns (i + j < K) are not generated.
// Activation x: unsigned 8-bit; weight w: two's complement 8-bit; p = sign(w) * sum.
// Its products equal maxdnn's built-in trunc-k6 model for every operand pair.
module trunc_array_mul #(parameter K = 6) (
  input  [7:0] x,
  input  signed [7:0] w,
  output signed [15:0] p
);
  wire neg = w[7];
  wire [7:0] b = neg ? -w : w;  // |w|; -128 gives 8'b1000_0000 = 128
  reg [15:0] mag;
  integer i, j;
  always @* begin
    mag = 16'd0;
    for (i = 0; i < 8; i = i + 1)
      for (j = 0; j < 8; j = j + 1)
        if (i + j >= K)
          mag = mag + ({15'd0, x[i] & b[j]} << (i + j));
  end
  assign p = neg ? -$signed({1'b0, mag}) : $signed({1'b0, mag});
endmodule
