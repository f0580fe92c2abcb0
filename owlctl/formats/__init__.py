"""On-disk contracts: versioned JSON documents and checkpoints. The only JSON/safetensors code in owlctl."""
