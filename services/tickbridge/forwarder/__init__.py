"""`tickbridge forwarder`: VPS stream -> Brain stream, spilling to and replaying from the VPS QuestDB buffer."""
