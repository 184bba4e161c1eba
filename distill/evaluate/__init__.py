"""`distill evaluate`: one model scored (`run`); greedy generation (`generate`), the verifiable
instruction checkers (`checkers`), metrics (`metrics/`, `evaluate`-loadable), lm-eval (`lm_eval`)."""
