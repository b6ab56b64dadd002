"""`bench kv` results as a text table or a JSON object, with the issue's targets judged."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from services.bench.kv import KVReport
from services.bench.kv_exposed import ExposedResult
from services.bench.kv_transfer import ENGINE_ROUTE, TransferResult

_WIDTH = 100
_SHORT = {
    "float32": "f32",
    "bfloat16": "bf16",
    "float16": "f16",
    "float8_e4m3fn": "e4m3fn",
    "float8_e4m3fnuz": "e4m3fnuz",
    "float8_e5m2": "e5m2",
}


@dataclass(frozen=True)
class Target:
    name: str
    bound: str  # ">=" or "<="
    limit: float
    value: float
    detail: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.bound == ">=" else self.value <= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def targets(report: KVReport) -> list[Target]:
    out = []
    permute = [r.ratio for r in report.convert if r.case.permute_only]
    if permute:
        met = sum(r >= 0.5 for r in permute)
        out.append(
            Target(
                "conversion / copy, permute-only pairs (worst)",
                ">=",
                0.5,
                min(permute),
                f"median {statistics.median(permute):.2f}, "
                f"best {max(permute):.2f}; {met}/{len(permute)} pairs meet it",
            )
        )
    if report.transfer is not None:
        t = report.transfer
        for name, route, limit in (("direct", "direct", 0.8), ("via-converter", "converter", 0.4)):
            out.append(
                Target(
                    f"{name} goodput / NATS ceiling",
                    ">=",
                    limit,
                    t.ratio(route),
                    f"median per-turn ratio {t.paired_ratio(route):.2f}",
                )
            )
    out += _mooncake_targets(report)
    if report.exposed is not None:  # issue 3's, on the first transport
        for name, route in report.exposed.routes.items():
            d = route.to_dict()
            out.append(
                Target(
                    f"exposed / transfer, {name}",
                    "<=",
                    0.3,
                    d["exposed_over_transfer"],
                    f"vs the transfer alone: {d['exposed_over_transfer_alone']:.2f}",
                )
            )
    return out


def over_engine(t: TransferResult, route: str) -> float:
    """A route's goodput over the Mooncake ceiling's (engine to engine) in the same run."""
    engine = t.routes[ENGINE_ROUTE].gbps
    return t.routes[route].gbps / engine if engine else 0.0


def _mooncake_targets(report: KVReport) -> list[Target]:
    """Issue 12's: the mooncake transport against its own ceiling and against nats."""
    out = _mooncake_transfer_targets(report)
    exposed = report.exposures.get("mooncake")
    for name, d in exposed.to_dict()["routes"].items() if exposed else ():
        out.append(
            Target(
                f"mooncake exposed (TTFT - colocated) / colocated, {name}",
                "<=",
                0.1,
                d["ttft_minus_colocated_s"] / exposed.colocated_prefill_s,
                f"TTFT {d['ttft_s'] * 1e3:.0f} ms, colocated "
                f"{exposed.colocated_prefill_s * 1e3:.0f} ms, exposed after compute "
                f"{d['exposed_s'] * 1e3:.1f} ms",
            )
        )
    return out


def _mooncake_transfer_targets(report: KVReport) -> list[Target]:
    mc, nats = report.transfers.get("mooncake"), report.transfers.get("nats")
    if mc is None:
        return []
    out = [
        Target("mooncake direct / Mooncake ceiling", ">=", 0.8, over_engine(mc, "direct")),
        Target(
            "mooncake via-converter / Mooncake ceiling", ">=", 0.5, over_engine(mc, "converter")
        ),
    ]
    if nats is not None and nats.routes["direct"].gbps:
        ratio = mc.routes["direct"].gbps / nats.routes["direct"].gbps
        conv = mc.routes["converter"].gbps / max(nats.routes["converter"].gbps, 1e-12)
        out.insert(
            1,
            Target("mooncake direct / nats direct", ">=", 4.0, ratio, f"via converter {conv:.2f}x"),
        )
    return out


def to_dict(report: KVReport) -> dict[str, Any]:
    c = report.config
    out: dict[str, Any] = {
        "machine": report.machine,
        "config": asdict(c),
        "seconds": report.seconds,
    }
    if report.convert or report.convert_skipped:
        out["convert"] = {
            "kv_heads": c.kv_heads,
            "head_dim": c.head_dim,
            "cases": [r.to_dict() for r in report.convert],
            "skipped": report.convert_skipped,
        }
    if report.transfer is not None:
        out["transfer"] = report.transfer.to_dict()  # the first transport's, as before
        out["transfers"] = {name: t.to_dict() for name, t in report.transfers.items()}
    if report.exposed is not None:
        out["exposed"] = report.exposed.to_dict()  # the first transport's, as before
        out["exposures"] = {name: e.to_dict() for name, e in report.exposures.items()}
    out["targets"] = [t.to_dict() for t in targets(report)]
    return out


def to_json(report: KVReport) -> str:
    return json.dumps(to_dict(report), indent=2)


def _heading(text: str) -> str:
    return f"{'--- ' + text + ' ':-<{_WIDTH}}"


