"""Floor 3, running a model and reading it: read-outs of the answer (``readout``), perplexity and
recall (``evaluate``), activations (``trace``), interventions (``patch``, ``amplify``), metrics on
tensors (``metrics``), and the driver every analysis shares: each configuration applied in turn,
the reference and its Robust / Failure subsets computed once (``widths``)."""
