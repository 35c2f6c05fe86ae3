"""Quality of adaptive depth against full depth: metrics, corpora, baselines, evaluations and
plots."""
