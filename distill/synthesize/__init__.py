"""`distill synthesize`: prompts in (`prompt_sets`, `fit`), a CoDIT or direct dataset out (`run`),
rows appended and resumed (`records`), repetitive responses flagged (`repetition`)."""
