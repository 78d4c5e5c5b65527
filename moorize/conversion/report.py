"""Human-readable summaries of a conversion, and singular-value spectrum plots.

Both ``moorize convert`` (from the ConvertReport) and ``moorize inspect`` (from
moorize.json) print the same table, so it is built from LayerRecords alone.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

from ..errors import MoorizeError
from ..io.factored import FactoredCheckpoint, LayerRecord


def layer_kind(name: str) -> str:
    """The layer's role with the block index removed: ``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``."""
    parts = name.split(".")
    idx = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[idx + 1:]) or name


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def summary_rows(records: list[LayerRecord]) -> list[dict]:
    """One row per layer kind: count, shape, rank range, energy kept, worst errors."""
    groups: "OrderedDict[str, list[LayerRecord]]" = OrderedDict()
    for r in records:
        groups.setdefault(layer_kind(r.name), []).append(r)
    rows = []
    for kind, rs in groups.items():
        shapes = sorted({r.shape for r in rs})
        ranks = [r.rank for r in rs]
        rows.append({
            "kind": kind,
            "layers": len(rs),
            "shape": ", ".join(f"{m}x{n}" for m, n in shapes),
            "rank": f"{min(ranks)}" if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}",
            "energy_kept": min(r.energy_kept for r in rs),
            "rel_error": max(r.rel_error for r in rs),
            "factor_rel_error": max(r.factor_rel_error for r in rs),
            "residual": sum(r.residual for r in rs),
        })
    return rows


def format_table(records: list[LayerRecord], totals: dict) -> str:
    rows = summary_rows(records)
    head = ("layer", "count", "shape (out x in)", "rank", "min energy", "max rel err", "w/o residual")
    body = [(r["kind"], str(r["layers"]), r["shape"], r["rank"], f"{r['energy_kept']:.4f}",
             f"{r['rel_error']:.2e}", f"{r['factor_rel_error']:.2e}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    worst = max((r.rel_error for r in records), default=0.0)
    parts = [f"{len(records)} layers", f"worst relative error {worst:.2e}"]
    if "bytes_in" in totals:
        parts.append(f"{human_bytes(totals['bytes_in'])} in -> {human_bytes(totals['bytes_out'])} out")
    if "seconds" in totals:
        s = f"{totals['seconds']:.1f} s"
        if totals.get("svd_seconds"):
            s += f" (SVD {totals['svd_seconds']:.1f} s)"
        parts.append(s)
    out.append("")
    out.append(", ".join(parts))
    return "\n".join(out)


def plot_spectra(ckpt: FactoredCheckpoint, path: str | Path) -> Path:
    """Singular values (normalised, log scale) and cumulative energy per layer kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoorizeError("--plot needs matplotlib: pip install 'moorize[plot]'") from None
    import torch

    kinds: "OrderedDict[str, list[str]]" = OrderedDict()
    for name in ckpt.layers:
        kinds.setdefault(layer_kind(name), []).append(name)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("tab10")
    for i, (kind, names) in enumerate(kinds.items()):
        color = cmap(i % 10)
        for j, name in enumerate(names):
            s = ckpt.tensor(f"{name}.moore.S").double()
            s_norm = (s / s[0]).numpy() if s[0] > 0 else s.numpy()
            energy = (torch.cumsum(s**2, 0) / (s**2).sum()).numpy()
            label = kind if j == 0 else None
            axes[0].semilogy(s_norm, color=color, alpha=0.35, lw=0.8, label=label)
            axes[1].plot(energy, color=color, alpha=0.35, lw=0.8, label=label)
    axes[0].set(title="singular values (σ / σ_max)", xlabel="index", ylabel="σ / σ_max")
    axes[1].set(title="cumulative energy Σσ² share", xlabel="rank", ylabel="energy kept", ylim=(0, 1.01))
    for ax in axes:
        ax.grid(alpha=0.3)
        leg = ax.legend(fontsize=8)
        for h in leg.legend_handles:
            h.set_alpha(1)
    src = re.sub(r".*/", "", str(ckpt.manifest.get("source", {}).get("path", "")))
    fig.suptitle(f"{src}: {len(ckpt.layers)} factored layers")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
