"""`distill run RECIPE`: the typed recipe (`schema`), its stages and cache (`pipeline`), the run's
report (`report`) and comparison tables across runs (`compare`)."""
