"""What the steps that judge a graph share: budgets, metrics, the eager reference and stage runners.

A floor below the steps: quantize (its selection) and parity (its verdict) both measure
compiled stages against the eager fp32 model with these, so neither imports the other.

    budgets    the parity budgets per precision, ``load_budgets``, ``evaluate``
    metrics    element errors, AUC / log-loss deltas, ranking metrics, ``output_metrics``
    auc_noise  the ΔAUC interval (paired bootstrap over requests) and its verdict
    stages     the eager reference (``eager_outputs``), ``user_rows``, a bundle's stage runners
    configs    the serving configurations parity scores (per request, merged, batch 1 / max)
"""
