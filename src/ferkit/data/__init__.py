"""Datasets: find and validate (sources), decode once (cache), augment on the training device (augment)."""

from ferkit.data.cache import LoadedSplit, load_split
from ferkit.data.sources import Dataset, SplitSource, find_dataset

__all__ = ["Dataset", "LoadedSplit", "SplitSource", "find_dataset", "load_split"]
