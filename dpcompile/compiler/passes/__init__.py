"""The DP passes and the order they run in.

Forward graphs are only analysed (where each tensor keeps its samples, and refusal of
sample-mixing ops); backward graphs are rewritten, one pass after the other, before
Inductor's decompositions.
"""
from . import batch_dim, book_keeping, lsg, noise, param_grads, phantom, schedule
from .base import HOOKS

FORWARD_PIPELINE = [("batch_dim", lambda gm, ctx: batch_dim.run(gm, ctx, "forward"))]
BACKWARD_PIPELINE = [
    ("batch_dim", lambda gm, ctx: batch_dim.run(gm, ctx, "backward")),
    ("param_grads", param_grads.run),
    ("phantom", phantom.run),
    ("lsg", lsg.run),
    ("book_keeping", book_keeping.run),
    ("noise", noise.run),
    ("schedule", schedule.run),
]


def run_pipeline(pipeline, gm, ctx):
    for _, pass_fn in pipeline:
        record = pass_fn(gm, ctx)
        ctx.records.append(record)
        for observe in HOOKS.observers:  # inspection logging (DPCOMPILE_LOGS)
            observe(record, gm, ctx)
    return gm
