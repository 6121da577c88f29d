"""kwserver: a Kubewarden-compatible admission policy server on a gunicorn pre-fork daemon."""

__version__ = "0.1.0"

# The Kubewarden release whose behaviour kwserver reproduces. Policies declare a
# `minimumKubewardenVersion` and are checked against this, not against kwserver's own version.
KUBEWARDEN_COMPAT_VERSION = "1.31.0"
