"""Pictures of routing, for the training run's plots/ and `dylora-moe report`."""
from __future__ import annotations

from pathlib import Path


def save_usage_heatmap(usage_by_source: dict[str, list[float]], path: Path, title: str) -> None:
    """Rows: data sources; columns: experts; cells: mean gate weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(usage_by_source)
    data = [usage_by_source[n] for n in names]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(data[0]), 1.0 + 0.5 * len(names)))
    image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(data[0])), [str(i) for i in range(len(data[0]))])
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(data):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
