"""tickbridge: exactly-once market data from an exchange-side VPS to a trading Brain."""

__version__ = "0.1.0"
