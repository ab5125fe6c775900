"""The Brain side: consumer (Brain stream -> per-symbol keys), writer (-> QuestDB), tiered cache, query CLI."""
