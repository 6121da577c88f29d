"""The errors sources raise. They live apart from the clients so that the serving master can tell them
apart without importing the HTTP and crypto libraries that produce them."""


class SourceError(Exception):
    """The module could not be fetched; the text completes `Error while downloading policy ...: `."""


class LocalModuleError(SourceError):
    """A module path or file:// URL that cannot be used; nothing was downloaded, so the text stands alone."""


class TransportError(SourceError):
    """A request failed before any HTTP answer (connection, TLS, timeout)."""


class VerificationError(SourceError):
    """The module's signatures do not satisfy verification.yml (`Policy '<name>' cannot be verified`)."""


class ChecksumError(SourceError):
    """The module's bytes are not the signed ones (`Verification of policy <name> failed`)."""
