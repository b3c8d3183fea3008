"""The bot core: config, neutral model, domain rules and the composition root."""
