"""Serving a trained mixture: `dylora-moe serve` (an OpenAI-compatible server whose batches
mix experts in one forward) and `dylora-moe export` (one PEFT adapter at fixed gates).
The HTTP stack (the `serve` extra) is imported by the modules that need it, not here."""
