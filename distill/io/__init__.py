"""Shared plumbing every stage uses: files written atomically and JSONL read (`files`), one writer per
output (`locking`), safetensors checkpoints read and written tensor by tensor (`checkpoints`,
`streaming`), finding and loading models (`paths`, `models`, `dtypes`), rows from files, `datasets`
directories and the local hub cache (`sources`), value and model-directory checks (`validate`),
progress bars (`progress`). Depends on nothing else in distill."""
