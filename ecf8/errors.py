"""The one error family of ecf8."""

__all__ = ["ECF8Error", "CorruptDataError", "UnsupportedError"]


class ECF8Error(ValueError):
    """Base of every error ecf8 raises on bad input."""


class CorruptDataError(ECF8Error):
    """A blob is truncated, fails a checksum, or holds a field outside its valid range."""


class UnsupportedError(ECF8Error):
    """An input ecf8 cannot code: an unsupported dtype, format version or option."""
