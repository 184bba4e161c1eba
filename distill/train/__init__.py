"""`distill train`: SFT with the Hugging Face Trainer and DeepSpeed (`run`); chats to token rows
(`data`), the fused loss and compiled layers (`fused`), DeepSpeed and safe resumes (`runtime`),
checkpoints, manifests and the final model (`outputs`). `python -m distill.train` for launchers."""
