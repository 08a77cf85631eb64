"""Built-in example problems: ``digits`` (an MLP on scikit-learn's digits) and ``linear``
(Bayesian linear regression, whose localized posterior and BIF are known in closed form)."""
