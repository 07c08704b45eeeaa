"""The client-update study's frontier figure (`client_update_frontier.png`): the fraction of SplitLoRA's client
contribution that zeroth-order clients reach against the client forwards per round."""

from __future__ import annotations

from collections import defaultdict

from .layout import REFERENCE
from .style import STYLE, _pyplot

# Client learning rates of the client-update study, one colour each (unlisted rates: grey).
LR_COLORS = {3e-5: "#9467bd", 1e-4: "#1f77b4", 3e-4: "#17becf", 1e-3: "#2ca02c", 3e-3: "#ff7f0e", 1e-2: "#d62728"}
FRONTIER_YLIM = (-0.4, 1.15)  # fractions of SplitLoRA's contribution; points beyond are drawn on the edge


def frontier_points(rows: dict) -> list[dict]:
    """The zeroth-order configurations of one client-update study that the frontier figure draws: AdamW steps on
    unscaled directions, isotropic or guided (what varies is the search space, the guide, the directions per round
    and the learning rate). Each
    point: x = client forwards per client and round (P + 1), y = fraction of SplitLoRA's contribution, yerr = the SE
    over seeds in the same units (None for one seed)."""
    points = []
    for name, r in rows.items():
        st = r.get("settings")
        if not st or st["method"] != "hosfl" or r["fraction_of_fo"] is None:
            continue
        if st["client_optimizer"] != "adamw" or st["direction_scales"] != "uniform":
            continue
        fo = abs(r["fo_loss_diff_vs_frozen"])
        if st["mask_density"]:
            alone = st["client_zo_modules"] == []
            space = f"mask {st['mask_density']:g}" + (" alone" if alone else " + LoRA-B")
            if st.get("guide_share"):
                space += f", guided {st['guide_share']:g}"
            if st.get("client_lr_scheduler_type"):
                space += f", own schedule ({st['client_lr_scheduler_type']})"
        else:
            space = "LoRA (q, v)" if st["client_zo_modules"] is None else "LoRA-B"
        points.append(
            {
                "name": name,
                "x": st["num_perturbations"] + 1,
                "y": r["fraction_of_fo"],
                "yerr": r["loss_diff_se"] / fo if r["loss_diff_se"] is not None and fo else None,
                "lr": st["client_learning_rate"],
                "space": space,
                "marker": FRONTIER_MARKERS.get(space, "P"),
                "seeds": len(r["seeds"]),
            }
        )
    return points


# The search spaces of the study, one marker each (others: "P").
FRONTIER_MARKERS = {
    "mask 0.0001 alone": "^",
    "mask 1e-05 alone": "v",
    "mask 0.0001 + LoRA-B": "D",
    "mask 0.0001 alone, guided 0.5": "*",
    "mask 0.0001 alone, guided 0.9": "p",
    "mask 0.0001 alone, own schedule (warmup_stable_decay)": "X",
    "LoRA-B": "s",
    "LoRA (q, v)": "o",
}


def plot_client_frontier(contribution: dict):
    """The client-update study's frontier, one panel per (task, depth, study length): the fraction of SplitLoRA's
    client contribution (paired loss vs the frozen client) against the client forwards per round, coloured by client
    learning rate, with ±1 SE over seeds (open markers: one seed, no bar), the half-of-SplitLoRA target and the
    first-order ceiling of the mask's search space where it was measured."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    studies = []
    for task, depths in contribution.items():
        for depth, rows in depths.items():
            by_length: dict[str, dict] = defaultdict(dict)
            for name, r in rows.items():
                base, _, length = name.partition("/")
                by_length[length or "r60 pilot"][base] = r
            studies += [(task, depth, length, group) for length, group in sorted(by_length.items())]
    fig, axes = plt.subplots(1, len(studies), figsize=(6.5 * len(studies), 5.6), squeeze=False)
    low, high = FRONTIER_YLIM
    for ax, (task, depth, length, rows) in zip(axes.flat, studies):
        points = frontier_points(rows)
        xs = sorted({p["x"] for p in points})
        at_x = {x: sorted((q for q in points if q["x"] == x), key=lambda q: (q["space"], q["lr"])) for x in xs}
        for p in points:
            # Side by side at each x (by search space, then learning rate), so points and bars do not hide each other.
            group = at_x[p["x"]]
            x = p["x"] * 2 ** (0.12 * (group.index(p) - (len(group) - 1) / 2))
            y = min(max(p["y"], low + 0.03), high - 0.03)
            color = LR_COLORS.get(p["lr"], "#7f7f7f")
            if p["yerr"] is not None and y == p["y"]:
                ax.errorbar([x], [y], yerr=[p["yerr"]], fmt="none", ecolor=color, capsize=3, label="_nolegend_")
            ax.plot(
                [x],
                [y],
                linestyle="none",
                marker=p["marker"],
                markersize=8,
                color=color,
                markerfacecolor=color if p["seeds"] > 1 else "white",
                label=p["name"],
                gid=p["name"],
            )
            text = f"{p['y']:+.2f}" + ("" if y == p["y"] else " (off scale)") + f" n={p['seeds']}"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, -3), fontsize=6)
        ax.axhline(1.0, color=STYLE["splitlora"]["color"], linestyle="-", linewidth=1)
        ax.axhline(0.5, color="0.3", linestyle=":", linewidth=1)
        ax.axhline(0.0, color=STYLE[REFERENCE]["color"], linewidth=0.8)
        ceiling = rows.get("fo_mask")
        if ceiling is not None and ceiling["fraction_of_fo"] is not None:
            ax.axhline(ceiling["fraction_of_fo"], color="0.4", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlim(2, 2 * max(xs, default=3))
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(low, high)
        ax.set_xlabel("client forwards per client and round (P + 1)")
        ax.set_ylabel("fraction of SplitLoRA's client contribution")
        ax.set_title(f"{task.upper()}, {depth} split, {length}")
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=c, marker="o", linestyle="none", label=f"client lr {lr:g}") for lr, c in LR_COLORS.items()
    ]
    handles += [
        Line2D([], [], color="0.3", marker=m, linestyle="none", label=space) for space, m in FRONTIER_MARKERS.items()
    ]
    handles += [
        Line2D([], [], color=STYLE["splitlora"]["color"], label="SplitLoRA at its best client lr (1)"),
        Line2D([], [], color="0.3", linestyle=":", label="target: half of SplitLoRA"),
        Line2D([], [], color="0.4", linestyle="--", label="first-order client on the mask (ceiling)"),
        Line2D([], [], color=STYLE[REFERENCE]["color"], label="frozen client (0)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7)
    fig.suptitle(
        "Client-update frontier: zeroth-order clients (AdamW; isotropic or guided directions) vs forwards per round\n"
        "filled: mean ± SE over seeds; open: one seed; edge points are off scale (value printed)"
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig
