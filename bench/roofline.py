"""Single-stream decode rate as a fraction of the memory-bandwidth bound: every generated
token reads all weights (and this request's KV cache) once."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Roofline:
    decode_tokens_per_s: float
    bandwidth_gbps: float
    bandwidth_source: str
    weight_bytes: int
    kv_bytes_per_token_read: float
    bound_tokens_per_s: float
    fraction: float
    verdict: str


def roofline(decode_tps: float, bandwidth_gbps: float, source: str, weight_bytes: int,
             kv_bytes_read: float = 0.0) -> Roofline:
    bytes_per_token = weight_bytes + kv_bytes_read
    bound = bandwidth_gbps * 1e9 / bytes_per_token
    fraction = decode_tps / bound
    if fraction >= 0.6:
        verdict = "bandwidth-bound: decode streams the weights near the measured bandwidth"
    else:
        verdict = ("compute- and overhead-bound: decode runs well below the bandwidth bound, so "
                   "per-token compute and framework overhead dominate, not DRAM bandwidth")
    return Roofline(decode_tps, bandwidth_gbps, source, weight_bytes, kv_bytes_read, bound,
                    fraction, verdict)
