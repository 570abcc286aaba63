"""SAMFewshotLib: few-shot Segment Anything for volumetric medical images.

Pure Python (no Slicer imports). The data flows one way, one file per step:
volume_io (files) -> painted_slices (axis + support slices) -> slice_transform / intensity (model input)
-> models + embeddings (frozen encoder, cached) -> adaptation (few-shot decoder fine-tuning)
-> propagation (per-slice prediction) -> volume_io (label map).
``pipeline`` ties them together for the command line, the Slicer module and the benchmarks.
"""

__version__ = "0.1.0"
