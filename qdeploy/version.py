"""The qdeploy release number (one place: the API, the CLI and artifact manifests read it)."""

__version__ = "0.1.0"
