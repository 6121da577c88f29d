"""The Kubernetes API as the context-aware callbacks see it: discovery, watch caches, reads and access reviews."""
