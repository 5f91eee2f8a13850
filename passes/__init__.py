"""The compiler's passes, one module each, and the ordered default pipeline.

``load`` makes the Context from a path; every other pass is ``run(ctx)`` on it:

    load -> canonicalize -> recognize -> keep_fp32 -> embed_norm (w16a16i) -> state -> rank_one -> normalize_matmul -> fp16_guard
         -> support -> partition -> cut -> sequence (T-token variants for prefill)
         -> build (rwkv2rknn.rknn.build, run by the compiler: needs the segment files on disk;
            skipped by --plan-only)
"""

from rwkv2rknn.passes import (
    canonicalize,
    cut,
    embed_norm,
    fp16_guard,
    keep_fp32,
    load,
    normalize_matmul,
    partition,
    rank_one,
    recognize,
    sequence,
    state,
    support,
)

# Graph passes after load, in order.
GRAPH_PIPELINE = (
    canonicalize,
    recognize,
    keep_fp32,
    embed_norm,
    state,
    rank_one,
    normalize_matmul,
    fp16_guard,
    support,
    partition,
    cut,
    sequence,
)
# The graph passes' names (the compiler adds the build step's: compiler.driver.PASS_NAMES).
GRAPH_PASS_NAMES = tuple([load.NAME] + [p.NAME for p in GRAPH_PIPELINE])
