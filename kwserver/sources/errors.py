"""The error every source raises."""


class SourceError(Exception):
    """The module could not be fetched; the text completes `Error while downloading policy ...: `."""
