"""Visualizations: PCA maps of patch features (pca) and self-contained HTML run reports (report)."""

from .pca import patch_tokens, pca_components, pca_maps, pca_rgb
from .report import (
    image_table,
    line_chart,
    png_data_uri,
    read_metrics,
    render_page,
    training_report,
    write_page,
)

__all__ = [
    "image_table",
    "line_chart",
    "patch_tokens",
    "pca_components",
    "pca_maps",
    "pca_rgb",
    "png_data_uri",
    "read_metrics",
    "render_page",
    "training_report",
    "write_page",
]
