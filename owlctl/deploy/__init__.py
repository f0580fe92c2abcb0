"""Running pruned models: owlctl's sparse CPU kernels (``owlctl.deploy.kernels``)."""
