"""Element-wise Triton helpers shared by the kernels (fp32 in, fp32 out)."""

import triton
import triton.language as tl


@triton.jit
def softplus(x):
    # log1p(exp(x)) without a log1p intrinsic (none is portable to the interpreter): for w = 1 + e,
    # log(w) * e / (w - 1) cancels the rounding of 1 + e (Goldberg), so tiny exp(x) keep their
    # relative accuracy.  Above 20, softplus(x) == x in fp32 (mamba_ssm's and torch's threshold).
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, log1p_e)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))
