"""Parameter space: the chat vector Δ = θ_post − θ_base (`core`: extract, apply), its norms and
cosines (`stats`), and `distill chat-vector` (`cli`)."""
