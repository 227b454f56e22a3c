"""PNG plots of a search: candidate-loss heatmap and calibration loss vs blocks removed."""

import math


def plot_search(record: dict, prefix: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    search = record["search"]
    losses = search["losses"]
    written = []
    if losses:
        grid = [[math.nan if v is None else v for v in row] for row in losses]
        fig, ax = plt.subplots(figsize=(max(6, len(grid[0]) * 0.35), max(3, len(grid) * 0.4 + 1.5)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xlabel("original block")
        ax.set_ylabel("phase")
        ax.set_title(f"{record['settings']['metric']} candidate scores (blank: not a candidate or abandoned)")
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
