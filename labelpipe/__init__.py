"""labelpipe: label-efficient semantic segmentation as discrete, resumable stages."""

__version__ = "0.1.0"
