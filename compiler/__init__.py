"""qdeploy.compiler: IR, frontends, reference interpreter, quantization search."""
