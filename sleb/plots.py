"""PNG plots: a search's candidate-loss heatmap and calibration loss vs blocks removed; a healing loss curve."""

import math


def plot_search(record: dict, prefix: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    search = record["search"]
    losses = search["losses"]
    written = []
    if losses:
        # Each phase relative to its own best: losses grow from phase to phase, and a shared scale
        # would hide how close the candidates within a phase are.
        grid = []
        for row in losses:
            best = min((v for v in row if v is not None), default=0.0)
            grid.append([math.nan if v is None else v - best for v in row])
        fig, ax = plt.subplots(figsize=(max(6, len(grid[0]) * 0.35), max(3, len(grid) * 0.4 + 1.5)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        # Mark each removed block: phase i's choice on row i; one-shot metrics rank once, all on row 0.
        removed = search["removal_list"]
        ax.plot(removed, list(range(len(removed))) if len(grid) > 1 else [0] * len(removed), "rx")
        ax.set_xticks(range(len(grid[0])))
        ax.set_yticks(range(len(grid)), [str(p + 1) for p in range(len(grid))])
        ax.set_xlabel("original block")
        ax.set_ylabel("phase")
        ax.set_title(f"{record['settings']['metric']}: score minus the phase's best (blank: not scored)", fontsize=10)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(f"{prefix}_heatmap.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if record["settings"]["metric"] == "sleb" and losses:
        chosen = [row[block] for row, block in zip(losses, search["removal_list"])]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(range(1, len(chosen) + 1), chosen, marker="o")
        ax.set_xlabel("blocks removed")
        ax.set_ylabel("calibration loss (sum of mean CE x seqlen)")
        fig.tight_layout()
        written.append(f"{prefix}_loss.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_loss_curve(curve: list, path: str) -> str:
    """Training loss against optimizer step (healing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean CE)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
