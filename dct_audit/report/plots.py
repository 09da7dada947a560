"""The report's plots: matplotlib (Agg) to SVG bytes."""

from __future__ import annotations

PLOT_VERSION = 1  # bump when a plot's look changes: cached plot files are named by a hash of their data

# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)
# ----------------------------------------------------------------------------------------------------


def _plot_style():
    import matplotlib

    matplotlib.use("Agg", force=False)
    return matplotlib.rc_context(
        {
            "text.parse_math": False,  # a "$" in an attribute name is text, not math
            "svg.hashsalt": "dct-audit",  # same input, same file
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )


def _svg(fig, tight: bool = False) -> bytes:
    import io
    import warnings

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(buf, format="svg", bbox_inches="tight" if tight else None, metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()


def plot_training(history: list[dict], best_update: int | None) -> bytes:
    """Loss, and target probability with batch accuracy, over updates; the kept update dashed."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = [h["update"] for h in history]
    with _plot_style():
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.6))
        a.plot(x, [h["loss"] for h in history], marker=".", color="#b5413b")
        a.set(title="loss", xlabel="update")
        b.plot(
            x, [h["target_prob"] for h in history], marker=".", label="target probability", color="#2c6cb0"
        )
        b.plot(
            x, [h["accuracy"] for h in history], marker=".", label="batch accuracy", color="#8aa1b8", ls=":"
        )
        b.set(title="classifier on the batch", xlabel="update", ylim=(-0.02, 1.02))
        b.legend(frameon=False, loc="best")
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.18, top=0.88, wspace=0.25)
        for ax in (a, b):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if best_update is not None:
                ax.axvline(best_update, color="#888", ls="--", lw=0.8)
        return _svg(fig)


def plot_enrichment(rows: list[dict], limit: int = 25) -> bytes:
    """Token rate minus baseline rate per attribute with its interval; flagged ones in colour."""
    import matplotlib.pyplot as plt

    top = sorted(rows, key=lambda e: (-abs(e["diff"] or 0.0), e["attribute"]))[:limit]
    top.sort(key=lambda e: e["diff"] or 0.0)
    y = list(range(len(top)))
    with _plot_style():
        fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.26 * max(1, len(top))))
        for i, e in zip(y, top, strict=True):
            d = e["diff"] or 0.0
            low = d - e["ci_low"] if e["ci_low"] is not None else 0.0
            high = e["ci_high"] - d if e["ci_high"] is not None else 0.0
            color = "#b5413b" if e["flagged"] else "#7d8790"
            ax.errorbar(d, i, xerr=[[max(low, 0)], [max(high, 0)]], fmt="o", color=color, ms=4, capsize=2)
        ax.axvline(0, color="#333", lw=0.8)
        ax.set_yticks(y, [short_label(e["attribute"]) for e in top])
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("share of token images minus share of baseline images (paired, with interval)")
        return _svg(fig, tight=True)  # room for the attribute names, whatever their length


def short_label(text: str, n: int = 40) -> str:
    """Plot-safe text: no control characters (they break SVG), at most ``n`` characters."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return clean if len(clean) <= n else clean[: n - 1] + "…"
