"""End-of-life runtimes kept for comparison only. DeepSparse 1.8.0 (the last working release; end of life in
June 2025) pins old libraries, so it runs in a venv of its own (deepsparse_host) through a worker process
(deepsparse_worker), never in owlctl's environment."""
