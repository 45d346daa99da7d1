"""The randomness of a private run: one secret seed, and an independent stream per (step, use).

Every draw that touches the guarantee (the noise, the Poisson batches, LSG's projections) takes
its generator from `stream_seed`, so a run is reproducible from its seed and a leaked stream
says nothing about another. The seed itself is secret: it never rides in a public checkpoint.
"""
from __future__ import annotations

import hashlib
import secrets


def secret_seed() -> int:
    """A 63-bit seed from the OS's cryptographic entropy source (the default for every stream)."""
    return secrets.randbits(63)


def stream_seed(seed: int, step: int, stream: str) -> int:
    """The seed of stream `stream` at `step`: a keyed hash, so streams are independent."""
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
