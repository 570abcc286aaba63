"""MRML glue of the SAMFewshot Slicer module, free of Qt so that plain pytest can run it with ``slicer-core``.

The data flows one way, one file per step:

- ``geometry``: volume node <-> ``SAMFewshotLib.volume_io.Volume`` (RAS/LPS, parent transforms) and the axis
  reordering that shows every volume to the model the same way;
- ``segments``: segment masks on a volume's voxel grid, read and written with the right transforms, and the
  painted slices of each segment;
- ``propagation``: what the worker thread gets (copies, no MRML) and what it returns;
- ``jobs``: the worker thread, its progress queue and its cancel flag;
- ``workflow``: the preview, Apply with undo, Cancel, re-propagation and adapted models;
- ``prompts``: click to segment: markups points and a box on one slice -> a mask (plain SAM, zero-shot from
  clicks, prompts learned from the painted slices), previewed, then accepted as a painted slice;
- ``guidance``: after a propagation, the least confident slices and the suggested next slice, with the
  positions the slice views jump to;
- ``dependencies``: which Python packages are missing, and what PyTorch can see.

Nothing here imports torch or the heavy parts of SAMFewshotLib at import time.
"""
