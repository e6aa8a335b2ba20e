"""`servelm train-draft`: drafts trained on the target model's own outputs."""