def _convert_rows(report: KVReport) -> list[str]:
    c = report.config
    threads = report.machine.get("torch_threads_convert")
    lines = [
        _heading(
            f"(a) conversion: convert_layer vs torch clone, {c.kv_heads} KV heads x "
            f"{c.head_dim}, tp {c.tp[0]}->{c.tp[1]}, {threads} torch thread(s)"
        ),
        f"{'source -> target':<34}{'dtype':<14}{'tokens':>7}{'blocks':>9}{'perm':>6}"
        f"{'conv GB/s':>11}{'copy GB/s':>11}{'ratio':>7}",
    ]
    for r in report.convert:
        k = r.case
        src, dst = (_SHORT.get(d, d) for d in (k.source_dtype, k.target_dtype))
        dtype = src if src == dst else f"{src}>{dst}"
        big = " *" if r.frame_bytes > c.max_frame_bytes else ""
        lines.append(
            f"{k.source + ' -> ' + k.target:<34}{dtype:<14}{k.tokens:>7}"
            f"{f'{k.source_block}>{k.target_block}':>9}{'yes' if k.permute_only else 'no':>6}"
            f"{r.convert_gbps:>11.2f}{r.copy_gbps:>11.2f}{r.ratio:>7.2f}{big}"
        )
    if any(r.frame_bytes > c.max_frame_bytes for r in report.convert):
        lines.append(
            f"* a target block is larger than a {c.max_frame_bytes}-byte frame: measured "
            "with frames of one block + header; the converter refuses the pair at "
            "the set frame size"
        )
    if report.convert_skipped:
        lines.append(
            f"skipped {len(report.convert_skipped)} pairs whose layout does not store the dtype"
        )
    return lines


def _transfer_rows(report: KVReport, t: TransferResult) -> list[str]:
    engine = ENGINE_ROUTE in t.routes
    lines = [
        _heading(
            f"(b) transfer over {t.transport}: {t.source.layout} -> decode, and via converter -> "
            f"{t.target.layout} ({t.num_tokens} tokens, {t.data_frames_per_request} frames "
            f"of {t.frame_payload_bytes} B, window {report.config.window})"
        ),
        f"{'route':<14}{'GB/s':>10}{'x ceiling':>11}{'p50 pair':>10}{'requests':>10}{'MB':>10}"
        f"{'seconds':>10}" + (f"{'x engine':>10}" if engine else ""),
    ]
    for name, r in t.routes.items():
        lines.append(
            f"{name:<14}{r.gbps:>10.3f}{t.ratio(name):>11.2f}"
            f"{t.paired_ratio(name):>10.2f}{len(r.times):>10}"
            f"{r.payload_bytes / 1e6:>10.1f}{r.seconds:>10.3f}"
            + (f"{over_engine(t, name):>10.2f}" if engine else "")
        )
    lines.append(
        "x ceiling: total goodput / the NATS ceiling's; p50 pair: median over turns of the "
        "ceiling's time / the route's for the same request"
        + ("; x engine: / the Mooncake ceiling's (engine to engine)" if engine else "")
    )
    return lines


def _exposed_rows(transport: str, e: ExposedResult) -> list[str]:
    lines = [
        _heading(
            f"(c) exposed transfer over {transport}: {e.num_tokens}-token prompt through the "
            f"real prefill worker, KV {e.kv_bytes / 1e6:.2f} MB"
        ),
        f"colocated prefill (same engine in-process, no streaming): "
        f"{e.colocated_prefill_s * 1e3:.1f} ms",
        f"{'route':<12}{'TTFT ms':>9}{'-colo ms':>10}{'transfer ms':>13}{'exposed ms':>12}"
        f"{'exp/xfer':>10}{'alone ms':>10}{'exp/alone':>11}",
    ]
    for name, d in e.to_dict()["routes"].items():
        lines.append(
            f"{name:<12}{d['ttft_s'] * 1e3:>9.1f}{d['ttft_minus_colocated_s'] * 1e3:>10.1f}"
            f"{d['transfer_s'] * 1e3:>13.1f}{d['exposed_s'] * 1e3:>12.2f}"
            f"{d['exposed_over_transfer']:>10.3f}{d['transfer_alone_s'] * 1e3:>10.1f}"
            f"{d['exposed_over_transfer_alone']:>11.3f}"
        )
    lines += [
        "TTFT: job sent -> first token; -colo: TTFT minus the colocated prefill (the issue's "
        "literal measure; the first token never waits for KV here)",
        "transfer: first data frame at the first hop -> last KV ack; exposed: prefill compute "
        "done -> last KV ack; alone: the same frames sent with no compute",
    ]
    return lines


def format_table(report: KVReport) -> str:
    m = report.machine
    load = (
        f"load {m['load_average_start'][0]:.1f} -> "
        f"{m.get('load_average_end', [float('nan')])[0]:.1f}"
    )
    lines = [
        f"{' KV benchmark ':=^{_WIDTH}}",
        f"{m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, {m['nats_server']}, {load}, "
        f"{report.seconds:.0f} s",
    ]
    if report.convert:
        lines += _convert_rows(report)
    for t in report.transfers.values():
        lines += _transfer_rows(report, t)
    for transport, exposed in report.exposures.items():
        lines += _exposed_rows(transport, exposed)
    issues = "targets (issue 3)" + (", mooncake's (issue 12)" if _mooncake_targets(report) else "")
    lines.append(_heading(issues))
    for t in targets(report):
        lines.append(
            f"{t.name:<48}{t.bound} {t.limit:<6.2f}{t.value:>8.3f}  "
            f"{'met' if t.met else 'MISSED'}{'  (' + t.detail + ')' if t.detail else ''}"
        )
    lines.append("=" * _WIDTH)
    return "\n".join(lines)
