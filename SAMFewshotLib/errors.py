"""Exceptions whose message is meant for the user: what is wrong and what to do about it."""


class SAMFewshotError(Exception):
    """Base class: the command line prints ``str(error)`` as one line and exits non-zero."""


class InputError(SAMFewshotError):
    """An image, label map or output path that cannot be used as given."""


class CheckpointError(SAMFewshotError):
    """A model or adapted-model file that is missing, corrupt, or not the model it claims to be."""


class CacheError(SAMFewshotError):
    """The embedding cache directory cannot be used."""


class DeviceError(SAMFewshotError):
    """The requested compute device is not available or ran out of memory."""


class Cancelled(SAMFewshotError):
    """The caller asked the run to stop; nothing was written."""
